// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* underpass datapath.
 *
 * parent_egress (TC egress on a macvlan/ipvlan parent NIC) turns the parent
 * into a hairpin: a frame whose destination is local is redirected into the
 * parent's own receive path, where the macvlan/ipvlan rx_handler delivers it
 * to the right slave or to the host stack. It also steers endpoint traffic
 * for service/host destinations to the host stack and guards against stale
 * service VIPs. uplink_egress is the stale guard alone, for other NICs.
 * endpoint_ingress/endpoint_egress run on every endpoint's slave, inside the
 * container netns, where nothing in the packet says which endpoint it is
 * (ifindexes repeat across netns). The endpoint id rides in the cls_bpf
 * filter instead: its classid, which cls_bpf copies into skb->tc_classid
 * before it runs the program. So one loaded copy serves every endpoint and a
 * pod costs no program load at all. They only tail-call the programs that do
 * the work (ep_ingress_body, ep_egress_body) through ep_progs, so that an
 * upgrade swaps those for every endpoint with one map update. */

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "net.h"
#include "underpass.h"

char __license[] SEC("license") = "Dual BSD/GPL";

/* Tests set this to record every redirect in the trace map; the verifier
 * removes the code when it is 0. */
volatile const __u8 trace_redirects = 0;

/* Force enums that only name constants into BTF, so bpf2go -type can share
 * them with Go. */
const enum up_mode *unused_mode __attribute__((unused));
const enum up_config_flags *unused_config_flags __attribute__((unused));
const enum up_host_flags *unused_host_flags __attribute__((unused));
const enum up_drop_reason *unused_drop_reason __attribute__((unused));
const enum up_stat *unused_stat __attribute__((unused));
const enum up_trace_kind *unused_trace_kind __attribute__((unused));
const enum up_event_kind *unused_event_kind __attribute__((unused));
const enum up_limits *unused_limits __attribute__((unused));
const enum up_prefilter_limits *unused_prefilter_limits __attribute__((unused));
const enum up_ep_prog *unused_ep_prog __attribute__((unused));
const enum up_marks *unused_marks __attribute__((unused));
const enum up_ref_flags *unused_ref_flags __attribute__((unused));
const enum up_svc_flags *unused_svc_flags __attribute__((unused));
const enum up_svc_stat *unused_svc_stat __attribute__((unused));
const struct up_attach_key *unused_attach_key __attribute__((unused));
const struct up_flow_key *unused_flow_key __attribute__((unused));
const struct up_event *unused_event __attribute__((unused));

/* A BTF-defined map: UP_MAP(name, type without BPF_MAP_TYPE_, max entries, key
 * type, value type). The _NOPREALLOC form allocates entries on insert, for
 * the maps sized for the worst case but mostly empty. Who writes each map is
 * in docs/architecture.md ("Who owns what"). */
#define UP_MAP_DEF(_name, _type, _max, _key, _value, _extra) \
	struct {                                             \
		__uint(type, BPF_MAP_TYPE_##_type);          \
		__uint(max_entries, _max);                   \
		_extra                                       \
		__type(key, _key);                           \
		__type(value, _value);                       \
	} _name SEC(".maps")
#define UP_MAP(_name, _type, _max, _key, _value) UP_MAP_DEF(_name, _type, _max, _key, _value, )
#define UP_MAP_NOPREALLOC(_name, _type, _max, _key, _value) \
	UP_MAP_DEF(_name, _type, _max, _key, _value, __uint(map_flags, BPF_F_NO_PREALLOC);)

#define MAX_ENDPOINTS 16384
#define MAX_SERVICES 65536
#define MAX_CIDRS 1024

UP_MAP(config, ARRAY, 1, __u32, struct up_config);

UP_MAP(parents, ARRAY, UP_MAX_PARENT_IFINDEX, __u32, struct up_parent);

/* The parent registration of ifindex, or NULL. */
static __always_inline struct up_parent *parent_of(__u32 ifindex)
{
	struct up_parent *p = bpf_map_lookup_elem(&parents, &ifindex);
	if (!p || p->mode == UP_MODE_NONE)
		return 0;
	return p;
}

UP_MAP(ep_by_mac, HASH, MAX_ENDPOINTS, struct up_mac_key, struct up_ep_ref);

/* Registered addresses (UP_MAX_ADDRS per endpoint) and learnt ones
 * (UP_MAX_LEARNED), per parent. */
UP_MAP(ep_by_ip, HASH, MAX_ENDPOINTS * 12, struct up_ep_ip_key, struct up_ep_ref);

/* Written by userspace only (internal/datapath): never read by the programs. */
UP_MAP_NOPREALLOC(ep_names, HASH, MAX_ENDPOINTS, struct up_attach_key, __u32);

/* Addresses seen on the wire in ND and router advertisements, per parent
 * (XDP writes): an endpoint never learns an address someone on the wire
 * already uses, such as the router's link-local. */
UP_MAP(wire_addrs, LRU_HASH, 4096, struct up_ep_ip_key, __u64);

/* Service flows the host masqueraded and forwarded into an endpoint (a
 * steered, marked frame that kube-proxy sent to a backend pod), keyed as
 * the backend's reply: with hostReachability: false that reply is traffic
 * to the host's own address and would be cut, so the parent program lets
 * exactly these through. Written and read by the programs only (userspace
 * never writes it): parent_egress records, parent_egress and ep_egress_body
 * read; the value is when it was last seen. */
UP_MAP(svc_flows, LRU_HASH, 65536, struct up_flow_key, __u64);

/* Services translated at the pod: see up_svc_xlate and underpass.h. */
#define MAX_BACKENDS 262144
#define MAX_SVC_FLOWS 131072
/* How long a UDP flow to a Service may be idle before its tuple starts a
 * new one: Cilium's default for non-TCP flows; conntrack's is 30 s, 120 s
 * for a stream. */
#define SVC_UDP_IDLE_NS (60ULL * 1000000000ULL)
/* How long an open TCP flow idle holds its tuple at the backend against
 * another VIP's new flow (tuple_free): Linux's keepalive time and its 9
 * probes 75 s apart, within which a live connection that uses keepalives
 * has made the client send (its probe, or its ACK of the backend's); the
 * flow of a connection whose end was never seen must not hold the tuple
 * for ever. UDP and SCTP hold it while not idle (SVC_UDP_IDLE_NS; an
 * SCTP association sends heartbeats every 30 s). Idle is as the client
 * sends: its egress stamps the flow, the replies do not. */
#define SVC_TCP_HOLD_NS ((7200ULL + 9 * 75) * 1000000000ULL)
/* How many backends a new flow tries when its tuple is taken. */
#define SVC_TUPLE_TRIES 4

UP_MAP_NOPREALLOC(svc_frontends, HASH, MAX_SERVICES, struct up_svc_key, struct up_svc);

UP_MAP_NOPREALLOC(svc_slots, HASH, MAX_BACKENDS, struct up_slot_key, __u32); /* value: backend id */

UP_MAP_NOPREALLOC(svc_backends, HASH, MAX_BACKENDS, __u32, struct up_backend);

UP_MAP(svc_ct, LRU_HASH, MAX_SVC_FLOWS, struct up_ct_key, struct up_ct);

UP_MAP(svc_rev, LRU_HASH, MAX_SVC_FLOWS, struct up_rev_key, struct up_rev);

UP_MAP(svc_affinity, LRU_HASH, 65536, struct up_affinity_key, struct up_affinity);

UP_MAP_NOPREALLOC(svc_counters, PERCPU_HASH, MAX_SERVICES, __u32, struct up_svc_counters); /* key: frontend id */

UP_MAP(svc_frags, LRU_HASH, 8192, struct up_frag_key, struct up_frag);

UP_MAP_NOPREALLOC(svc_names, HASH, MAX_SERVICES, __u32, struct up_svc_name); /* key: frontend id */

UP_MAP(svc_stats, PERCPU_ARRAY, UP_SVC_STAT_SLOTS, __u32, struct up_counter);

UP_MAP_NOPREALLOC(endpoints, HASH, MAX_ENDPOINTS, __u32, struct up_endpoint);

UP_MAP(ep_stats, PERCPU_HASH, MAX_ENDPOINTS, __u32, struct up_ep_stats);

UP_MAP(stats, PERCPU_ARRAY, UP_STAT_MAX, __u32, struct up_counter);

UP_MAP(drops, PERCPU_ARRAY, UP_DROP_SLOTS, __u32, struct up_counter);

UP_MAP_NOPREALLOC(svc_cidrs, LPM_TRIE, MAX_CIDRS, struct up_lpm_key, __u32);

UP_MAP(live_svcs, HASH, MAX_SERVICES, struct up_ip_key, __u32);

UP_MAP_NOPREALLOC(host_cidrs, LPM_TRIE, MAX_CIDRS, struct up_lpm_key, struct up_host_entry);

UP_MAP(trace, PERCPU_ARRAY, 1, __u32, struct up_trace);

#define PREFILTER_SVC 0
#define PREFILTER_HOST 1

UP_MAP(prefilter, ARRAY, 2, __u32, struct up_prefilter);

/* The endpoint programs' bodies, by enum up_ep_prog. The loader fills it;
 * prog arrays carry no BTF (the kernel refuses it for them). */
struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, UP_EP_PROG_MAX);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(__u32));
} ep_progs SEC(".maps");

/* The endpoint a frame on a slave belongs to: the classid of the filter
 * that runs the program (16 bits, see EndpointID in internal/datapath). */
static __always_inline __u32 filter_endpoint(const struct __sk_buff *skb)
{
	return skb->tc_classid;
}

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 64 * 1024);
} events SEC(".maps");

/* What parse_l3 learnt about a frame. Addresses are IPv4-mapped. */
struct pkt {
	struct up_ip_key saddr;
	struct up_ip_key daddr;
	__u16 proto;    /* host order: ETH_P_IP, ETH_P_IPV6 or ETH_P_ARP */
	__u16 l4off;
	__u8 l4proto;
	__u8 arp_op;
	__u8 nd_type;   /* ICMPv6 NS/NA, 0 otherwise */
	__u8 first_frag;/* 1 unless this is a non-first fragment */
	__u8 icmp6_type;/* the ICMPv6 type, 0 when not ICMPv6 (or not read) */
	__u8 ext6;      /* IPv6 extension headers precede l4off */
	__u8 hop_limit; /* IPv6 */
	__u8 more_frags;/* a fragment that is not the last (MF / M set) */
	__u8 _pad[2];
	__u32 frag_id;  /* a fragment's identification (IPv4: 16 bits), 0 otherwise */
	struct up_ip_key target; /* ARP tpa or ND target */
	__u8 arp_sha[ETH_ALEN];
	__u16 _pad2;
};

static __always_inline void map_v4(struct up_ip_key *k, const __u8 *a)
{
	__builtin_memset(k, 0, sizeof(*k));
	k->addr[10] = 0xff;
	k->addr[11] = 0xff;
	k->addr[12] = a[0];
	k->addr[13] = a[1];
	k->addr[14] = a[2];
	k->addr[15] = a[3];
}

static __always_inline int mac_eq(const __u8 *a, const __u8 *b)
{
	/* Byte by byte: the headers live in packed stack copies, where wider
	 * loads would be misaligned. */
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3] && a[4] == b[4] &&
	       a[5] == b[5];
}

/* addr_eq compares two 16-byte addresses (there is no memcmp in BPF). */
static __always_inline int addr_eq(const __u8 *a, const __u8 *b)
{
	__u64 a0, a1, b0, b1;
	__builtin_memcpy(&a0, a, 8);
	__builtin_memcpy(&a1, a + 8, 8);
	__builtin_memcpy(&b0, b, 8);
	__builtin_memcpy(&b1, b + 8, 8);
	return a0 == b0 && a1 == b1;
}

static __always_inline int is_multicast(const __u8 *mac)
{
	return mac[0] & 1;
}

static __always_inline struct up_config *get_config(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&config, &zero);
}

static __always_inline void bump(struct up_counter *c, __u32 len)
{
	if (c) {
		c->packets++;
		c->bytes += len;
	}
}

static __always_inline void count(__u32 stat, __u32 len)
{
	bump(bpf_map_lookup_elem(&stats, &stat), len);
}

static __always_inline struct up_ep_stats *ep_stats_of(__u32 id)
{
	if (!id)
		return 0;
	return bpf_map_lookup_elem(&ep_stats, &id);
}

/* count_ep counts len bytes into the counter field (rx, tx, host_to_ep, …)
 * of endpoint id, when it has one. */
#define count_ep(id, field, len)                          \
	do {                                              \
		struct up_ep_stats *__s = ep_stats_of(id); \
		if (__s)                                  \
			bump(&__s->field, (len));         \
	} while (0)

static __always_inline void count_drop(__u32 reason, __u32 ep_id, __u32 len)
{
	bump(bpf_map_lookup_elem(&drops, &reason), len);
	struct up_ep_stats *s = ep_stats_of(ep_id);
	if (s && reason < UP_DROP_SLOTS)
		s->drops[reason]++;
}

static __always_inline void record(__u32 kind, __u32 ifindex, __u64 flags, __u32 ep_id)
{
	if (!trace_redirects)
		return;
	__u32 zero = 0;
	struct up_trace *t = bpf_map_lookup_elem(&trace, &zero);
	if (t) {
		t->kind = kind;
		t->ifindex = ifindex;
		t->flags = flags;
		t->ep_id = ep_id;
		t->count++;
	}
}

/* Back into the parent's own receive path. The redirect stays inside the
 * host netns, so the kernel keeps skb->mark: clear it, or a host mark would
 * leak into the pod. */
static __always_inline int to_ingress_marked(struct __sk_buff *skb, __u32 ep_id, __u32 mark)
{
	skb->mark = mark;
	record(UP_TRACE_REDIRECT, skb->ifindex, BPF_F_INGRESS, ep_id);
	return bpf_redirect(skb->ifindex, BPF_F_INGRESS);
}

static __always_inline int to_ingress(struct __sk_buff *skb, __u32 ep_id)
{
	return to_ingress_marked(skb, ep_id, 0);
}

/* A copy goes to the parent's receive path, the original on to the wire. */
static __always_inline void clone_to_ingress(struct __sk_buff *skb, __u32 stat)
{
	__u32 mark = skb->mark;
	skb->mark = 0;
	long err = bpf_clone_redirect(skb, skb->ifindex, BPF_F_INGRESS);
	skb->mark = mark;
	if (err) {
		count(UP_STAT_CLONE_FAILED, skb->len);
		return;
	}
	record(UP_TRACE_CLONE, skb->ifindex, BPF_F_INGRESS, 0);
	count(stat, skb->len);
}

/* 0 when addr is certainly not in set `which`; 1 when the trie must say. */
static __always_inline int maybe_in(__u32 which, const struct up_ip_key *addr)
{
	struct up_prefilter *f = bpf_map_lookup_elem(&prefilter, &which);
	if (!f)
		return 1;
	__u64 hi, lo;
	__builtin_memcpy(&hi, addr->addr, 8);
	__builtin_memcpy(&lo, addr->addr + 8, 8);
	/* IPv4-mapped: ::ffff:a.b.c.d, i.e. hi == 0 and the low word's first
	 * half is 0x0000ffff in memory order. */
	if (hi == 0 && (lo & 0xffffffff) == bpf_htonl(0x0000ffff)) {
		if (!f->exact4)
			return 1;
		__u32 a = lo >> 32;
#pragma unroll
		for (int i = 0; i < UP_PREFILTER_V4; i++)
			if (f->v4[i].valid && (a & f->v4[i].mask) == f->v4[i].addr)
				return 1;
		return 0;
	}
	if (!f->exact6)
		return 1;
#pragma unroll
	for (int i = 0; i < UP_PREFILTER_V6; i++)
		if (f->v6[i].valid && (hi & f->v6[i].mask[0]) == f->v6[i].addr[0] &&
		    (lo & f->v6[i].mask[1]) == f->v6[i].addr[1])
			return 1;
	return 0;
}

