/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* The few wire formats the programs parse, without bitfields so that the
 * layout does not depend on the compiler's bitfield order. */
#ifndef __UNDERPASS_NET_H
#define __UNDERPASS_NET_H

#include <linux/types.h>

#define ETH_ALEN 6
#define ETH_HLEN 14
#define ETH_P_IP 0x0800
#define ETH_P_ARP 0x0806
#define ETH_P_8021Q 0x8100
#define ETH_P_8021AD 0x88A8
#define ETH_P_IPV6 0x86DD

#define IPPROTO_ICMP 1
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define IPPROTO_SCTP 132
#define IPPROTO_ICMPV6 58

/* IPv6 extension headers the programs walk. */
#define IPV6_HOPOPTS 0
#define IPV6_ROUTING 43
#define IPV6_FRAGMENT 44
#define IPV6_DSTOPTS 60

#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10

#define ARPOP_REQUEST 1
#define ARPOP_REPLY 2

#define ICMPV6_ND_RS 133
#define ICMPV6_ND_RA 134
#define ICMPV6_ND_NS 135
#define ICMPV6_ND_NA 136
#define ICMPV6_ND_REDIRECT 137

/* ND options (RFC 4861 4.6.1), lengths in units of 8 bytes. */
#define ND_OPT_SOURCE_LL 1
#define ND_OPT_TARGET_LL 2

#define XDP_PASS 2

/* Passing programs on a parent or uplink return TC_ACT_UNSPEC (tcx: "next"),
 * so programs attached after ours (another tool's) still run. */
#define TC_ACT_UNSPEC (-1)
#define TC_ACT_OK 0
#define TC_ACT_SHOT 2
#define TC_ACT_REDIRECT 7

struct ethhdr {
	__u8 h_dest[ETH_ALEN];
	__u8 h_source[ETH_ALEN];
	__be16 h_proto;
} __attribute__((packed));

struct iphdr {
	__u8 ver_ihl;
	__u8 tos;
	__be16 tot_len;
	__be16 id;
	__be16 frag_off;
	__u8 ttl;
	__u8 protocol;
	__sum16 check;
	__be32 saddr;
	__be32 daddr;
};

struct ipv6hdr {
	__u8 ver_tc;
	__u8 tc_flow;
	__be16 flow_lbl;
	__be16 payload_len;
	__u8 nexthdr;
	__u8 hop_limit;
	__u8 saddr[16];
	__u8 daddr[16];
};

struct tcphdr {
	__be16 source;
	__be16 dest;
	__be32 seq;
	__be32 ack_seq;
	__u8 doff_res; /* data offset in the high nibble */
	__u8 flags;
	__be16 window;
	__sum16 check;
	__be16 urg_ptr;
};

struct udphdr {
	__be16 source;
	__be16 dest;
	__be16 len;
	__sum16 check;
};

/* ARP for IPv4 over Ethernet: the only kind the programs look into. */
struct arp_eth {
	__be16 htype;
	__be16 ptype;
	__u8 hlen;
	__u8 plen;
	__be16 op;
	__u8 sha[ETH_ALEN];
	__u8 spa[4];
	__u8 tha[ETH_ALEN];
	__u8 tpa[4];
} __attribute__((packed));

struct icmphdr {
	__u8 type;
	__u8 code;
	__sum16 checksum;
	__be32 unused;
};

struct ipv6_opt_hdr {
	__u8 nexthdr;
	__u8 hdrlen; /* in 8-byte units, not counting the first 8 */
};

/* An ND option with a link-layer address (source or target). */
struct nd_opt_ll {
	__u8 type;
	__u8 len;
	__u8 mac[ETH_ALEN];
};

/* ICMPv6 header plus the target of a neighbour solicitation/advertisement. */
struct icmp6_nd {
	__u8 type;
	__u8 code;
	__sum16 checksum;
	__be32 flags;
	__u8 target[16];
};

#endif