/* Is addr in the service (PREFILTER_SVC) or host (PREFILTER_HOST) set? *flags,
 * if given, gets the matching trie entry's value. The prefilter answers most
 * "no"s without a trie walk. */
static __always_inline int in_set(__u32 which, const struct up_ip_key *addr, __u32 *flags)
{
	if (!maybe_in(which, addr))
		return 0;
	struct up_lpm_key k = {.prefixlen = 128};
	__builtin_memcpy(k.addr, addr->addr, 16);
	__u32 *v = bpf_map_lookup_elem(which == PREFILTER_SVC ? (void *)&svc_cidrs : (void *)&host_cidrs, &k);
	if (!v)
		return 0;
	if (flags)
		*flags = *v;
	return 1;
}

/* Copies a header into a stack copy: straight from packet memory when it is
 * in the linear part (the common case; no helper call), else with the
 * program type's load helper. Stack copies outlive bpf_clone_redirect, which
 * invalidates packet pointers. */
#define LOAD_HDR_WITH(ctx, off, dst, load_bytes)                                        \
	({                                                                              \
		void *__d = (void *)(long)(ctx)->data;                                  \
		void *__e = (void *)(long)(ctx)->data_end;                              \
		long __r = 0;                                                           \
		if (__d + (off) + sizeof(*(dst)) <= __e)                                \
			__builtin_memcpy((dst), __d + (off), sizeof(*(dst)));           \
		else                                                                    \
			__r = load_bytes((ctx), (off), (dst), sizeof(*(dst)));          \
		__r;                                                                    \
	})
#define LOAD_HDR(skb, off, dst) LOAD_HDR_WITH(skb, off, dst, bpf_skb_load_bytes)
#define XDP_LOAD_HDR(xdp, off, dst) LOAD_HDR_WITH(xdp, off, dst, bpf_xdp_load_bytes)

/* Reads the headers the decisions need into *p (see LOAD_HDR). Returns 0
 * when the frame is not something the programs act on. */
/* The IPv6 extension headers parse_l3 walks. */
static __always_inline int ext6_header(__u8 next)
{
	return next == IPV6_HOPOPTS || next == IPV6_ROUTING || next == IPV6_DSTOPTS || next == IPV6_FRAGMENT;
}

__noinline int up_parse_l3(struct __sk_buff *skb, __u32 proto, struct pkt *p)
{
	if (!skb || !p)
		return 0;
	__builtin_memset(p, 0, sizeof(*p));
	p->proto = proto;
	p->first_frag = 1;

	if (proto == ETH_P_IP) {
		struct iphdr ip;
		if (LOAD_HDR(skb, ETH_HLEN, &ip))
			return 0;
		__u32 ihl = ip.ver_ihl & 0xf;
		if ((ip.ver_ihl >> 4) != 4 || ihl < 5)
			return 0;
		map_v4(&p->saddr, (const __u8 *)&ip.saddr);
		map_v4(&p->daddr, (const __u8 *)&ip.daddr);
		p->l4proto = ip.protocol;
		if (ip.frag_off & bpf_htons(0x1fff))
			p->first_frag = 0;
		if (ip.frag_off & bpf_htons(0x3fff)) { /* a fragment: offset or MF */
			p->more_frags = !!(ip.frag_off & bpf_htons(0x2000));
			p->frag_id = ip.id;
		}
		p->l4off = ETH_HLEN + ihl * 4;
		return 1;
	}
	if (proto == ETH_P_IPV6) {
		struct ipv6hdr ip6;
		if (LOAD_HDR(skb, ETH_HLEN, &ip6))
			return 0;
		if ((ip6.ver_tc >> 4) != 6)
			return 0;
		__builtin_memcpy(p->saddr.addr, ip6.saddr, 16);
		__builtin_memcpy(p->daddr.addr, ip6.daddr, 16);
		p->hop_limit = ip6.hop_limit;
		__u8 next = ip6.nexthdr;
		__u16 off = ETH_HLEN + sizeof(ip6);
		/* A few extension headers are walked so that ICMPv6 behind them
		 * (MLD behind hop-by-hop, or ND someone hid) is still seen; the
		 * guard and the steering need the addresses only. */
#pragma clang loop unroll(disable)
		for (int i = 0; i < 4; i++) {
			if (!ext6_header(next))
				break;
			struct ipv6_opt_hdr h;
			if (LOAD_HDR(skb, off, &h))
				return 0;
			p->ext6 = 1;
			if (next == IPV6_FRAGMENT) {
				struct {
					__be16 fo;
					__be32 id;
				} __attribute__((packed)) f;
				if (LOAD_HDR(skb, off + 2, &f))
					return 0;
				if (f.fo & bpf_htons(0xfff8))
					p->first_frag = 0;
				p->more_frags = !!(f.fo & bpf_htons(1));
				p->frag_id = f.id;
				off += 8;
			} else {
				off += (h.hdrlen + 1) * 8;
			}
			next = h.nexthdr;
			/* Bounded for the verifier; headers that long are not
			 * something the programs act on. */
			if (off > 512)
				return 0;
		}
		p->l4proto = next;
		p->l4off = off;
		if (next == IPPROTO_ICMPV6 && p->first_frag) {
			struct icmp6_nd nd;
			if (!LOAD_HDR(skb, off, &nd)) {
				p->icmp6_type = nd.type;
				if ((nd.type == ICMPV6_ND_NS || nd.type == ICMPV6_ND_NA) && nd.code == 0) {
					p->nd_type = nd.type;
					__builtin_memcpy(p->target.addr, nd.target, 16);
				}
			} else if (LOAD_HDR(skb, off, &p->icmp6_type)) {
				p->icmp6_type = 0;
			}
		}
		return 1;
	}
	if (proto == ETH_P_ARP) {
		struct arp_eth arp;
		if (LOAD_HDR(skb, ETH_HLEN, &arp))
			return 0;
		if (arp.htype != bpf_htons(1) || arp.ptype != bpf_htons(ETH_P_IP) ||
		    arp.hlen != 6 || arp.plen != 4)
			return 0;
		p->arp_op = bpf_ntohs(arp.op);
		map_v4(&p->saddr, arp.spa);
		map_v4(&p->target, arp.tpa);
		__builtin_memcpy(p->arp_sha, arp.sha, ETH_ALEN);
		return 1;
	}
	return 0;
}

/* parse_l3 is a global function (verified once, not at every call site):
 * its header walk multiplied with the callers' branches would cost the
 * verifier minutes. */
static __always_inline int parse_l3(struct __sk_buff *skb, __u16 proto, struct pkt *p)
{
	return up_parse_l3(skb, proto, p);
}

/* ---- checksums, for the answers built in reject mode ---------------------- */

static __always_inline __u16 csum_fold(__u64 sum)
{
	sum = (sum & 0xffffffff) + (sum >> 32);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return ~sum & 0xffff;
}

/* One's complement sum of 16-bit words as they lie in memory: storing the
 * folded result back in memory order gives the network-order checksum. */
static __always_inline __u64 csum_add(const void *buf, __u32 words, __u64 sum)
{
	const __u16 *w = buf;
#pragma unroll
	for (__u32 i = 0; i < 64; i++) {
		if (i >= words)
			break;
		sum += w[i];
	}
	return sum;
}

/* ---- reject mode ------------------------------------------------------------ */

/* answer_eth is the Ethernet header of an answer to the frame in skb: its
 * own, with the addresses swapped. */
static __always_inline int answer_eth(struct __sk_buff *skb, struct ethhdr *oeth)
{
	struct ethhdr eth;
	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)))
		return -1;
	__builtin_memcpy(oeth->h_dest, eth.h_source, ETH_ALEN);
	__builtin_memcpy(oeth->h_source, eth.h_dest, ETH_ALEN);
	oeth->h_proto = eth.h_proto;
	return 0;
}

/* write_answer turns the frame into oeth + the len bytes at l3, first
 * making grow bytes of room after the MAC header (for an answer that
 * quotes the frame). */
static __always_inline int write_answer(struct __sk_buff *skb, const struct ethhdr *oeth, const void *l3, __u32 len,
					__u32 grow)
{
	if ((grow && bpf_skb_adjust_room(skb, grow, BPF_ADJ_ROOM_MAC, 0)) ||
	    bpf_skb_change_tail(skb, ETH_HLEN + len, 0) || bpf_skb_store_bytes(skb, 0, oeth, sizeof(*oeth), 0) ||
	    bpf_skb_store_bytes(skb, ETH_HLEN, l3, len, 0))
		return -1;
	return 0;
}

/* rst_for fills the TCP header of the RST|ACK that answers th, which
 * carried payload bytes (checksum left to the caller). */
static __always_inline void rst_for(struct tcphdr *rst, const struct tcphdr *th, int payload)
{
	rst->source = th->dest;
	rst->dest = th->source;
	rst->ack_seq = bpf_htonl(bpf_ntohl(th->seq) + 1 + payload);
	rst->doff_res = (sizeof(*rst) / 4) << 4;
	rst->flags = TCP_FLAG_RST | TCP_FLAG_ACK;
}

struct rst4 {
	struct iphdr ip;
	struct tcphdr tcp;
};

/* TCP SYN to a stale IPv4 VIP -> RST|ACK from the VIP, sent back where the SYN
 * came from, so the client fails at once instead of retrying for minutes. */
static __always_inline int reject_tcp4(struct __sk_buff *skb)
{
	struct ethhdr oeth;
	struct iphdr ip;
	struct tcphdr th;
	if (answer_eth(skb, &oeth) || bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) || ip.ver_ihl != 0x45 ||
	    bpf_skb_load_bytes(skb, ETH_HLEN + sizeof(ip), &th, sizeof(th)))
		return -1;
	int payload = (int)bpf_ntohs(ip.tot_len) - (int)sizeof(ip) - (int)(th.doff_res >> 4) * 4;
	if (payload < 0)
		return -1;

	struct rst4 r = {};
	r.ip.ver_ihl = 0x45;
	r.ip.tot_len = bpf_htons(sizeof(r));
	r.ip.frag_off = bpf_htons(0x4000); /* DF */
	r.ip.ttl = 64;
	r.ip.protocol = IPPROTO_TCP;
	r.ip.saddr = ip.daddr;
	r.ip.daddr = ip.saddr;
	r.ip.check = csum_fold(csum_add(&r.ip, sizeof(r.ip) / 2, 0));

	rst_for(&r.tcp, &th, payload);
	__u64 sum = csum_add(&r.tcp, sizeof(r.tcp) / 2, 0);
	sum += (__u64)r.ip.saddr + r.ip.daddr;
	sum += bpf_htons(IPPROTO_TCP) + bpf_htons(sizeof(r.tcp));
	r.tcp.check = csum_fold(sum);
	return write_answer(skb, &oeth, &r, sizeof(r), 0);
}

struct rst6 {
	struct ipv6hdr ip;
	struct tcphdr tcp;
};

static __always_inline __u64 csum_pseudo6(const __u8 *s, const __u8 *d, __u32 len, __u8 proto)
{
	__u64 sum = csum_add(s, 8, 0);
	sum = csum_add(d, 8, sum);
	sum += bpf_htonl(len);
	sum += bpf_htonl(proto);
	return sum;
}

static __always_inline int reject_tcp6(struct __sk_buff *skb)
{
	struct ethhdr oeth;
	struct ipv6hdr ip;
	struct tcphdr th;
	if (answer_eth(skb, &oeth) || bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) || ip.nexthdr != IPPROTO_TCP ||
	    bpf_skb_load_bytes(skb, ETH_HLEN + sizeof(ip), &th, sizeof(th)))
		return -1;
	int payload = (int)bpf_ntohs(ip.payload_len) - (int)(th.doff_res >> 4) * 4;
	if (payload < 0)
		return -1;

	struct rst6 r = {};
	r.ip.ver_tc = 0x60;
	r.ip.payload_len = bpf_htons(sizeof(r.tcp));
	r.ip.nexthdr = IPPROTO_TCP;
	r.ip.hop_limit = 64;
	__builtin_memcpy(r.ip.saddr, ip.daddr, 16);
	__builtin_memcpy(r.ip.daddr, ip.saddr, 16);

	rst_for(&r.tcp, &th, payload);
	__u64 sum = csum_pseudo6(r.ip.saddr, r.ip.daddr, sizeof(r.tcp), IPPROTO_TCP);
	r.tcp.check = csum_fold(csum_add(&r.tcp, sizeof(r.tcp) / 2, sum));
	return write_answer(skb, &oeth, &r, sizeof(r), 0);
}

/* ICMP port unreachable: new IP + ICMP header in front of the original IP
 * header and the first 8 bytes of the datagram (RFC 792). */
struct unreach4 {
	struct iphdr ip;
	struct icmphdr icmp;
	struct iphdr orig;
	__u8 orig_l4[8];
};

static __always_inline int reject_udp4(struct __sk_buff *skb)
{
	struct ethhdr oeth;
	struct unreach4 u = {};
	if (answer_eth(skb, &oeth) || bpf_skb_load_bytes(skb, ETH_HLEN, &u.orig, sizeof(u.orig)) ||
	    u.orig.ver_ihl != 0x45 ||
	    bpf_skb_load_bytes(skb, ETH_HLEN + sizeof(u.orig), u.orig_l4, sizeof(u.orig_l4)))
		return -1;

	u.ip.ver_ihl = 0x45;
	u.ip.tos = 0xc0;
	u.ip.tot_len = bpf_htons(sizeof(u));
	u.ip.ttl = 64;
	u.ip.protocol = IPPROTO_ICMP;
	u.ip.saddr = u.orig.daddr;
	u.ip.daddr = u.orig.saddr;
	u.ip.check = csum_fold(csum_add(&u.ip, sizeof(u.ip) / 2, 0));
	u.icmp.type = 3; /* destination unreachable */
	u.icmp.code = 3; /* port unreachable */
	u.icmp.checksum = csum_fold(csum_add(&u.icmp, (sizeof(u) - sizeof(u.ip)) / 2, 0));

	return write_answer(skb, &oeth, &u, sizeof(u), sizeof(u) - sizeof(u.orig) - sizeof(u.orig_l4));
}

struct unreach6 {
	struct ipv6hdr ip;
	struct icmphdr icmp;
	struct ipv6hdr orig;
	__u8 orig_l4[8];
};

static __always_inline int reject_udp6(struct __sk_buff *skb)
{
	struct ethhdr oeth;
	struct unreach6 u = {};
	if (answer_eth(skb, &oeth) || bpf_skb_load_bytes(skb, ETH_HLEN, &u.orig, sizeof(u.orig)) ||
	    u.orig.nexthdr != IPPROTO_UDP ||
	    bpf_skb_load_bytes(skb, ETH_HLEN + sizeof(u.orig), u.orig_l4, sizeof(u.orig_l4)))
		return -1;

	__u32 icmp_len = sizeof(u) - sizeof(u.ip);
	u.ip.ver_tc = 0x60;
	u.ip.payload_len = bpf_htons(icmp_len);
	u.ip.nexthdr = IPPROTO_ICMPV6;
	u.ip.hop_limit = 64;
	__builtin_memcpy(u.ip.saddr, u.orig.daddr, 16);
	__builtin_memcpy(u.ip.daddr, u.orig.saddr, 16);
	u.icmp.type = 1; /* destination unreachable */
	u.icmp.code = 4; /* port unreachable */
	__u64 sum = csum_pseudo6(u.ip.saddr, u.ip.daddr, icmp_len, IPPROTO_ICMPV6);
	u.icmp.checksum = csum_fold(csum_add(&u.icmp, icmp_len / 2, sum));

	return write_answer(skb, &oeth, &u, sizeof(u), sizeof(u) - sizeof(u.orig) - sizeof(u.orig_l4));
}

/* ---- the stale-service guard ------------------------------------------------ */

enum svc_verdict {
	SVC_NONE = 0,  /* not a service address */
	SVC_LIVE = 1,
	SVC_STALE = 2,
};

/* Until the agent has synced the live set once, nothing is stale: a
 * destination in a service CIDR is steered to the host as if live, where
 * kube-proxy (synced or not) decides, as it would without underpass. */
static __always_inline int classify_service(const struct up_config *cfg, const struct pkt *p)
{
	if (!in_set(PREFILTER_SVC, &p->daddr, 0))
		return SVC_NONE;
	if (bpf_map_lookup_elem(&live_svcs, &p->daddr))
		return SVC_LIVE;
	if (!cfg || !(cfg->flags & UP_CFG_SVC_SYNCED))
		return SVC_LIVE;
	return SVC_STALE;
}

/* Drop, or in reject mode answer in place: TCP SYN -> RST|ACK, UDP -> ICMP
 * port unreachable, both sent back into this NIC's receive path. Anything
 * else (or an answer that cannot be built) is dropped. */
__noinline int up_handle_stale(struct __sk_buff *skb, __u32 cfg_flags, const struct pkt *p, __u32 ep_id)
{
	if (!skb || !p)
		return TC_ACT_SHOT;
	__u32 len = skb->len;
	struct up_ep_stats *s = ep_stats_of(ep_id);

	if (cfg_flags & UP_CFG_STALE_REJECT) {
		int err = 1;
		/* The TCP header is read only here: the common paths never need it. */
		struct tcphdr th = {};
		if (p->l4proto == IPPROTO_TCP && p->first_frag &&
		    !bpf_skb_load_bytes(skb, p->l4off, &th, sizeof(th)) &&
		    (th.flags & (TCP_FLAG_SYN | TCP_FLAG_ACK | TCP_FLAG_RST)) == TCP_FLAG_SYN)
			err = p->proto == ETH_P_IP ? reject_tcp4(skb) : reject_tcp6(skb);
		else if (p->l4proto == IPPROTO_UDP && p->first_frag)
			err = p->proto == ETH_P_IP ? reject_udp4(skb) : reject_udp6(skb);
		if (!err) {
			count(UP_STAT_STALE_REJECTED, len);
			if (s)
				s->stale_rejected++;
			return to_ingress(skb, ep_id);
		}
		if (err < 0)
			count_drop(UP_DROP_REJECT_FAILED, ep_id, len);
	}
	count(UP_STAT_STALE_DROPPED, len);
	count_drop(UP_DROP_STALE_SERVICE, ep_id, len);
	if (s)
		s->stale_dropped++;
	return TC_ACT_SHOT;
}

/* A global function too: the answers it builds take stack the hot path
 * should not carry. */
static __always_inline int handle_stale(struct __sk_buff *skb, const struct up_config *cfg,
					const struct pkt *p, __u32 ep_id)
{
	return up_handle_stale(skb, cfg ? cfg->flags : 0, p, ep_id);
}

/* ---- endpoint lookups, per parent ------------------------------------------- */

static __always_inline struct up_ep_ref *ref_by_mac(const __u8 *mac, __u32 parent_ifindex)
{
	struct up_mac_key k = {.parent_ifindex = parent_ifindex};
	__builtin_memcpy(k.mac, mac, ETH_ALEN);
	return bpf_map_lookup_elem(&ep_by_mac, &k);
}

static __always_inline struct up_ep_ref *ref_by_ip(const struct up_ip_key *ip, __u32 parent_ifindex)
{
	struct up_ep_ip_key k = {.parent_ifindex = parent_ifindex};
	__builtin_memcpy(k.addr, ip->addr, 16);
	return bpf_map_lookup_elem(&ep_by_ip, &k);
}

static __always_inline __u32 ep_by_mac_on(const __u8 *mac, __u32 ifindex)
{
	struct up_ep_ref *r = ref_by_mac(mac, ifindex);
	return r ? r->id : 0;
}

static __always_inline __u32 ep_by_ip_on(const struct up_ip_key *ip, __u32 ifindex)
{
	struct up_ep_ref *r = ref_by_ip(ip, ifindex);
	return r ? r->id : 0;
}

/* Is a in ::/80 (::, ::1, the IPv4-compatible ::a.b.c.d and the
 * IPv4-mapped ::ffff:a.b.c.d)? Never an address a pod may claim from IPv6
 * ND: IPv4 addresses are kept IPv4-mapped under the same keys. */
static __always_inline int embeds_ipv4(const struct up_ip_key *a)
{
	__u64 hi;
	__u16 mid;
	__builtin_memcpy(&hi, a->addr, 8);
	__builtin_memcpy(&mid, a->addr + 8, 2);
	return hi == 0 && mid == 0;
}

static __always_inline int is_unspecified(const struct up_ip_key *a)
{
	__u64 hi, lo;
	__builtin_memcpy(&hi, a->addr, 8);
	__builtin_memcpy(&lo, a->addr + 8, 8);
	/* :: and the IPv4-mapped 0.0.0.0 */
	return hi == 0 && (lo == 0 || lo == bpf_htonl(0x0000ffff));
}

static __always_inline int is_link_local6(const struct up_ip_key *a)
{
	return a->addr[0] == 0xfe && (a->addr[1] & 0xc0) == 0x80;
}

/* ---- the source guard: what an endpoint may send ---------------------------- */

/* The programs' clock: CLOCK_MONOTONIC at the kernel tick's resolution,
 * which all their timestamps need (the finest rule is "once a second").
 * bpf_ktime_get_ns reads the clock source itself, which in a VM
 * (kvm-clock) took about a sixth of an established flow's translation. */
static __always_inline __u64 up_now(void)
{
	return bpf_ktime_get_coarse_ns();
}

/* Nanoseconds from then to now, 0 when then is up to a second later: a
 * stamp from the fine clock (programs before December 2026, kept in pinned
 * maps across an upgrade) can be up to a tick ahead of the coarse one.
 * Otherwise the difference modulo 2^64, as a plain subtraction: a stamp
 * set back past zero (a test ageing a flow soon after boot) still ages. */
static __always_inline __u64 since(__u64 now, __u64 then)
{
	__u64 d = now - then;
	return d > (__u64)-1000000000LL ? 0 : d;
}

/* Learnt addresses remember when they were last used as a source, so that
 * the least recently used one makes room for a new one; once a second is
 * enough for that and keeps the write off most packets. */
static __always_inline void touch(struct up_ep_ref *r)
{
	if (!(r->flags & UP_REF_LEARNED))
		return;
	__u64 now = up_now();
	if (since(now, r->used_ns) > 1000000000ULL)
		r->used_ns = now;
}

/* A link-local address whose interface id is the EUI-64 of mac: the
 * address the kernel gives a slave by default, provably the endpoint's own
 * without waiting for its DAD (which may come before its filters do). The
 * middle two bytes are ff:fe, or the device's dev_id, which the kernel puts
 * there so that ipvlan slaves sharing one MAC get distinct addresses; with a
 * dev_id the kernel does not flip the universal/local bit (addrconf's
 * addrconf_ifid_eui48), so both forms of the first byte are the MAC's. */
static __always_inline int eui64_link_local(const struct up_ip_key *a, const __u8 *mac)
{
	const __u8 *x = a->addr;
	return x[0] == 0xfe && x[1] == 0x80 && !x[2] && !x[3] && !x[4] && !x[5] && !x[6] && !x[7] &&
	       (x[8] == (mac[0] ^ 0x02) || x[8] == mac[0]) && x[9] == mac[1] && x[10] == mac[2] && x[13] == mac[3] &&
	       x[14] == mac[4] && x[15] == mac[5];
}

/* The endpoint whose EUI-64 address (ff:fe in the middle, from its MAC) a
 * is, or 0: its link-local, or a SLAAC address under any prefix, which
 * anyone who knows the MAC and the router's prefix can work out before the
 * pod's own DAD. Those are no entry of ep_by_ip (until learnt), but no
 * other pod may claim one by its DAD. */
static __always_inline __u32 eui64_owner(const struct up_ip_key *a, __u32 parent_ifindex)
{
	const __u8 *x = a->addr;
	if (x[11] != 0xff || x[12] != 0xfe)
		return 0;
	__u8 mac[ETH_ALEN] = {x[8] ^ 0x02, x[9], x[10], x[13], x[14], x[15]};
	return ep_by_mac_on(mac, parent_ifindex);
}

/* The ref of addr if it is one of endpoint id's own (registered or learnt)
 * on its parent, else NULL. Only looks: see owns(). */
static __always_inline struct up_ep_ref *own_ref(__u32 id, __u32 parent_ifindex, const struct up_ip_key *addr)
{
	struct up_ep_ref *r = ref_by_ip(addr, parent_ifindex);
	return r && r->id == id ? r : NULL;
}

/* Is addr one of endpoint id's own? For the endpoint's own sending, which
 * marks a learnt address used (touch). */
static __always_inline int owns(__u32 id, __u32 parent_ifindex, const struct up_ip_key *addr)
{
	struct up_ep_ref *r = own_ref(id, parent_ifindex, addr);
	if (!r)
		return 0;
	touch(r);
	return 1;
}

/* When learnt slot i was last used: 0 when free (or no longer the
 * endpoint's, taken back after a conflict). */
static __noinline __u64 slot_used(struct up_endpoint *ep, __u32 i, __u32 id, struct up_ep_ip_key *k)
{
	if (!ep || !k || i >= UP_MAX_LEARNED)
		return 0;
	struct up_learned *l = &ep->learned[i];
	if (!l->learned_ns)
		return 0;
	__builtin_memcpy(k->addr, l->addr, 16);
	struct up_ep_ref *r = bpf_map_lookup_elem(&ep_by_ip, k);
	if (!r || r->id != id)
		return 0;
	return r->used_ns ? r->used_ns : l->learned_ns;
}

/* Learns the target of an endpoint's duplicate address detection (an NS from
 * ::), which is how SLAAC, privacy and link-local addresses announce
 * themselves: the kernel runs DAD for each before using it. Never an
 * address that is registered or learnt by anyone on this parent, a node
 * address, a steered or service address, or one seen on the wire in ND or
 * router advertisements (the router's link-local). At most UP_MAX_LEARNED
 * per endpoint: the least recently used one is given up. */
static __noinline void learn_address(struct up_endpoint *ep, __u32 id, const struct up_ip_key *t)
{
	if (t->addr[0] == 0xff || is_unspecified(t) || eui64_link_local(t, ep->mac))
		return; /* the EUI-64 link-local is the endpoint's without a slot */
	if (in_set(PREFILTER_HOST, t, 0) || in_set(PREFILTER_SVC, t, 0))
		return;
	struct up_ep_ip_key k = {.parent_ifindex = ep->parent_ifindex};
	__builtin_memcpy(k.addr, t->addr, 16);
	if (bpf_map_lookup_elem(&wire_addrs, &k))
		return;
	if (bpf_map_lookup_elem(&ep_by_ip, &k))
		return;

	/* A free slot, else the least recently used learnt address. Two passes
	 * (the oldest use, then the first slot that has it) so that the
	 * verifier does not carry a different slot number down every path. */
	struct up_ep_ip_key ok = {.parent_ifindex = ep->parent_ifindex};
	__u64 oldest = ~0ULL;
#pragma clang loop unroll(disable)
	for (__u32 i = 0; i < UP_MAX_LEARNED; i++) {
		__u64 used = slot_used(ep, i, id, &ok);
		if (used < oldest)
			oldest = used;
	}
	__u32 slot = UP_MAX_LEARNED;
#pragma clang loop unroll(disable)
	for (__u32 i = 0; i < UP_MAX_LEARNED; i++) {
		if (slot_used(ep, i, id, &ok) == oldest) {
			slot = i;
			break;
		}
	}
	if (slot >= UP_MAX_LEARNED)
		return;
	struct up_learned *l = &ep->learned[slot];
	if (l->learned_ns) {
		__builtin_memcpy(ok.addr, l->addr, 16);
		struct up_ep_ref *r = bpf_map_lookup_elem(&ep_by_ip, &ok);
		if (r && r->id == id && (r->flags & UP_REF_LEARNED))
			bpf_map_delete_elem(&ep_by_ip, &ok);
	}
	__u64 now = up_now();
	struct up_ep_ref ref = {.id = id, .flags = UP_REF_LEARNED, .used_ns = now};
	if (bpf_map_update_elem(&ep_by_ip, &k, &ref, BPF_NOEXIST))
		return;
	__builtin_memcpy(l->addr, t->addr, 16);
	l->learned_ns = now;
	count(UP_STAT_LEARNED, 1);
}

/* The link-layer address options of an NS (source) or NA (target) must be
 * the endpoint's MAC, or a pod could point its neighbours' caches at another
 * host. Walks at most 4 options; more is not vetted. */
static __always_inline int nd_options_ok(struct __sk_buff *skb, const struct pkt *p, const __u8 *mac)
{
	__u32 off = p->l4off + sizeof(struct icmp6_nd);
#pragma clang loop unroll(disable)
	for (int i = 0; i < 4; i++) {
		struct nd_opt_ll o;
		if (off > 1024)
			return 0;
		if (LOAD_HDR(skb, off, &o))
			return 1; /* no room for another link-layer option: done */
		if (o.len == 0)
			return 0;
		if ((o.type == ND_OPT_SOURCE_LL || o.type == ND_OPT_TARGET_LL) && !mac_eq(o.mac, mac))
			return 0;
		off += o.len * 8;
	}
	__u8 more;
	if (off > 1024)
		return 0;
	return LOAD_HDR(skb, off, &more) != 0;
}

/* 0 when endpoint ep (id) may send this frame, else the drop reason in
 * *reason. Fills *p. learn: learn the target of its DAD. Fails closed:
 * whatever cannot be vetted is refused. */
/* The source guard proper: a global function, so that the verifier checks
 * it once rather than at every call site (its branches multiplied with
 * parent_egress's would exceed the verifier's budget). Returns the drop
 * reason, UP_DROP_MAX when the frame may go. */
__noinline int up_vet_source(struct __sk_buff *skb, const struct ethhdr *eth, struct up_endpoint *ep,
			     struct pkt *p, int learn)
{
	if (!skb || !eth || !ep || !p)
		return UP_DROP_UNVETTED;
	__u32 id = ep->id;
	__u32 reason = UP_DROP_SPOOFED_SOURCE;
	if (!mac_eq(eth->h_source, ep->mac))
		return reason;
	reason = UP_DROP_UNVETTED;
	__u16 proto = bpf_ntohs(eth->h_proto);
	if (proto != ETH_P_IP && proto != ETH_P_IPV6 && proto != ETH_P_ARP)
		return reason; /* VLAN tags (802.1Q/ad) and every other ethertype */
	if (!parse_l3(skb, proto, p))
		return reason; /* truncated, or ARP for other hardware */
	/* More extension headers than parse_l3 walks: what they hide (ND, a
	 * router advertisement) could not be vetted (RFC 7113's RA-guard
	 * evasion). No pod's stack sends that many. */
	if (proto == ETH_P_IPV6 && ext6_header(p->l4proto))
		return reason;
	/* A first fragment that ends before its ICMPv6 header (extension
	 * headers fill it): what it starts could be ND, unvetted (RFC 7113). */
	if (proto == ETH_P_IPV6 && p->l4proto == IPPROTO_ICMPV6 && p->first_frag && !p->icmp6_type)
		return reason;
	__u32 parent = ep->parent_ifindex;

	if (proto == ETH_P_ARP) {
		if (p->arp_op != ARPOP_REQUEST && p->arp_op != ARPOP_REPLY)
			return reason;
		reason = UP_DROP_SPOOFED_SOURCE;
		if (!mac_eq(p->arp_sha, ep->mac))
			return reason;
		/* 0.0.0.0 is an ARP probe (RFC 5227), but not for an address
		 * another endpoint holds: it would fail that endpoint's own
		 * conflict detection, as a DAD probe would (below). */
		if (is_unspecified(&p->saddr)) {
			__u32 holder = ep_by_ip_on(&p->target, parent);
			return holder && holder != id ? reason : UP_DROP_MAX;
		}
		if (!owns(id, parent, &p->saddr))
			return reason;
		return UP_DROP_MAX;
	}
	if (proto == ETH_P_IPV6 && p->icmp6_type) {
		__u8 t = p->icmp6_type;
		/* Pods are not routers: no router advertisements or redirects.
		 * ND never needs extension headers; hiding it behind them is
		 * refused. */
		if (t == ICMPV6_ND_RA || t == ICMPV6_ND_REDIRECT)
			return reason;
		if (p->ext6 && t >= ICMPV6_ND_RS && t <= ICMPV6_ND_REDIRECT)
			return reason;
		if (p->nd_type) {
			reason = UP_DROP_SPOOFED_SOURCE;
			if (!nd_options_ok(skb, p, ep->mac))
				return reason;
			if (p->nd_type == ICMPV6_ND_NA && !eui64_link_local(&p->target, ep->mac) &&
			    !owns(id, parent, &p->target))
				return reason;
			if (p->nd_type == ICMPV6_ND_NS && is_unspecified(&p->saddr)) {
				/* DAD for an address another endpoint holds:
				 * that endpoint's own DAD would fail on it
				 * (RFC 4862 5.4.3), so a pod could keep the
				 * address IPAM gave another from ever working. */
				__u32 holder = ep_by_ip_on(&p->target, parent);
				if (!holder)
					holder = eui64_owner(&p->target, parent);
				if (holder && holder != id)
					return reason;
				/* No stack runs DAD for ::, ::1 or an IPv4-mapped
				 * or -compatible address, which share the IPv4
				 * addresses' keys: learnt, it would let the pod
				 * send, and answer ARP, as any IPv4 address. */
				if (embeds_ipv4(&p->target))
					return reason;
				if (learn)
					learn_address(ep, id, &p->target);
				return UP_DROP_MAX;
			}
		}
	}
	reason = UP_DROP_SPOOFED_SOURCE;
	/* Unspecified sources: DHCP discovery, DAD. */
	if (is_unspecified(&p->saddr) || eui64_link_local(&p->saddr, ep->mac))
		return UP_DROP_MAX;
	if (!owns(id, parent, &p->saddr))
		return reason;
	return UP_DROP_MAX;
}


/* An advertised binding of addr to mac (ARP's sender, an ND link-layer
 * option) from an unvetted sender (see up_vet_advertised) may name an
 * endpoint's MAC only for that endpoint's own address: a proxy or a
 * router may tell a pod where another pod is, but nobody may point a pod
 * at another pod for an address that is not that pod's.
 * A global function (its arguments structs, as those of global functions
 * must be): in nd_vet's loop, inlined, its branches took the verifier to
 * 400k instructions. */
__noinline int up_binding_ok(const struct nd_opt_ll *o, const struct up_ip_key *addr, const struct ethhdr *eth,
			     __u32 parent)
{
	if (!o || !addr || !eth)
		return 0;
	if (mac_eq(o->mac, eth->h_source))
		return 1; /* the sender's own (not an endpoint's: vetted as one otherwise) */
	__u32 id = ep_by_mac_on(o->mac, parent);
	if (!id || is_unspecified(addr) || eui64_link_local(addr, o->mac))
		return 1;
	/* Not owns(): that marks a learnt address used, which only the
	 * endpoint's own sending may. */
	return own_ref(id, parent, addr) != NULL;
}

/* Is addr an endpoint's (registered, learnt, or its EUI-64 link-local)? */
static __always_inline int endpoint_addr(const struct up_ip_key *addr, __u32 parent)
{
	return ep_by_ip_on(addr, parent) || eui64_owner(addr, parent);
}

/* An ICMP redirect from an unvetted sender may not name an endpoint as the
 * better first hop: pods are not routers (their guard refuses what they
 * would forward), and a pod's neighbour told so (accept_redirects is on by
 * default, and the redirect's source is easily the gateway's) sends it
 * the traffic. */
static __always_inline int redirect4_ok(struct __sk_buff *skb, const struct pkt *p, __u32 parent)
{
	struct {
		__u8 type, code;
		__u16 csum;
		__u8 gw[4];
		__u8 quoted[20]; /* the IPv4 header of what was redirected */
	} ic;
	if (!p->first_frag || bpf_skb_load_bytes(skb, p->l4off, &ic, sizeof(ic)) || ic.type != 5)
		return 1;
	/* To the destination itself: "it is on-link" (a router's true
	 * redirect between subnets on one L2), as for IPv6 in nd_vet. */
	if (ic.gw[0] == ic.quoted[16] && ic.gw[1] == ic.quoted[17] && ic.gw[2] == ic.quoted[18] && ic.gw[3] == ic.quoted[19])
		return 1;
	struct up_ip_key gw;
	map_v4(&gw, ic.gw);
	return !endpoint_addr(&gw, parent);
}

/* The ND of an unvetted sender: router advertisements not from an
 * endpoint's address, redirects not to an endpoint as a router (as above;
 * to the destination itself, "it is on-link", is fine), and link-layer
 * options that bind only true addresses (up_binding_ok): for RS, RA and NS
 * the source, for NA and redirects the target. The kernel reads every
 * option; this walks up to 32 within the IPv6 payload (end), and refuses
 * more. */
static __always_inline int nd_vet(struct __sk_buff *skb, const struct pkt *p, const struct ethhdr *eth, __u32 parent,
				  __u32 end)
{
	__u8 t = p->icmp6_type;
	struct up_ip_key bound = p->saddr;
	__u32 off = p->l4off + (t == ICMPV6_ND_RS ? 8 : t == ICMPV6_ND_RA ? 16 : 24);
	if (t == ICMPV6_ND_RA && endpoint_addr(&p->saddr, parent))
		return UP_DROP_SPOOFED_SOURCE;
	if (t == ICMPV6_ND_NA)
		bound = p->target;
	if (t == ICMPV6_ND_REDIRECT) {
		struct up_ip_key dst;
		if (bpf_skb_load_bytes(skb, p->l4off + 8, bound.addr, 16) ||
		    bpf_skb_load_bytes(skb, p->l4off + 24, dst.addr, 16))
			return UP_DROP_MAX; /* too short: the kernel drops it */
		if (!addr_eq(bound.addr, dst.addr) && endpoint_addr(&bound, parent))
			return UP_DROP_SPOOFED_SOURCE;
		off = p->l4off + 40;
	}
#pragma clang loop unroll(disable)
	for (int i = 0; i < 32; i++) {
		struct nd_opt_ll o;
		if (off + sizeof(o) > end)
			return UP_DROP_MAX; /* all walked */
		/* The helper, not LOAD_HDR: its two ways through, 32 times
		 * over, cost the verifier more than the loop is worth. */
		if (bpf_skb_load_bytes(skb, off, &o, sizeof(o)) || o.len == 0)
			return UP_DROP_MAX; /* options the kernel refuses */
		if ((o.type == ND_OPT_SOURCE_LL || o.type == ND_OPT_TARGET_LL) && !up_binding_ok(&o, &bound, eth, parent))
			return UP_DROP_SPOOFED_SOURCE;
		off += o.len * 8;
	}
	return off < end ? UP_DROP_UNVETTED : UP_DROP_MAX;
}

/* A frame a macvlan pod receives from a MAC that is no endpoint's on its
 * parent: the wire, the node, a slave underpass does not know, or a pod
 * that skipped its own filter (PACKET_QDISC_BYPASS, which CAP_NET_RAW
 * allows) and made its MAC up, which no parent-side check sees on the
 * way from slave to slave. Who sent it cannot be vetted, but what would
 * steer the pod's traffic to another endpoint is: ARP and ND that bind an
 * address to an endpoint's MAC that is not that endpoint's (the pod's
 * gateway entry pointed at an attacker), router advertisements from an
 * endpoint's address, ICMP redirects to an endpoint. What this cannot
 * parse, of what the kernel could take as ARP or ND, is refused. *p is
 * filled for ARP, ICMP and ICMPv6. Returns the drop reason, UP_DROP_MAX
 * when the frame may pass. A global function, verified once. */
__noinline int up_vet_advertised(struct __sk_buff *skb, const struct ethhdr *eth, __u32 parent, struct pkt *p)
{
	if (!skb || !eth || !p)
		return UP_DROP_MAX;
	__u16 proto = bpf_ntohs(eth->h_proto);
	/* A tag the kernel left for this hook: it takes a priority tag
	 * (VID 0) off the frame inside after the hook, without running the
	 * hook again. A pod has no use for tagged frames (its guard refuses
	 * the ones it would send). */
	if (proto == ETH_P_8021Q || proto == ETH_P_8021AD)
		return UP_DROP_UNVETTED;
	__u16 plen = 0;
	if (proto == ETH_P_IP) {
		__u8 l4;
		if (LOAD_HDR(skb, ETH_HLEN + offsetof(struct iphdr, protocol), &l4) || l4 != IPPROTO_ICMP)
			return UP_DROP_MAX;
	} else if (proto == ETH_P_IPV6) {
		/* Most of what comes in: TCP or UDP, with no extension
		 * header to look behind. */
		__u8 next;
		if (LOAD_HDR(skb, ETH_HLEN + offsetof(struct ipv6hdr, nexthdr), &next) || next == IPPROTO_TCP ||
		    next == IPPROTO_UDP)
			return UP_DROP_MAX;
		if (LOAD_HDR(skb, ETH_HLEN + offsetof(struct ipv6hdr, payload_len), &plen))
			return UP_DROP_MAX;
	} else if (proto != ETH_P_ARP) {
		return UP_DROP_MAX;
	}
	if (!parse_l3(skb, proto, p))
		return proto == ETH_P_IP ? UP_DROP_MAX : UP_DROP_UNVETTED;
	if (proto == ETH_P_ARP) {
		struct nd_opt_ll sha = {};
		__builtin_memcpy(sha.mac, p->arp_sha, ETH_ALEN);
		return up_binding_ok(&sha, &p->saddr, eth, parent) ? UP_DROP_MAX : UP_DROP_SPOOFED_SOURCE;
	}
	if (proto == ETH_P_IP)
		return redirect4_ok(skb, p, parent) ? UP_DROP_MAX : UP_DROP_SPOOFED_SOURCE;
	/* ND hidden behind more extension headers than parse_l3 walks. */
	if (ext6_header(p->l4proto))
		return UP_DROP_UNVETTED;
	__u8 t = p->icmp6_type;
	if (p->l4proto != IPPROTO_ICMPV6 || !p->first_frag || t < ICMPV6_ND_RS || t > ICMPV6_ND_REDIRECT)
		return UP_DROP_MAX;
	return nd_vet(skb, p, eth, parent, ETH_HLEN + sizeof(struct ipv6hdr) + bpf_ntohs(plen));
}

static __always_inline int vet_source(struct __sk_buff *skb, const struct ethhdr *eth, struct up_endpoint *ep,
				      __u32 id, struct pkt *p, int learn, __u32 *reason)
{
	/* ep->id is id: the registry keeps the two equal. */
	*reason = up_vet_source(skb, eth, ep, p, learn);
	return *reason != UP_DROP_MAX;
}

/* ---- parent NIC ------------------------------------------------------------- */

static __always_inline int host_blocked(const struct up_config *cfg)
{
	return cfg && (cfg->flags & UP_CFG_HOST_BLOCKED);
}

/* flow_key fills k for the frame's L4 flow as the endpoint's reply carries
 * it (see svc_flows); from_host: the frame goes host -> endpoint. Only
 * TCP, UDP and SCTP first fragments have one. */
static __always_inline int flow_key(struct __sk_buff *skb, const struct pkt *p, int from_host,
				    struct up_flow_key *k)
{
	if (!p->first_frag || (p->l4proto != IPPROTO_TCP && p->l4proto != IPPROTO_UDP && p->l4proto != IPPROTO_SCTP))
		return 0;
	__u16 ports[2]; /* source, destination: the same place in all three */
	if (bpf_skb_load_bytes(skb, p->l4off, ports, sizeof(ports)))
		return 0;
	__builtin_memset(k, 0, sizeof(*k));
	k->l4proto = p->l4proto;
	if (from_host) {
		__builtin_memcpy(k->local, p->saddr.addr, 16);
		__builtin_memcpy(k->peer, p->daddr.addr, 16);
		k->local_port = ports[0];
		k->peer_port = ports[1];
	} else {
		__builtin_memcpy(k->local, p->daddr.addr, 16);
		__builtin_memcpy(k->peer, p->saddr.addr, 16);
		k->local_port = ports[1];
		k->peer_port = ports[0];
	}
	return 1;
}

/* A masqueraded Service flow into an endpoint (steered in with
 * UP_MARK_STEERED, DNATed or IPVS-forwarded, masqueraded to the host's
 * address): remember it, so that its replies pass hostReachability: false. */
static __always_inline void note_svc_flow(struct __sk_buff *skb, const struct pkt *p)
{
	struct up_flow_key k;
	if (!(skb->mark & UP_MARK_STEERED) || !flow_key(skb, p, 1, &k))
		return;
	if (bpf_map_lookup_elem(&svc_flows, &k))
		return;
	__u64 now = up_now();
	bpf_map_update_elem(&svc_flows, &k, &now, BPF_ANY);
}

/* Whether an endpoint's frame to the host's address answers a Service flow
 * the host forwarded into it (note_svc_flow). */
static __always_inline int svc_reply(struct __sk_buff *skb, const struct pkt *p)
{
	struct up_flow_key k;
	return flow_key(skb, p, 0, &k) && bpf_map_lookup_elem(&svc_flows, &k);
}

/* Whether the frame belongs to a flow a pod's own program translated to a
 * backend on the host (services.mode ebpf): svc_rev holds its reply
 * direction. to_host: the frame goes pod -> host (the host is the
 * destination), else host -> pod. hostReachability: false lets these
 * through, as it lets kube-proxy's Service flows through. */
static __always_inline int svc_translated(struct __sk_buff *skb, const struct pkt *p, int to_host)
{
	if (!p->first_frag || (p->l4proto != IPPROTO_TCP && p->l4proto != IPPROTO_UDP && p->l4proto != IPPROTO_SCTP))
		return 0;
	__u16 ports[2];
	if (bpf_skb_load_bytes(skb, p->l4off, ports, sizeof(ports)))
		return 0;
	struct up_rev_key rk = {.l4proto = p->l4proto};
	if (to_host) {
		__builtin_memcpy(rk.backend, p->daddr.addr, 16);
		__builtin_memcpy(rk.client, p->saddr.addr, 16);
		rk.backend_port = ports[1];
		rk.client_port = ports[0];
	} else {
		__builtin_memcpy(rk.backend, p->saddr.addr, 16);
		__builtin_memcpy(rk.client, p->daddr.addr, 16);
		rk.backend_port = ports[0];
		rk.client_port = ports[1];
	}
	return bpf_map_lookup_elem(&svc_rev, &rk) != 0;
}

/* Why an endpoint frame enters the host stack. */
enum to_host {
	TO_HOST_STEERED = 0,    /* a steered host CIDR */
	TO_HOST_DIRECT = 1,     /* one of the host's own addresses */
	TO_HOST_RESOLUTION = 2, /* ARP/ND for the host */
	TO_HOST_SERVICE = 3,    /* a live Service VIP (steered too) */
};

/* readdress: give the frame the parent's MAC (steered by destination IP). */
static __always_inline int endpoint_to_host(struct __sk_buff *skb, const struct up_config *cfg, const struct pkt *p,
					    __u32 ep_id, __u32 why, int readdress, const __u8 *parent_mac)
{
	__u32 len = skb->len;
	/* hostReachability: false cuts the endpoint's own traffic to the
	 * host's addresses; Services (including a backend's replies to the
	 * masqueraded flows the host forwarded to it), steered host CIDRs and
	 * resolution go on. */
	if (why == TO_HOST_DIRECT && host_blocked(cfg) && !svc_reply(skb, p) && !svc_translated(skb, p, 1)) {
		count_drop(UP_DROP_HOST_UNREACHABLE, ep_id, len);
		return TC_ACT_SHOT;
	}
	if (readdress) {
		if (bpf_skb_store_bytes(skb, 0, parent_mac, ETH_ALEN, 0))
			return TC_ACT_UNSPEC;
		count(UP_STAT_STEERED, len);
	}
	count(UP_STAT_EP_TO_HOST, len);
	count_ep(ep_id, ep_to_host, len);
	/* The mark tells the agent's nftables rules which forwarded flows to
	 * masquerade (see up_marks); anything else enters unmarked, so a mark
	 * the pod set never reaches the host. */
	__u32 mark = 0;
	if (why == TO_HOST_STEERED)
		mark = UP_MARK_STEERED;
	else if (why == TO_HOST_SERVICE)
		mark = UP_MARK_STEERED | UP_MARK_SERVICE;
	return to_ingress_marked(skb, ep_id, mark);
}

/* hostReachability: false cuts the host's own traffic to endpoints, not
 * what the host forwards or answers on behalf of a Service: resolution,
 * frames the host forwards (a Service flow DNATed to a backend pod, the
 * wire routed through the node), and frames from a Service VIP or a steered
 * host CIDR (kube-proxy's de-NATed replies, node-local DNS). */
static __always_inline int host_may_reach(const struct __sk_buff *skb, const struct up_config *cfg,
					  const struct pkt *p)
{
	if (!host_blocked(cfg))
		return 1;
	if (p->proto == ETH_P_ARP || p->nd_type)
		return 1;
	if (skb->ingress_ifindex)
		return 1;
	if (in_set(PREFILTER_SVC, &p->saddr, 0))
		return 1;
	__u32 flags = 0;
	if (in_set(PREFILTER_HOST, &p->saddr, &flags) && (flags & UP_HOST_STEER))
		return 1;
	return svc_translated((struct __sk_buff *)skb, p, 0);
}

/* dst_mac, when set, readdresses the frame first (ipvlan: see parent_egress). */
static __always_inline int host_to_endpoint(struct __sk_buff *skb, const struct up_config *cfg,
					    const struct pkt *p, __u32 ep_id, const __u8 *dst_mac)
{
	__u32 len = skb->len;
	if (!host_may_reach(skb, cfg, p)) {
		count_drop(UP_DROP_HOST_UNREACHABLE, ep_id, len);
		return TC_ACT_SHOT;
	}
	if (host_blocked(cfg) && skb->ingress_ifindex)
		note_svc_flow(skb, p);
	if (dst_mac && bpf_skb_store_bytes(skb, 0, dst_mac, ETH_ALEN, 0))
		return TC_ACT_UNSPEC;
	count(UP_STAT_HOST_TO_EP, len);
	count_ep(ep_id, host_to_ep, len);
	return to_ingress(skb, ep_id);
}

/* Broadcast ARP and multicast ND: the kernel never shows the parent's own
 * transmissions to its slaves, nor a slave's to the host, so a request for a
 * local address gets a copy into the receive path. A slave asking for another
 * slave is skipped: macvlan bridge mode delivered that already.
 *
 * A slave's request for the host goes in as a unicast to the parent's MAC:
 * macvlan hands that to the host alone. As a broadcast, macvlan would reflect
 * a private slave's copy back to that slave only (the host never answered a
 * private pod that spoke first) and show a bridge slave's to VEPA slaves. */
static __always_inline void clone_resolution(struct __sk_buff *skb, const struct pkt *p, __u32 src_ep,
					     __u32 ifindex, const struct ethhdr *eth, const __u8 *parent_mac)
{
	__u32 stat = p->proto == ETH_P_ARP ? UP_STAT_ARP_CLONED : UP_STAT_ND_CLONED;
	if (src_ep) {
		__u32 flags = 0;
		if (!in_set(PREFILTER_HOST, &p->target, &flags) || !(flags & UP_HOST_LOCAL))
			return;
		if (bpf_skb_store_bytes(skb, 0, parent_mac, ETH_ALEN, 0))
			return;
		clone_to_ingress(skb, stat);
		bpf_skb_store_bytes(skb, 0, eth->h_dest, ETH_ALEN, 0);
		return;
	}
	if (ep_by_ip_on(&p->target, ifindex))
		clone_to_ingress(skb, stat);
}

SEC("tc")
int parent_egress(struct __sk_buff *skb)
{
	__u32 ifindex = skb->ifindex;
	struct up_parent *parent = parent_of(ifindex);
	if (!parent)
		return TC_ACT_UNSPEC;

	struct ethhdr eth;
	if (LOAD_HDR(skb, 0, &eth))
		return TC_ACT_UNSPEC;
	__u16 proto = bpf_ntohs(eth.h_proto);
	struct up_config *cfg = get_config();
	int macvlan = parent->mode == UP_MODE_MACVLAN;
	int from_parent_mac = mac_eq(eth.h_source, parent->mac);
	int to_parent_mac = mac_eq(eth.h_dest, parent->mac);
	struct pkt p;

	/* Who sent it: a macvlan slave has its own MAC; ipvlan slaves share the
	 * parent's, so their source IP tells. */
	__u32 src_ep = 0;
	if (macvlan && !from_parent_mac)
		src_ep = ep_by_mac_on(eth.h_source, ifindex);
	if (src_ep) {
		/* Vetted here as well as on the slave: a pod can skip its own
		 * egress hook (PACKET_QDISC_BYPASS, AF_XDP, tc with NET_ADMIN)
		 * but every frame it sends off its slave passes here. */
		struct up_endpoint *ep = bpf_map_lookup_elem(&endpoints, &src_ep);
		__u32 reason = UP_DROP_UNVETTED;
		if (!ep || vet_source(skb, &eth, ep, src_ep, &p, 1, &reason)) {
			count_drop(reason, src_ep, skb->len);
			return TC_ACT_SHOT;
		}
	} else {
		/* VLAN-tagged frames of the host belong to a VLAN device's own
		 * parent program: a slave on eth0.100 has eth0.100 as its parent. */
		if (proto == ETH_P_8021Q || proto == ETH_P_8021AD)
			return TC_ACT_UNSPEC;
		if (!parse_l3(skb, proto, &p))
			return TC_ACT_UNSPEC;
		if (!macvlan && from_parent_mac)
			src_ep = ep_by_ip_on(&p.saddr, ifindex);
	}

	if (is_multicast(eth.h_dest)) {
		if ((proto == ETH_P_ARP && p.arp_op == ARPOP_REQUEST) || p.nd_type == ICMPV6_ND_NS)
			clone_resolution(skb, &p, src_ep, ifindex, &eth, parent->mac);
		return TC_ACT_UNSPEC;
	}

	if (proto != ETH_P_ARP) {
		int svc = classify_service(cfg, &p);
		if (svc == SVC_STALE) {
			/* Attribute host-forwarded pod traffic to the pod too. */
			__u32 id = src_ep ? src_ep : ep_by_ip_on(&p.saddr, ifindex);
			return handle_stale(skb, cfg, &p, id);
		}
		if (src_ep) {
			if (svc == SVC_LIVE)
				return endpoint_to_host(skb, cfg, &p, src_ep, TO_HOST_SERVICE, !to_parent_mac, parent->mac);
			__u32 flags = 0;
			if (in_set(PREFILTER_HOST, &p.daddr, &flags)) {
				if (flags & UP_HOST_STEER)
					return endpoint_to_host(skb, cfg, &p, src_ep, TO_HOST_STEERED, !to_parent_mac,
								parent->mac);
				if (flags & UP_HOST_LOCAL)
					return endpoint_to_host(skb, cfg, &p, src_ep, TO_HOST_DIRECT, !to_parent_mac,
								parent->mac);
			}
		}
	}

	if (src_ep) {
		if (!to_parent_mac)
			return TC_ACT_UNSPEC; /* to the wire (or a VEPA/private peer through it) */
		/* To the host, but not for the host: with ip_forward=1 the node
		 * would route it. Only resolution (ARP, ND to the host's
		 * addresses, handled above), link-local and multicast
		 * destinations, which the host never forwards, go in. */
		if (proto == ETH_P_ARP)
			return endpoint_to_host(skb, cfg, &p, src_ep, TO_HOST_RESOLUTION, 0, parent->mac);
		if (p.daddr.addr[0] == 0xff || is_link_local6(&p.daddr))
			return endpoint_to_host(skb, cfg, &p, src_ep, TO_HOST_DIRECT, 0, parent->mac);
		count_drop(UP_DROP_ROUTED, src_ep, skb->len);
		return TC_ACT_SHOT;
	}

	/* From the host (or forwarded by it). ipvlan slaves are found by
	 * destination IP whatever the destination MAC: L3/L3S slaves answer no
	 * ARP/ND, so the host reaches a pod subnet through a route via the
	 * wire gateway and the frame carries the gateway's MAC. It is
	 * readdressed to the parent's MAC, which the slave's stack accepts
	 * (anything else would be PACKET_OTHERHOST there). */
	__u32 dst_ep = 0;
	const __u8 *readdress = 0;
	if (macvlan) {
		dst_ep = ep_by_mac_on(eth.h_dest, ifindex);
	} else if (proto != ETH_P_ARP) {
		dst_ep = ep_by_ip_on(&p.daddr, ifindex);
		if (!to_parent_mac)
			readdress = parent->mac;
	} else if (to_parent_mac) {
		dst_ep = ep_by_ip_on(&p.target, ifindex);
	}
	if (dst_ep)
		return host_to_endpoint(skb, cfg, &p, dst_ep, readdress);
	return TC_ACT_UNSPEC;
}

/* ---- other uplinks: the stale guard alone ----------------------------------- */

SEC("tc")
int uplink_egress(struct __sk_buff *skb)
{
	struct ethhdr eth;
	if (LOAD_HDR(skb, 0, &eth))
		return TC_ACT_UNSPEC;
	__u16 proto = bpf_ntohs(eth.h_proto);
	if (proto != ETH_P_IP && proto != ETH_P_IPV6)
		return TC_ACT_UNSPEC;
	struct pkt p;
	if (!parse_l3(skb, proto, &p))
		return TC_ACT_UNSPEC;
	struct up_config *cfg = get_config();
	if (classify_service(cfg, &p) != SVC_STALE)
		return TC_ACT_UNSPEC;
	/* Traffic the host forwards from a pod came in on the pod's parent
	 * (the hairpin put it there): attribute it to the pod. */
	return handle_stale(skb, cfg, &p, ep_by_ip_on(&p.saddr, skb->ingress_ifindex));
}

/* ---- one endpoint's slave, inside the container netns ----------------------- */

/* What the filters on the slaves run. When the slot is empty (a datapath
 * being removed) the frame passes untouched, as without underpass. */
/* ---- Services translated at the pod (services.mode: ebpf) -------------------
 *
 * A pod's frame to a VIP:port in svc_frontends gets a backend in its own
 * egress program: the destination address and port are rewritten in place
 * (checksums fixed incrementally), and the destination MAC set so that a
 * backend on the same L2 is reached directly. The client's address stays:
 * the backend sees who called. The reply is given the VIP back in the
 * client's ingress program (svc_rev). Nothing goes through the host. */

enum { XLATE_NONE = 0, XLATE_DONE = 1, XLATE_STALE = 2, XLATE_TUPLE_IN_USE = 3, XLATE_FAILED = -1 };

static __always_inline void svc_count(__u32 stat, __u32 len)
{
	struct up_counter *c = bpf_map_lookup_elem(&svc_stats, &stat);
	if (c)
		bump(c, len);
}

/* Where the L4 checksum sits; 0: none that covers the IP header (SCTP's
 * CRC32c covers its own header only). */
static __always_inline __u32 l4_csum_off(const struct pkt *p)
{
	if (p->l4proto == IPPROTO_TCP)
		return p->l4off + 16;
	if (p->l4proto == IPPROTO_UDP)
		return p->l4off + 6;
	return 0;
}

static __always_inline __u64 l4_csum_flags(const struct pkt *p)
{
	/* A UDP checksum of 0 means none (IPv4): it stays 0, and a result of
	 * 0 is written as 0xffff. */
	return p->l4proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
}

/* rewrite_addr replaces the address at off (source or destination) by to,
 * fixing the IPv4 header checksum and the L4 checksum, whose pseudo-header
 * covers the address. */
static __always_inline int rewrite_addr(struct __sk_buff *skb, const struct pkt *p, __u32 off, const __u8 *from,
					const __u8 *to)
{
	__u32 csum = l4_csum_off(p);
	__u64 flags = BPF_F_PSEUDO_HDR | l4_csum_flags(p);
	if (p->proto == ETH_P_IP) {
		__u32 o, n;
		__builtin_memcpy(&o, from + 12, 4);
		__builtin_memcpy(&n, to + 12, 4);
		if (csum && bpf_l4_csum_replace(skb, csum, o, n, flags | 4))
			return -1;
		if (bpf_l3_csum_replace(skb, ETH_HLEN + 10, o, n, 4))
			return -1;
		return bpf_skb_store_bytes(skb, off, &n, 4, 0);
	}
	__u32 o6[4], n6[4];
	__builtin_memcpy(o6, from, 16);
	__builtin_memcpy(n6, to, 16);
	__s64 diff = bpf_csum_diff(o6, 16, n6, 16, 0);
	if (csum && bpf_l4_csum_replace(skb, csum, 0, diff, flags))
		return -1;
	return bpf_skb_store_bytes(skb, off, n6, 16, 0);
}

static __always_inline int rewrite_port(struct __sk_buff *skb, const struct pkt *p, __u32 off, __u16 from, __u16 to)
{
	__u32 csum = l4_csum_off(p);
	if (csum && bpf_l4_csum_replace(skb, csum, from, to, l4_csum_flags(p) | 2))
		return -1;
	return bpf_skb_store_bytes(skb, off, &to, 2, 0);
}

static __always_inline __u32 daddr_off(const struct pkt *p)
{
	return p->proto == ETH_P_IP ? ETH_HLEN + 16 : ETH_HLEN + 24;
}

static __always_inline __u32 saddr_off(const struct pkt *p)
{
	return p->proto == ETH_P_IP ? ETH_HLEN + 12 : ETH_HLEN + 8;
}

/* The next hop for a backend, written as the destination MAC: a macvlan
 * endpoint's own MAC (the driver delivers to the sibling slave); the
 * parent's for the node itself (the parent program hands it to the host).
 * On ipvlan, where every slave has the parent's MAC, the frame's own source
 * MAC makes the driver deliver locally, by address. Otherwise what the
 * pod's neighbour table knows of the backend; when it knows nothing, the
 * frame keeps the pod's choice (its gateway, which routes it on). */
static __always_inline void backend_mac(struct __sk_buff *skb, const struct pkt *p, __u32 parent_ifindex,
					__u32 mode, const struct up_backend *be)
{
	struct up_ip_key a;
	__builtin_memcpy(a.addr, be->addr, 16);
	__u32 hflags = 0;
	__u32 id = ep_by_ip_on(&a, parent_ifindex);
	int host = !id && in_set(PREFILTER_HOST, &a, &hflags) && (hflags & UP_HOST_LOCAL);
	if (id || host) {
		__u8 mac[ETH_ALEN];
		if (mode != UP_MODE_MACVLAN) {
			if (bpf_skb_load_bytes(skb, ETH_ALEN, mac, ETH_ALEN))
				return;
		} else if (id) {
			struct up_endpoint *ep = bpf_map_lookup_elem(&endpoints, &id);
			if (!ep)
				return;
			__builtin_memcpy(mac, ep->mac, ETH_ALEN);
		} else {
			struct up_parent *par = parent_of(parent_ifindex);
			if (!par)
				return;
			__builtin_memcpy(mac, par->mac, ETH_ALEN);
		}
		bpf_skb_store_bytes(skb, 0, mac, ETH_ALEN, 0);
		return;
	}
	struct bpf_fib_lookup f = {};
	f.ifindex = skb->ifindex;
	if (p->proto == ETH_P_IP) {
		f.family = 2; /* AF_INET */
		__builtin_memcpy(&f.ipv4_src, p->saddr.addr + 12, 4);
		__builtin_memcpy(&f.ipv4_dst, be->addr + 12, 4);
	} else {
		f.family = 10; /* AF_INET6 */
		__builtin_memcpy(f.ipv6_src, p->saddr.addr, 16);
		__builtin_memcpy(f.ipv6_dst, be->addr, 16);
	}
	if (bpf_fib_lookup(skb, &f, sizeof(f), BPF_FIB_LOOKUP_OUTPUT) == BPF_FIB_LKUP_RET_SUCCESS &&
	    f.ifindex == skb->ifindex)
		bpf_skb_store_bytes(skb, 0, f.dmac, ETH_ALEN, 0);
}

/* same_backend says whether be is the backend addr:port names. */
static __always_inline int same_backend(const struct up_backend *be, const __u8 *addr, __u16 port)
{
	return be && be->port == port && addr_eq(be->addr, addr);
}

/* A new flow's backend: the client's previous one under sessionAffinity
 * (while it is recent and the Service has not changed since: a changed
 * set may have dropped it, or kept it only for its open flows), else a
 * random slot of the current set. 0: none (a slot missing mid-update). */
static __always_inline __u32 pick_backend(const struct up_svc *svc, const __u8 *client, __u64 now)
{
	struct up_affinity_key ak = {.svc_id = svc->id};
	__builtin_memcpy(ak.client, client, 16);
	int affinity = svc->flags & UP_SVC_AFFINITY;
	if (affinity) {
		struct up_affinity *af = bpf_map_lookup_elem(&svc_affinity, &ak);
		if (af && af->gen == svc->gen && since(now, af->seen_ns) < (__u64)svc->affinity_sec * 1000000000ULL) {
			__u32 id = af->backend_id;
			if (same_backend(bpf_map_lookup_elem(&svc_backends, &id), af->addr, af->port)) {
				af->seen_ns = now;
				return id;
			}
		}
	}
	/* Never the client itself: its own reply would not pass its slave
	 * (the kernel answers itself over loopback), so the client would see
	 * its own address answer, not the VIP. The next slot instead; a
	 * Service whose only backend is the client is left to the host. */
	__u16 slot = bpf_get_prandom_u32() % svc->count;
	__u32 bid = 0;
	struct up_backend *be = 0;
#pragma clang loop unroll(disable)
	for (int i = 0; i < 2; i++) {
		struct up_slot_key k = {.svc_id = svc->id, .slot = slot, .rev = svc->rev};
		__u32 *id = bpf_map_lookup_elem(&svc_slots, &k);
		if (!id)
			return 0;
		bid = *id;
		be = bpf_map_lookup_elem(&svc_backends, &bid);
		if (!be)
			return 0;
		if (!addr_eq(be->addr, client))
			break;
		if (i == 1 || svc->count < 2)
			return 0;
		slot = (slot + 1) % svc->count;
	}
	if (affinity && be) {
		struct up_affinity af = {.backend_id = bid, .gen = svc->gen, .seen_ns = now, .port = be->port};
		__builtin_memcpy(af.addr, be->addr, 16);
		bpf_map_update_elem(&svc_affinity, &ak, &af, BPF_ANY);
	}
	return bid;
}

/* Is rv there, and (when own) this flow's, to vip:vport? */
static __always_inline int rev_is(const struct up_rev *rv, int own, const __u8 *vip, __u16 vport)
{
	return rv && (!own || (rv->vport == vport && addr_eq(rv->vip, vip)));
}

/* Is the tuple client:port -> b free for the new flow ck? Not if another
 * live translated flow has it: one from the same client port through
 * another VIP or VIP port to the same backend. Two Services with the same
 * backends, or one Service's two ports with one target port, make that
 * happen by chance: connect() keeps a source port unique per destination,
 * and the destinations are the VIPs (one unconnected UDP socket sends to
 * both from its one port). The backend sees one tuple, so a second TCP
 * connection cannot work, and with its reply entry written over the first
 * one's replies would come from the wrong VIP and be reset.
 * up_svc_repick takes another backend when there is one. ck is borrowed as the other flow's key and given back: up_svc_xlate, which
 * inlines this, has no stack for another key. */
static __always_inline int tuple_free(struct up_ct_key *ck, const struct up_backend *b, __u64 now)
{
	struct up_rev *rv;
	__u8 vip[16];
	{
		struct up_rev_key rk = {.backend_port = b->port, .client_port = ck->client_port, .l4proto = ck->l4proto};
		__builtin_memcpy(rk.backend, b->addr, 16);
		__builtin_memcpy(rk.client, ck->client, 16);
		rv = bpf_map_lookup_elem(&svc_rev, &rk);
	}
	if (!rv || rev_is(rv, 1, ck->vip, ck->vport))
		return 1; /* nobody's, or this flow's own */
	__u16 vport = ck->vport;
	__builtin_memcpy(vip, ck->vip, 16);
	ck->vport = rv->vport;
	__builtin_memcpy(ck->vip, rv->vip, 16);
	struct up_ct *ct = bpf_map_lookup_elem(&svc_ct, ck);
	ck->vport = vport;
	__builtin_memcpy(ck->vip, vip, 16);
	/* The other flow is gone, went to another backend since, or ended
	 * (a RST, or a FIN each way: half-closed, it still carries data). */
	if (!ct || ct->port != b->port || !addr_eq(ct->addr, b->addr))
		return 1;
	__u8 end = ct->flags & (UP_CT_RESET | UP_CT_FIN_CLIENT | UP_CT_FIN_BACKEND);
	if ((end & UP_CT_RESET) || end == (UP_CT_FIN_CLIENT | UP_CT_FIN_BACKEND))
		return 1;
	return since(now, ct->seen_ns) > (ck->l4proto == IPPROTO_TCP ? SVC_TCP_HOLD_NS : SVC_UDP_IDLE_NS);
}

static __always_inline void frag_key(struct up_frag_key *k, const struct pkt *p, __u8 reply)
{
	__builtin_memset(k, 0, sizeof(*k));
	k->reply = reply;
	__builtin_memcpy(k->saddr, p->saddr.addr, 16);
	__builtin_memcpy(k->daddr, p->daddr.addr, 16);
	k->id = p->frag_id;
	k->l4proto = p->l4proto;
}

/* The first fragment of a translated datagram (or reply) tells the rest
 * where to go: from (the address the fragments carry now) becomes to. */
static __always_inline void note_frags(const struct pkt *p, __u8 reply, const __u8 *to, __u16 port, __u32 svc_id)
{
	if (!p->more_frags)
		return;
	struct up_frag_key k;
	frag_key(&k, p, reply);
	struct up_frag v = {.port = port, .svc_id = svc_id};
	__builtin_memcpy(v.addr, to, 16);
	bpf_map_update_elem(&svc_frags, &k, &v, BPF_ANY);
}

/* rewrite_l3 replaces an address in the IP header only: a fragment after
 * the first carries no L4 header whose checksum would cover it. */
static __always_inline int rewrite_l3(struct __sk_buff *skb, const struct pkt *p, __u32 off, const __u8 *from,
				      const __u8 *to)
{
	if (p->proto == ETH_P_IP) {
		__u32 o, n;
		__builtin_memcpy(&o, from + 12, 4);
		__builtin_memcpy(&n, to + 12, 4);
		if (bpf_l3_csum_replace(skb, ETH_HLEN + 10, o, n, 4))
			return -1;
		return bpf_skb_store_bytes(skb, off, &n, 4, 0);
	}
	return bpf_skb_store_bytes(skb, off, to, 16, 0);
}

/* A fragment after the first of a datagram whose first fragment was
 * translated (svc_frags): to the same backend. */
static __always_inline int svc_xlate_frag(struct __sk_buff *skb, const struct pkt *p, __u32 parent_ifindex, __u32 mode)
{
	struct up_frag_key k;
	frag_key(&k, p, 0);
	struct up_frag *f = bpf_map_lookup_elem(&svc_frags, &k);
	if (!f)
		return XLATE_NONE;
	struct up_backend b = {.port = f->port};
	__builtin_memcpy(b.addr, f->addr, 16);
	__u32 sid = f->svc_id;
	if (rewrite_l3(skb, p, daddr_off(p), k.daddr, b.addr))
		return XLATE_FAILED;
	backend_mac(skb, p, parent_ifindex, mode, &b);
	svc_count(UP_SVC_STAT_TRANSLATED, skb->len);
	struct up_svc_counters *sc = bpf_map_lookup_elem(&svc_counters, &sid);
	if (sc)
		bump(&sc->to_backend, skb->len);
	return XLATE_DONE;
}

/* l4_head reads the ports of TCP, UDP or SCTP segment p (source and
 * destination, network order: the same place in all three) and, for TCP,
 * its flags (0 for the others). Straight from packet memory when the
 * header is in the linear part: no helper call and no stack copy (the
 * translation's stack is at the verifier's limit). 0: read. */
static __always_inline int l4_head(struct __sk_buff *skb, const struct pkt *p, __u16 *sport, __u16 *dport,
				   __u8 *tflags)
{
	void *d = (void *)(long)skb->data;
	void *e = (void *)(long)skb->data_end;
	__u32 off = p->l4off;
	*tflags = 0;
	/* The bound lets the verifier tell the header's end from a wrap. */
	if (off < 1024 && d + off + sizeof(struct tcphdr) <= e) {
		__u8 *h = d + off;
		__builtin_memcpy(sport, h, 2);
		__builtin_memcpy(dport, h + 2, 2);
		if (p->l4proto == IPPROTO_TCP)
			*tflags = ((struct tcphdr *)h)->flags;
		return 0;
	}
	__u16 ports[2];
	if (bpf_skb_load_bytes(skb, off, ports, sizeof(ports)))
		return -1;
	*sport = ports[0];
	*dport = ports[1];
	if (p->l4proto == IPPROTO_TCP)
		return bpf_skb_load_bytes(skb, off + offsetof(struct tcphdr, flags), tflags, 1);
	return 0;
}

/* A TCP connection's first segment: SYN without ACK. */
static __always_inline int tcp_opens(__u8 tflags)
{
	return (tflags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;
}

/* The flags a FIN or RST segment (tflags) from the client or from the
 * backend sets on its flow: closed, and how (enum up_ct_flags). */
static __always_inline __u8 end_bits(__u8 tflags, int from_backend)
{
	return UP_CT_CLOSED | (tflags & TCP_FLAG_RST ? UP_CT_RESET : from_backend ? UP_CT_FIN_BACKEND : UP_CT_FIN_CLIENT);
}

/* mark_closed notes on a translated flow that its TCP connection ended
 * (a FIN or a RST, either way): a new connection on its tuple (the
 * client's source port came round again) picks a backend afresh, as
 * conntrack's does for a SYN on a closed entry, rather than follow the
 * old one, which may be draining. */
static __always_inline void mark_closed(struct up_ct *ct, __u8 tflags, int from_backend)
{
	__u8 f = end_bits(tflags, from_backend);
	if ((ct->flags & f) != f)
		ct->flags |= f;
}

/* The end flags a flow written for segment tflags starts with: one whose
 * first segment seen is a FIN or a RST (its entry lost to the LRU) is as
 * ended as that segment says. */
static __always_inline __u8 end_flags(__u8 l4, __u8 tflags)
{
	if (l4 != IPPROTO_TCP || !(tflags & (TCP_FLAG_FIN | TCP_FLAG_RST)))
		return 0;
	return end_bits(tflags, 0);
}

/* up_svc_repick starts the flow up_svc_xlate could not (XLATE_TUPLE_IN_USE:
 * the backend it picked has the flow's tuple in use, see tuple_free) on a
 * backend whose tuple is free, from a random slot on, never the client
 * itself, trying SVC_TUPLE_TRIES: the flow and its reply entry are written,
 * and up_svc_xlate, run again, translates the frame on it. 1 when written,
 * 0 when none is free (the frame is dropped; UDP takes the tuple over, see
 * below). Rare, so a global function of its own: the common path carries
 * none of its stack. conntrack, in kube-proxy's path, would give such a
 * flow another client port (its SNAT clash resolution); the flow tables
 * here have no room for one. */
__noinline int up_svc_repick(struct __sk_buff *skb, const struct pkt *p)
{
	if (!skb || !p)
		return 0;
	__u16 sport, dport;
	__u8 tflags;
	if (l4_head(skb, p, &sport, &dport, &tflags))
		return 0;
	__u8 l4 = p->l4proto;
	struct up_svc svc;
	{ /* scopes of their own: the keys' stack is shared */
		struct up_svc_key sk = {.port = dport, .l4proto = l4};
		__builtin_memcpy(sk.addr, p->daddr.addr, 16);
		struct up_svc *found = bpf_map_lookup_elem(&svc_frontends, &sk);
		if (!found)
			return 0;
		svc = *found;
	}
	__u32 sid = svc.id;
	struct up_svc_counters *sc = bpf_map_lookup_elem(&svc_counters, &sid);
	__u16 count = svc.count;
	if (!count)
		return 0;
	__u64 now = up_now();
	struct up_backend b;
	__u32 bid = 0, any_id = 0;
	{
		struct up_ct_key ck = {.client_port = sport, .vport = dport, .l4proto = l4};
		__builtin_memcpy(ck.client, p->saddr.addr, 16);
		__builtin_memcpy(ck.vip, p->daddr.addr, 16);
		__u16 slot = bpf_get_prandom_u32() % count;
#pragma clang loop unroll(disable)
		for (int i = 0; i < SVC_TUPLE_TRIES && i < count; i++) {
			struct up_slot_key k = {.svc_id = svc.id, .slot = slot, .rev = svc.rev};
			slot = (slot + 1) % count;
			__u32 *id = bpf_map_lookup_elem(&svc_slots, &k);
			struct up_backend *be = id ? bpf_map_lookup_elem(&svc_backends, id) : 0;
			if (!be)
				break;
			b = *be;
			if (addr_eq(b.addr, ck.client) || (l4 == IPPROTO_SCTP && b.port != dport))
				continue;
			if (tuple_free(&ck, &b, now)) {
				bid = *id;
				break;
			}
			if (!any_id)
				any_id = *id;
		}
	}
	/* None free. A UDP client on one port to two VIPs is one socket
	 * (an unconnected one: Linux gives two sockets one UDP port only
	 * when asked), which takes replies from either VIP: the tuple goes
	 * to the newer flow, as it did before this check. TCP and SCTP
	 * would break the live connection (the backend answers a SYN or
	 * an INIT on its tuple as part of it): dropped, and the client's
	 * retransmission looks again. */
	if (!bid && l4 == IPPROTO_UDP && any_id) {
		struct up_backend *be = bpf_map_lookup_elem(&svc_backends, &any_id);
		if (be) {
			bid = any_id;
			b = *be;
		}
	}
	if (!bid) {
		if (sc)
			sc->failures++;
		return 0;
	}
	/* sessionAffinity is left as it was: the client's other connections
	 * stay with its backend (this one flow could not). */
	{
		struct up_ct_key ck = {.client_port = sport, .vport = dport, .l4proto = l4};
		__builtin_memcpy(ck.client, p->saddr.addr, 16);
		__builtin_memcpy(ck.vip, p->daddr.addr, 16);
		struct up_ct nct = {.backend_id = bid, .svc_id = sid, .seen_ns = now, .port = b.port, .gen = svc.gen,
				    .flags = end_flags(l4, tflags)};
		__builtin_memcpy(nct.addr, b.addr, 16);
		if (bpf_map_update_elem(&svc_ct, &ck, &nct, BPF_ANY))
			return 0;
	}
	{
		struct up_rev_key rk = {.backend_port = b.port, .client_port = sport, .l4proto = l4};
		__builtin_memcpy(rk.backend, b.addr, 16);
		__builtin_memcpy(rk.client, p->saddr.addr, 16);
		struct up_rev rv = {.vport = dport, .svc_id = sid};
		__builtin_memcpy(rv.vip, p->daddr.addr, 16);
		bpf_map_update_elem(&svc_rev, &rk, &rv, BPF_ANY);
	}
	svc_count(UP_SVC_STAT_NEW_FLOWS, skb->len);
	if (sc)
		sc->flows++;
	return 1;
}

/* up_svc_xlate translates a pod's frame to a Service in svc_frontends.
 * XLATE_NONE: not one (or left to the host path), XLATE_DONE: sent to a
 * backend, XLATE_STALE: the Service has no backend, XLATE_TUPLE_IN_USE: the
 * backend a new flow picked has its tuple in use (tuple_free; nothing
 * written: see up_svc_repick), XLATE_FAILED: a rewrite failed half-way
 * (drop). A global function, verified once. */
__noinline int up_svc_xlate(struct __sk_buff *skb, const struct pkt *p, __u32 parent_ifindex, __u32 mode)
{
	if (!skb || !p)
		return XLATE_NONE;
	__u8 l4 = p->l4proto;
	if (l4 != IPPROTO_TCP && l4 != IPPROTO_UDP && l4 != IPPROTO_SCTP)
		return XLATE_NONE;
	if (!p->first_frag)
		return svc_xlate_frag(skb, p, parent_ifindex, mode);
	__u16 sport, dport;
	__u8 tflags;
	if (l4_head(skb, p, &sport, &dport, &tflags))
		return XLATE_NONE;
	struct up_svc *found;
	{ /* a scope of its own: the key's stack is the snapshot's below */
		struct up_svc_key sk = {.port = dport, .l4proto = l4};
		__builtin_memcpy(sk.addr, p->daddr.addr, 16);
		found = bpf_map_lookup_elem(&svc_frontends, &sk);
	}
	if (!found) {
		/* The pod talks to an address directly on a tuple a translated
		 * flow used (its source port came round again): the replies on
		 * the tuple are the direct flow's now, and must no longer be
		 * given the VIP. A TCP tuple is taken only by a SYN: the pod's
		 * other segments (most of its traffic) need not look, and a
		 * late segment of an old direct connection takes nothing. */
		if (l4 == IPPROTO_TCP && !(tflags & TCP_FLAG_SYN))
			return XLATE_NONE;
		struct up_rev_key rk = {.backend_port = dport, .client_port = sport, .l4proto = l4};
		__builtin_memcpy(rk.backend, p->daddr.addr, 16);
		__builtin_memcpy(rk.client, p->saddr.addr, 16);
		struct up_rev *rv = bpf_map_lookup_elem(&svc_rev, &rk);
		if (rv) {
			/* The translated flow on the tuple (if any) writes it
			 * again when it takes the tuple back (UP_CT_CHECK_REV). */
			struct up_ct_key ck = {.client_port = sport, .vport = rv->vport, .l4proto = l4};
			__builtin_memcpy(ck.client, p->saddr.addr, 16);
			__builtin_memcpy(ck.vip, rv->vip, 16);
			struct up_ct *ct = bpf_map_lookup_elem(&svc_ct, &ck);
			if (ct)
				ct->flags |= UP_CT_CHECK_REV;
			bpf_map_delete_elem(&svc_rev, &rk);
		}
		return XLATE_NONE;
	}
	/* One read of the frontend: the agent replaces the element when it
	 * changes, and the slots picked from, the gen stamped on the flow and
	 * the count must all be of one version. */
	struct up_svc snap = *found;
	const struct up_svc *svc = &snap;
	__u32 len = skb->len;
	__u32 sid = svc->id;
	struct up_svc_counters *sc = bpf_map_lookup_elem(&svc_counters, &sid);
	__u64 now = up_now();
	__u32 bid = 0;
	struct up_backend b = {};
	int fresh = 1, recheck = 0;
	{ /* a scope of its own: the flow key's stack is the reply key's below */
		struct up_ct_key ck = {.client_port = sport, .vport = dport, .l4proto = l4};
		__builtin_memcpy(ck.client, p->saddr.addr, 16);
		__builtin_memcpy(ck.vip, p->daddr.addr, 16);
		struct up_ct *ct = bpf_map_lookup_elem(&svc_ct, &ck);
		if (ct && ct->svc_id == svc->id) {
			bid = ct->backend_id;
			__builtin_memcpy(b.addr, ct->addr, 16);
			b.port = ct->port;
			/* A backend that went away gives its flows a new one, whose
			 * kernel resets a TCP connection it does not know: they fail
			 * fast instead of black-holing. A draining one (no slot any
			 * more, still listed) keeps them. Looked up only once the
			 * frontend changed since the flow started (see up_ct.gen). */
			fresh = 0;
			/* A new connection on the tuple of one that ended: a
			 * backend afresh (a retransmitted SYN finds the flag clear,
			 * and keeps the backend its first one got). */
			if (l4 == IPPROTO_TCP && tcp_opens(tflags) && (ct->flags & UP_CT_CLOSED)) {
				/* The old backend's way back goes: its late
				 * segments (a FIN it retransmits from
				 * LAST_ACK) reach the client from its own
				 * address, which the client resets directly,
				 * not from the VIP, where they would meet the
				 * new connection (whose SYN_SENT answers with
				 * a RST on the tuple). */
				struct up_rev_key ok = {.backend_port = ct->port, .client_port = sport, .l4proto = l4};
				__builtin_memcpy(ok.backend, ct->addr, 16);
				__builtin_memcpy(ok.client, p->saddr.addr, 16);
				/* Only if it is still this flow's: another VIP's
				 * live flow may have taken the tuple since. */
				if (rev_is(bpf_map_lookup_elem(&svc_rev, &ok), 1, p->daddr.addr, dport))
					bpf_map_delete_elem(&svc_rev, &ok);
				fresh = 1;
			} else if (l4 == IPPROTO_TCP && (tflags & (TCP_FLAG_FIN | TCP_FLAG_RST)))
				mark_closed(ct, tflags, 0);
			if (!fresh && ct->gen != svc->gen)
				fresh = !same_backend(bpf_map_lookup_elem(&svc_backends, &bid), ct->addr, ct->port);
			/* UDP has no end: a flow idle that long is over, and the
			 * next datagram on its tuple starts a new one (a client
			 * with a fixed source port is spread again, as conntrack
			 * would). */
			if (!fresh && l4 == IPPROTO_UDP && since(now, ct->seen_ns) > SVC_UDP_IDLE_NS)
				fresh = 1;
			if (!fresh && since(now, ct->seen_ns) > 1000000000ULL) {
				ct->seen_ns = now;
				recheck = 1;
			}
			/* The pod used the tuple directly since (see above): the
			 * replies on it are the direct flow's until the flow takes it
			 * back. A UDP or SCTP datagram through the VIP does; a TCP
			 * flow only with a new connection (a SYN), not with a late
			 * segment of the old one (nor on the once-a-second check). */
			if (!fresh && (ct->flags & UP_CT_CHECK_REV)) {
				recheck = l4 != IPPROTO_TCP || (tflags & TCP_FLAG_SYN);
				if (recheck)
					ct->flags &= ~UP_CT_CHECK_REV;
			}
		}
		/* No backend to start a flow with: stale. Open flows (above) go on. */
		if (fresh && !svc->count) {
			svc_count(UP_SVC_STAT_STALE, len);
			if (sc)
				sc->failures++;
			return XLATE_STALE;
		}
		if (fresh) {
			bid = pick_backend(svc, ck.client, now);
			struct up_backend *be = bid ? bpf_map_lookup_elem(&svc_backends, &bid) : 0;
			if (!be) {
				svc_count(UP_SVC_STAT_NO_SLOT, len);
				if (sc)
					sc->failures++;
				return XLATE_NONE;
			}
			b = *be;
		}
		if (l4 == IPPROTO_SCTP && b.port != dport) {
			svc_count(UP_SVC_STAT_UNTRANSLATABLE, len);
			return XLATE_NONE;
		}
		/* Taken: up_svc_repick looks further (this stack has no room
		 * for it), and the flow is translated again. */
		if (fresh && !tuple_free(&ck, &b, now))
			return XLATE_TUPLE_IN_USE;
		if (fresh) {
			struct up_ct nct = {.backend_id = bid, .svc_id = svc->id, .seen_ns = now, .port = b.port, .gen = svc->gen,
					    .flags = end_flags(l4, tflags)};
			__builtin_memcpy(nct.addr, b.addr, 16);
			bpf_map_update_elem(&svc_ct, &ck, &nct, BPF_ANY);
			svc_count(UP_SVC_STAT_NEW_FLOWS, len);
			if (sc)
				sc->flows++;
		}
	}
	/* The reply's way back: written with the flow, and written again if
	 * the pod used the tuple directly in between (see above) or the LRU
	 * dropped it, which an established flow checks once a second (with
	 * seen_ns), not on every packet. */
	struct up_rev_key rk = {.backend_port = b.port, .client_port = sport, .l4proto = l4};
	__builtin_memcpy(rk.backend, b.addr, 16);
	__builtin_memcpy(rk.client, p->saddr.addr, 16);
	/* A UDP tuple another VIP's flow took over (up_svc_repick, none
	 * free) comes back to this one when it sends again: the last sender
	 * wins, checked once a second. */
	if (fresh || (recheck && !rev_is(bpf_map_lookup_elem(&svc_rev, &rk), l4 == IPPROTO_UDP, p->daddr.addr, dport))) {
		struct up_rev rv = {.vport = dport, .svc_id = sid};
		__builtin_memcpy(rv.vip, p->daddr.addr, 16);
		bpf_map_update_elem(&svc_rev, &rk, &rv, BPF_ANY);
	}
	note_frags(p, 0, b.addr, b.port, sid);
	if (rewrite_addr(skb, p, daddr_off(p), p->daddr.addr, b.addr))
		return XLATE_FAILED;
	if (b.port != dport && rewrite_port(skb, p, p->l4off + 2, dport, b.port))
		return XLATE_FAILED;
	backend_mac(skb, p, parent_ifindex, mode, &b);
	svc_count(UP_SVC_STAT_TRANSLATED, len);
	if (sc)
		bump(&sc->to_backend, len);
	return XLATE_DONE;
}

/* An ICMP error about a translated flow quotes the frame the client's
 * egress program sent: to the backend. The client's stack matches it to
 * its socket by the quoted destination, so it must read VIP:port again:
 * else a connected UDP socket never learns the port is closed (no
 * ECONNREFUSED), and a TCP flow to a backend past a router never learns
 * the path MTU (frag needed / packet too big). The quoted destination and
 * port are rewritten (with the quoted IPv4 header's checksum and the ICMP
 * checksum); the outer source too when the backend itself sent the error.
 * The quoted L4 checksum is left (truncated data: no stack checks it).
 * 1: rewritten, 0: not such an error, -1: failed. */
static __always_inline int svc_reverse_icmp(struct __sk_buff *skb, const struct pkt *p)
{
	__u32 in = p->l4off + 8; /* the quoted IP header */
	__u8 type;
	if (bpf_skb_load_bytes(skb, p->l4off, &type, 1))
		return 0;
	struct up_rev_key rk = {};
	__u32 qdst, ql4, csum = p->l4off + 2;
	int v4 = p->proto == ETH_P_IP;
	if (v4) {
		if (p->l4proto != IPPROTO_ICMP || (type != 3 && type != 11 && type != 12))
			return 0;
		struct iphdr q;
		if (bpf_skb_load_bytes(skb, in, &q, sizeof(q)) || (q.ver_ihl & 0xf) < 5)
			return 0;
		map_v4((struct up_ip_key *)rk.client, (const __u8 *)&q.saddr);
		map_v4((struct up_ip_key *)rk.backend, (const __u8 *)&q.daddr);
		rk.l4proto = q.protocol;
		qdst = in + 16;
		ql4 = in + (q.ver_ihl & 0xf) * 4;
	} else {
		if (p->l4proto != IPPROTO_ICMPV6 || type < 1 || type > 4)
			return 0;
		struct ipv6hdr q;
		if (bpf_skb_load_bytes(skb, in, &q, sizeof(q)))
			return 0;
		__builtin_memcpy(rk.client, &q.saddr, 16);
		__builtin_memcpy(rk.backend, &q.daddr, 16);
		rk.l4proto = q.nexthdr;
		qdst = in + 24;
		ql4 = in + sizeof(q);
	}
	if (rk.l4proto != IPPROTO_TCP && rk.l4proto != IPPROTO_UDP && rk.l4proto != IPPROTO_SCTP)
		return 0;
	__u16 ports[2]; /* as the client sent them: its own, the backend's */
	if (bpf_skb_load_bytes(skb, ql4, ports, sizeof(ports)))
		return 0;
	rk.client_port = ports[0];
	rk.backend_port = ports[1];
	/* About this client's flow only. */
	if (!addr_eq(rk.client, p->daddr.addr))
		return 0;
	struct up_rev *rv = bpf_map_lookup_elem(&svc_rev, &rk);
	if (!rv)
		return 0;
	struct up_rev r = *rv;
	if (v4) {
		__u32 o, n;
		__builtin_memcpy(&o, rk.backend + 12, 4);
		__builtin_memcpy(&n, r.vip + 12, 4);
		__u16 qsum_old, qsum_new;
		if (bpf_skb_load_bytes(skb, in + 10, &qsum_old, 2) ||
		    bpf_l3_csum_replace(skb, in + 10, o, n, 4) ||
		    bpf_skb_load_bytes(skb, in + 10, &qsum_new, 2) ||
		    bpf_l4_csum_replace(skb, csum, o, n, 4) ||
		    bpf_l4_csum_replace(skb, csum, qsum_old, qsum_new, 2) ||
		    bpf_skb_store_bytes(skb, qdst, &n, 4, 0))
			return -1;
		/* The backend itself answered: the error comes from the VIP.
		 * (ICMPv4's checksum has no pseudo-header.) */
		if (addr_eq(p->saddr.addr, rk.backend) &&
		    (bpf_l3_csum_replace(skb, ETH_HLEN + 10, o, n, 4) || bpf_skb_store_bytes(skb, ETH_HLEN + 12, &n, 4, 0)))
			return -1;
	} else {
		__u32 o6[4], n6[4];
		__builtin_memcpy(o6, rk.backend, 16);
		__builtin_memcpy(n6, r.vip, 16);
		__s64 diff = bpf_csum_diff(o6, 16, n6, 16, 0);
		if (bpf_l4_csum_replace(skb, csum, 0, diff, 0) || bpf_skb_store_bytes(skb, qdst, n6, 16, 0))
			return -1;
		/* ICMPv6's checksum covers the outer addresses. */
		if (addr_eq(p->saddr.addr, rk.backend) &&
		    (bpf_l4_csum_replace(skb, csum, 0, diff, BPF_F_PSEUDO_HDR) || bpf_skb_store_bytes(skb, ETH_HLEN + 8, n6, 16, 0)))
			return -1;
	}
	if (r.vport != ports[1] &&
	    (bpf_l4_csum_replace(skb, csum, ports[1], r.vport, 2) || bpf_skb_store_bytes(skb, ql4 + 2, &r.vport, 2, 0)))
		return -1;
	svc_count(UP_SVC_STAT_REVERSED, skb->len);
	struct up_svc_counters *sc = bpf_map_lookup_elem(&svc_counters, &r.svc_id);
	if (sc)
		bump(&sc->from_backend, skb->len);
	return 1;
}

/* A fragment after the first of a reply whose first fragment was given the
 * VIP back (svc_frags): the VIP too. 1: rewritten, 0: not one, -1: failed. */
static __always_inline int svc_reverse_frag(struct __sk_buff *skb, const struct pkt *p)
{
	struct up_frag_key k;
	frag_key(&k, p, 1);
	struct up_frag *f = bpf_map_lookup_elem(&svc_frags, &k);
	if (!f)
		return 0;
	__u8 vip[16];
	__builtin_memcpy(vip, f->addr, 16);
	__u32 sid = f->svc_id;
	if (rewrite_l3(skb, p, saddr_off(p), k.saddr, vip))
		return -1;
	svc_count(UP_SVC_STAT_REVERSED, skb->len);
	struct up_svc_counters *sc = bpf_map_lookup_elem(&svc_counters, &sid);
	if (sc)
		bump(&sc->from_backend, skb->len);
	return 1;
}

/* up_svc_reverse gives a translated flow's reply the VIP and port the
 * client sent to, and an ICMP error about it the VIP in what it quotes.
 * 1: rewritten, 0: not a reply of one, -1: failed. */
__noinline int up_svc_reverse(struct __sk_buff *skb, const struct pkt *p)
{
	if (!skb || !p)
		return 0;
	__u8 l4 = p->l4proto;
	if (!p->first_frag)
		return svc_reverse_frag(skb, p);
	if (l4 == IPPROTO_ICMP || l4 == IPPROTO_ICMPV6)
		return svc_reverse_icmp(skb, p);
	if (l4 != IPPROTO_TCP && l4 != IPPROTO_UDP && l4 != IPPROTO_SCTP)
		return 0;
	__u16 ports[2];
	__u8 tflags;
	if (l4_head(skb, p, &ports[0], &ports[1], &tflags))
		return 0;
	struct up_rev_key rk = {.backend_port = ports[0], .client_port = ports[1], .l4proto = l4};
	__builtin_memcpy(rk.backend, p->saddr.addr, 16);
	__builtin_memcpy(rk.client, p->daddr.addr, 16);
	struct up_rev *rv = bpf_map_lookup_elem(&svc_rev, &rk);
	if (!rv)
		return 0;
	struct up_rev r = *rv;
	if (tflags & (TCP_FLAG_FIN | TCP_FLAG_RST)) {
		/* The backend ended the connection (a reset the client
		 * answers with nothing): see mark_closed. */
		struct up_ct_key ck = {.client_port = ports[1], .vport = r.vport, .l4proto = l4};
		__builtin_memcpy(ck.client, rk.client, 16);
		__builtin_memcpy(ck.vip, r.vip, 16);
		struct up_ct *ct = bpf_map_lookup_elem(&svc_ct, &ck);
		/* Only the flow's own backend ends it: one the tuple had
		 * before (its reply entry outlived that flow) does not. */
		if (ct && ct->svc_id == r.svc_id && ct->port == ports[0] && addr_eq(ct->addr, rk.backend))
			mark_closed(ct, tflags, 1);
	}
	note_frags(p, 1, r.vip, 0, r.svc_id);
	if (rewrite_addr(skb, p, saddr_off(p), rk.backend, r.vip))
		return -1;
	if (r.vport != ports[0] && rewrite_port(skb, p, p->l4off, ports[0], r.vport))
		return -1;
	svc_count(UP_SVC_STAT_REVERSED, skb->len);
	struct up_svc_counters *sc = bpf_map_lookup_elem(&svc_counters, &r.svc_id);
	if (sc)
		bump(&sc->from_backend, skb->len);
	return 1;
}

static __always_inline int svc_ebpf(const struct up_config *cfg)
{
	return cfg && (cfg->flags & UP_CFG_SVC_EBPF);
}

SEC("tc")
int endpoint_ingress(struct __sk_buff *skb)
{
	bpf_tail_call(skb, &ep_progs, UP_EP_PROG_INGRESS);
	return TC_ACT_UNSPEC;
}

SEC("tc")
int endpoint_egress(struct __sk_buff *skb)
{
	bpf_tail_call(skb, &ep_progs, UP_EP_PROG_EGRESS);
	return TC_ACT_UNSPEC;
}

/* Frames from another macvlan slave of the same parent reach a pod without
 * passing the parent (bridge mode delivers them inside the driver), so the
 * sender is vetted again on arrival: a sender that skipped its own egress
 * hook still cannot reach its neighbours with another's address. */
SEC("tc")
int ep_ingress_body(struct __sk_buff *skb)
{
	__u32 id = filter_endpoint(skb);
	__u32 len = skb->len;
	struct ethhdr eth;
	struct pkt p;
	int parsed = 0;
	struct up_endpoint *ep = bpf_map_lookup_elem(&endpoints, &id);
	if (ep && ep->mode == UP_MODE_MACVLAN && !LOAD_HDR(skb, 0, &eth)) {
		__u32 from = ep_by_mac_on(eth.h_source, ep->parent_ifindex);
		struct up_endpoint *sender = from && from != id ? bpf_map_lookup_elem(&endpoints, &from) : 0;
		__u32 reason = UP_DROP_UNVETTED;
		if (sender) {
			if (vet_source(skb, &eth, sender, from, &p, 0, &reason)) {
				count_drop(reason, from, len);
				return TC_ACT_SHOT;
			}
			parsed = 1;
		} else {
			/* No endpoint to charge: the sender is unknown. */
			reason = up_vet_advertised(skb, &eth, ep->parent_ifindex, &p);
			if (reason != UP_DROP_MAX) {
				count_drop(reason, 0, len);
				return TC_ACT_SHOT;
			}
		}
	}
	/* A reply of a flow translated at this pod: from the VIP again. */
	if (ep && svc_ebpf(get_config()) &&
	    (parsed || (!LOAD_HDR(skb, 0, &eth) && parse_l3(skb, bpf_ntohs(eth.h_proto), &p))) &&
	    up_svc_reverse(skb, &p) < 0) {
		count_drop(UP_DROP_SVC_XLATE_FAILED, id, len);
		return TC_ACT_SHOT;
	}
	count_ep(id, rx, len);
	return TC_ACT_OK;
}

SEC("tc")
int ep_egress_body(struct __sk_buff *skb)
{
	__u32 id = filter_endpoint(skb);
	__u32 len = skb->len;
	struct ethhdr eth;
	struct pkt p;
	__u32 reason = UP_DROP_UNVETTED;
	/* A filter whose endpoint is not registered (any more) vets nothing:
	 * fail closed. */
	struct up_endpoint *ep = bpf_map_lookup_elem(&endpoints, &id);
	if (!ep || LOAD_HDR(skb, 0, &eth) || vet_source(skb, &eth, ep, id, &p, 1, &reason)) {
		count_drop(reason, id, len);
		return TC_ACT_SHOT;
	}
	/* After vetting: the source is the pod's own, whatever the Service. */
	struct up_config *cfg = get_config();
	if (svc_ebpf(cfg) && p.proto != ETH_P_ARP) {
		int x = up_svc_xlate(skb, &p, ep->parent_ifindex, ep->mode);
		if (x == XLATE_TUPLE_IN_USE && up_svc_repick(skb, &p))
			x = up_svc_xlate(skb, &p, ep->parent_ifindex, ep->mode);
		if (x == XLATE_STALE)
			return handle_stale(skb, cfg, &p, id);
		if (x == XLATE_FAILED || x == XLATE_TUPLE_IN_USE) {
			count_drop(x == XLATE_FAILED ? UP_DROP_SVC_XLATE_FAILED : UP_DROP_SVC_TUPLE_IN_USE, id, len);
			return TC_ACT_SHOT;
		}
	}
	struct up_ep_stats *s = ep_stats_of(id);
	/* An ipvlan slave's frames to the host never reach the parent's program
	 * (the driver hands them to the host itself): its host traffic is
	 * counted, and cut by hostReachability: false, here. */
	if (ep->mode != UP_MODE_MACVLAN && p.proto != ETH_P_ARP && !p.nd_type && mac_eq(eth.h_dest, ep->mac)) {
		__u32 flags = 0;
		if (in_set(PREFILTER_HOST, &p.daddr, &flags) && (flags & UP_HOST_LOCAL) && !(flags & UP_HOST_STEER) &&
		    !in_set(PREFILTER_SVC, &p.daddr, 0)) {
			if (host_blocked(get_config()) && !svc_reply(skb, &p) && !svc_translated(skb, &p, 1)) {
				count_drop(UP_DROP_HOST_UNREACHABLE, id, len);
				return TC_ACT_SHOT;
			}
			count(UP_STAT_EP_TO_HOST, len);
			if (s)
				bump(&s->ep_to_host, len);
		}
	}
	if (s)
		bump(&s->tx, len);
	return TC_ACT_OK;
}

/* ---- parent NIC, frames from the wire (XDP) --------------------------------- */

/* An address someone on the wire uses in ND: never learnt by an endpoint. */
static __always_inline void seen_on_wire(__u32 ifindex, const __u8 *addr)
{
	if (addr[0] == 0xff)
		return;
	struct up_ep_ip_key k = {.parent_ifindex = ifindex};
	__builtin_memcpy(k.addr, addr, 16);
	if (is_unspecified((const struct up_ip_key *)k.addr))
		return;
	__u64 now = up_now();
	bpf_map_update_elem(&wire_addrs, &k, &now, BPF_ANY);
}

/* An ARP or ND frame from the wire whose sender claims an endpoint's address
 * with a MAC that is not the endpoint's: two hosts think they own one IP.
 * Counted and reported, never dropped: the operator decides. A learnt
 * address is given up at once: the endpoint only guessed it was free. */
static __always_inline void check_conflict(struct xdp_md *ctx, const struct up_parent *parent,
					   const struct up_ip_key *claimed, const __u8 *mac, __u16 proto)
{
	struct up_ep_ip_key k = {.parent_ifindex = ctx->ingress_ifindex};
	__builtin_memcpy(k.addr, claimed->addr, 16);
	struct up_ep_ref *r = bpf_map_lookup_elem(&ep_by_ip, &k);
	if (!r)
		return;
	__u32 id = r->id;
	__u32 learned = r->flags & UP_REF_LEARNED;
	int same;
	if (parent->mode == UP_MODE_MACVLAN) {
		struct up_endpoint *ep = bpf_map_lookup_elem(&endpoints, &id);
		if (!ep)
			return;
		same = mac_eq(mac, ep->mac);
	} else {
		same = mac_eq(mac, parent->mac); /* ipvlan slaves use the parent's MAC */
	}
	if (same)
		return;
	if (learned && !bpf_map_delete_elem(&ep_by_ip, &k))
		count(UP_STAT_UNLEARNED, 1);
	count(UP_STAT_IP_CONFLICT, 1);
	struct up_ep_stats *s = ep_stats_of(id);
	if (s)
		s->ip_conflicts++;
	struct up_event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e)
		return;
	e->kind = UP_EVENT_IP_CONFLICT;
	e->ep_id = id;
	e->ifindex = ctx->ingress_ifindex;
	e->proto = proto;
	__builtin_memcpy(e->mac, mac, ETH_ALEN);
	__builtin_memcpy(e->addr, claimed->addr, 16);
	bpf_ringbuf_submit(e, 0);
}

SEC("xdp")
int parent_xdp(struct xdp_md *ctx)
{
	__u32 ifindex = ctx->ingress_ifindex;
	struct up_parent *parent = parent_of(ifindex);
	if (!parent)
		return XDP_PASS;
	struct ethhdr eth;
	if (XDP_LOAD_HDR(ctx, 0, &eth))
		return XDP_PASS;
	__u16 proto = bpf_ntohs(eth.h_proto);
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 len = data_end - data;

	if (proto == ETH_P_ARP) {
		struct arp_eth arp;
		if (!XDP_LOAD_HDR(ctx, ETH_HLEN, &arp) && arp.htype == bpf_htons(1) &&
		    arp.ptype == bpf_htons(ETH_P_IP) && arp.hlen == 6 && arp.plen == 4) {
			struct up_ip_key spa;
			map_v4(&spa, arp.spa);
			check_conflict(ctx, parent, &spa, arp.sha, ETH_P_ARP);
		}
	} else if (proto == ETH_P_IPV6) {
		struct ipv6hdr ip6;
		struct icmp6_nd nd;
		__u16 icmp_type_code = 0;
		if (!XDP_LOAD_HDR(ctx, ETH_HLEN, &ip6) && ip6.nexthdr == IPPROTO_ICMPV6 &&
		    !XDP_LOAD_HDR(ctx, ETH_HLEN + sizeof(ip6), &icmp_type_code) &&
		    icmp_type_code == bpf_htons(ICMPV6_ND_RA << 8)) {
			/* Shorter than an NS/NA: the router's address is all we want. */
			seen_on_wire(ifindex, ip6.saddr);
		} else if (!XDP_LOAD_HDR(ctx, ETH_HLEN, &ip6) && ip6.nexthdr == IPPROTO_ICMPV6 &&
			   !XDP_LOAD_HDR(ctx, ETH_HLEN + sizeof(ip6), &nd) && nd.code == 0) {
			struct up_ip_key k;
			if (nd.type == ICMPV6_ND_NA) {
				__builtin_memcpy(k.addr, nd.target, 16);
				seen_on_wire(ifindex, nd.target);
				check_conflict(ctx, parent, &k, eth.h_source, ETH_P_IPV6);
			} else if (nd.type == ICMPV6_ND_NS) {
				__builtin_memcpy(k.addr, ip6.saddr, 16);
				seen_on_wire(ifindex, ip6.saddr);
				check_conflict(ctx, parent, &k, eth.h_source, ETH_P_IPV6);
			}
		}
	}

	if (is_multicast(eth.h_dest))
		return XDP_PASS;
	__u32 id = 0;
	if (parent->mode == UP_MODE_MACVLAN) {
		id = ep_by_mac_on(eth.h_dest, ifindex);
	} else if (mac_eq(eth.h_dest, parent->mac) && (proto == ETH_P_IP || proto == ETH_P_IPV6)) {
		struct up_ip_key dst;
		if (proto == ETH_P_IP) {
			struct iphdr ip;
			if (XDP_LOAD_HDR(ctx, ETH_HLEN, &ip))
				return XDP_PASS;
			map_v4(&dst, (const __u8 *)&ip.daddr);
		} else {
			struct ipv6hdr ip6;
			if (XDP_LOAD_HDR(ctx, ETH_HLEN, &ip6))
				return XDP_PASS;
			__builtin_memcpy(dst.addr, ip6.daddr, 16);
		}
		id = ep_by_ip_on(&dst, ifindex);
	}
	if (id) {
		count(UP_STAT_WIRE_RX, len);
		count_ep(id, wire_rx, len);
	}
	return XDP_PASS;
}
