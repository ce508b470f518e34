/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Types shared by the programs and by Go (bpf2go -type): change them here only.
 * Every struct is padded by hand so that C and Go agree without guessing and so
 * that hash keys never carry uninitialised bytes. */
#ifndef __UNDERPASS_H
#define __UNDERPASS_H

#include <linux/types.h>

/* How a parent NIC carries its endpoints. macvlan finds a slave by MAC;
 * ipvlan slaves share the parent MAC, so they are found by IP. */
enum up_mode {
	UP_MODE_NONE = 0,
	UP_MODE_MACVLAN = 1,
	UP_MODE_IPVLAN_L2 = 2,
	UP_MODE_IPVLAN_L3 = 3,
	UP_MODE_IPVLAN_L3S = 4,
};

/* up_config.flags. Zero is the safe default: host reachable, nothing judged
 * stale (the live set is not known yet), stale VIPs dropped once it is. */
enum up_config_flags {
	UP_CFG_HOST_BLOCKED = 1 << 0, /* hostReachability: false */
	UP_CFG_STALE_REJECT = 1 << 1, /* staleServices.action: reject */
	/* The agent has synced the live set once (every source it is configured
	 * with). Until then a destination in a service CIDR is treated as live
	 * (steered to the host, where kube-proxy decides): a fresh datapath must
	 * not call every ClusterIP stale before the informers report. */
	UP_CFG_SVC_SYNCED = 1 << 2,
	/* services.mode: ebpf. A pod's frames to a Service in svc_frontends are
	 * translated by its own egress program (see up_svc_xlate) instead of
	 * being steered to the host for kube-proxy. */
	UP_CFG_SVC_EBPF = 1 << 3,
	/* The agent's alone (no program reads it): the live set SVC_SYNCED
	 * stands for included the Kubernetes Services. A restarted agent keeps
	 * the guard armed only when it reads them too; one that starts reading
	 * them judges nothing stale until its informers have synced. */
	UP_CFG_SVC_KUBE = 1 << 4,
};

/* skb->mark values for the endpoint frames the parent program hands to the
 * host stack, for the agent's nftables table (internal/hostnat), which makes the
 * Service path symmetric by masquerading what the host forwards. Every
 * other frame enters the host with mark 0, so a mark a pod set never
 * reaches the host. */
enum up_marks {
	/* Set on an endpoint's frame steered to the host for a live Service VIP
	 * or a steered host CIDR. The agent masquerades such a flow when the
	 * host DNATs and forwards it (kube-proxy sent it to a backend pod), so
	 * the backend's reply comes back through the host's conntrack instead
	 * of going straight to the client over the underlay. */
	UP_MARK_STEERED = 0x00200000,
	/* Set as well when the destination is a live Service VIP. Whatever the
	 * host then forwards of such a flow, kube-proxy translated: by DNAT
	 * (iptables, nftables) or by IPVS, which records no DNAT in conntrack.
	 * The agent masquerades it on this mark alone. */
	UP_MARK_SERVICE = 0x00400000,
};

/* svc_flows key: a Service flow the host forwarded into an endpoint after
 * masquerading it (see svc_flows in underpass.c), as the endpoint's reply
 * carries it: from the endpoint (peer) to the host's address (local). */
struct up_flow_key {
	__u8 local[16];   /* the host's address, IPv4 mapped as in up_ip_key */
	__u8 peer[16];    /* the endpoint's address */
	__u16 local_port; /* network order */
	__u16 peer_port;  /* network order */
	__u8 l4proto;
	__u8 _pad[3];
};

/* The single entry of the config array: read on every packet, written live by
 * the agent. */
struct up_config {
	__u32 flags;
	__u32 _pad;
	__u64 generation; /* bumped by the agent on every apply: shows up in bpftool */
};

/* parents is an array indexed by ifindex, because the verifier inlines array
 * lookups while a hash lookup costs ~30 ns per packet on a small VM. A parent
 * must have an ifindex below UP_MAX_PARENT_IFINDEX; mode 0 = not a parent. */
enum up_limits {
	UP_MAX_PARENT_IFINDEX = 65536,
};

/* parents: ifindex of a parent NIC -> what is needed to hairpin on it. */
struct up_parent {
	__u8 mac[6];
	__u8 mode; /* enum up_mode */
	__u8 _pad;
};

/* ep_by_mac and ep_by_ip are keyed per parent: two networks on one node
 * (Multus) may reuse a MAC or an address range on different parents. */
struct up_mac_key {
	__u8 mac[6];
	__u16 _pad;
	__u32 parent_ifindex;
};

struct up_ep_ip_key {
	__u8 addr[16]; /* IPv4 mapped, as in up_ip_key */
	__u32 parent_ifindex;
};

/* Both families in one key: IPv4 as IPv4-mapped IPv6 (::ffff:a.b.c.d). */
struct up_ip_key {
	__u8 addr[16];
};

struct up_lpm_key {
	__u32 prefixlen; /* IPv4 prefixes are stored as /96 + len */
	__u8 addr[16];
};

enum up_ref_flags {
	/* An address the endpoint configured itself (SLAAC, privacy, link-local)
	 * and the datapath learnt from its duplicate address detection. */
	UP_REF_LEARNED = 1 << 0,
};

/* Value of ep_by_mac and ep_by_ip. */
struct up_ep_ref {
	__u32 id;
	__u32 flags;    /* enum up_ref_flags */
	__u64 used_ns;  /* learnt addresses: last seen as a source (1 s resolution) */
};

/* host_cidrs values. */
enum up_host_flags {
	UP_HOST_LOCAL = 1 << 0, /* a node address: ARP/ND for it is cloned to the host */
	UP_HOST_STEER = 1 << 1, /* endpoint traffic to it goes to the host stack */
};

struct up_host_entry {
	__u32 flags;
};

/* prefilter: a negative filter in front of the svc_cidrs (index 0) and
 * host_cidrs (index 1) tries. Array lookups are inlined and a handful of
 * mask compares is cheaper than a trie walk; most packets go to neither set.
 * It only ever says "certainly not in the set": userspace keeps it a
 * superset of its trie, so a torn read can only cost a trie lookup. Zero
 * value (exact4 = exact6 = 0) means "consult the trie". */
enum up_prefilter_limits {
	UP_PREFILTER_V4 = 8,
	UP_PREFILTER_V6 = 4,
};

struct up_net4 {
	__u32 addr;  /* network order, masked */
	__u32 mask;
	__u32 valid;
};

struct up_net6 {
	__u64 addr[2];
	__u64 mask[2];
	__u32 valid;
	__u32 _pad;
};

struct up_prefilter {
	/* 1: the entries of that family cover the whole set; one flag per
	 * family, so many IPv6 entries do not switch off the IPv4 filter. */
	__u32 exact4;
	__u32 exact6;
	struct up_net4 v4[UP_PREFILTER_V4];
	struct up_net6 v6[UP_PREFILTER_V6];
};

enum up_drop_reason {
	UP_DROP_STALE_SERVICE = 0,
	UP_DROP_HOST_UNREACHABLE = 1,
	UP_DROP_SPOOFED_SOURCE = 2,
	UP_DROP_REJECT_FAILED = 3, /* reject mode could not build the answer: dropped instead */
	/* A frame from an endpoint the programs cannot vet: VLAN-tagged, an
	 * ethertype other than IPv4/IPv6/ARP, ARP for other hardware, ND behind
	 * extension headers, a router advertisement or redirect. */
	UP_DROP_UNVETTED = 4,
	/* An endpoint frame to the parent's MAC for a destination that is not
	 * the host, a steered set or a Service: the node would route it. */
	UP_DROP_ROUTED = 5,
	/* services.mode: ebpf could not rewrite a frame it had begun to
	 * translate (a helper failed): dropped rather than sent half-rewritten. */
	UP_DROP_SVC_XLATE_FAILED = 6,
	/* services.mode: ebpf: a new flow whose tuple at every backend tried
	 * (client address and port to backend address and port) is another
	 * live flow's, through another VIP or VIP port (tuple_free). */
	UP_DROP_SVC_TUPLE_IN_USE = 7,
	UP_DROP_MAX = 8,
	UP_DROP_SLOTS = 8, /* array sizes: room for reasons without a layout change */
};

/* Global counters (per-CPU array "stats"), by what happened. */
enum up_stat {
	UP_STAT_HOST_TO_EP = 0,   /* hairpin host -> endpoint */
	UP_STAT_EP_TO_HOST = 1,   /* hairpin endpoint -> host (incl. steered) */
	UP_STAT_STEERED = 2,      /* of those, steered by destination IP */
	UP_STAT_ARP_CLONED = 3,
	UP_STAT_ND_CLONED = 4,
	UP_STAT_STALE_DROPPED = 5,
	UP_STAT_STALE_REJECTED = 6,
	UP_STAT_CLONE_FAILED = 7,
	UP_STAT_IP_CONFLICT = 8,  /* ARP/ND from the wire claiming an endpoint IP */
	UP_STAT_WIRE_RX = 9,      /* frames from the wire for an endpoint (XDP) */
	UP_STAT_LEARNED = 10,     /* endpoint addresses learnt from DAD */
	UP_STAT_UNLEARNED = 11,   /* learnt addresses given up: the wire defends them */
	UP_STAT_MAX = 12,
};

struct up_counter {
	__u64 packets;
	__u64 bytes;
};

/* ep_stats: per-CPU, per endpoint id; userspace creates and deletes the
 * entries, the programs count into them (see docs/architecture.md). */
struct up_ep_stats {
	struct up_counter rx;          /* delivered to the endpoint */
	struct up_counter tx;          /* sent by the endpoint */
	struct up_counter host_to_ep;  /* hairpinned from the host */
	struct up_counter ep_to_host;  /* hairpinned to the host */
	struct up_counter wire_rx;     /* seen on the parent from the wire */
	__u64 stale_dropped;
	__u64 stale_rejected;
	__u64 drops[UP_DROP_SLOTS];
	__u64 ip_conflicts;
};

#define UP_MAX_ADDRS 4
#define UP_MAX_LEARNED 16

/* An address learnt from the endpoint's DAD; learned_ns 0 = free slot. */
struct up_learned {
	__u8 addr[16];
	__u64 learned_ns; /* the programs' clock (up_now: CLOCK_MONOTONIC, coarse) */
};

struct up_ep_addr {
	__u8 addr[16];   /* IPv4 mapped, as in up_ip_key */
	__u8 prefixlen;  /* native length: 24 for 10.0.0.5/24 */
	__u8 family;     /* 4 or 6; 0 = unused slot */
	__u8 _pad[2];
};

/* endpoints: id -> everything userspace needs to name, check and clean up an
 * endpoint; the programs read it to vet a source (addrs, learned). */
struct up_endpoint {
	__u32 id;
	__u32 parent_ifindex;
	__u32 ifindex;          /* the slave, inside the container netns */
	__u8 mode;              /* enum up_mode */
	__u8 flags;
	__u8 mac[6];
	__u64 created_unix;
	struct up_ep_addr addrs[UP_MAX_ADDRS];
	char container_id[72];
	char ifname[16];
	char parent[16];
	char pod_name[128];
	char pod_namespace[64];
	char netns[128];
	char network[64];       /* the CNI network name: GC and STATUS are per network */
	/* Filled by the programs (see learn_address); a registration starts
	 * them empty, unregistering removes their ep_by_ip entries. */
	struct up_learned learned[UP_MAX_LEARNED];
};

/* ep_names: attachment (container id, ifname) -> endpoint id. DEL, CHECK
 * and re-ADD find an endpoint with one lookup, whatever the probing of its
 * id went through (ids are claimed by linear probing from a hash). */
struct up_attach_key {
	char container_id[72];
	char ifname[16];
};

/* ep_progs slots: the bodies endpoint_ingress/endpoint_egress tail-call. */
enum up_ep_prog {
	UP_EP_PROG_INGRESS = 0,
	UP_EP_PROG_EGRESS = 1,
	UP_EP_PROG_MAX = 2,
};

/* events ring buffer: what userspace must log, not count. */
enum up_event_kind {
	UP_EVENT_IP_CONFLICT = 1, /* a frame from the wire claims an endpoint's IP */
};

struct up_event {
	__u32 kind;     /* enum up_event_kind */
	__u32 ep_id;
	__u32 ifindex;  /* the parent it arrived on */
	__u16 proto;    /* ETH_P_ARP or ETH_P_IPV6 (ND) */
	__u8 mac[6];    /* the offending MAC */
	__u8 addr[16];  /* the claimed address, IPv4 mapped */
};

/* trace (tests only, see trace_redirects): the last redirect decision. */
enum up_trace_kind {
	UP_TRACE_NONE = 0,
	UP_TRACE_REDIRECT = 1,
	UP_TRACE_CLONE = 2,
};

struct up_trace {
	__u32 kind;
	__u32 ifindex;
	__u64 flags;
	__u32 ep_id;
	__u32 count;
};

/* ---- Services translated at the pod (services.mode: ebpf) ------------------
 *
 * svc_frontends: (VIP, port, protocol) -> the Service. Its backends are the
 * slots (id, rev, 0..count-1) of svc_slots, each naming a backend id in
 * svc_backends. An update writes the other rev's slots, then flips the
 * frontend to them, so a packet sees the old set or the new one, never a
 * mix or an empty one. svc_ct remembers which backend a flow got (consistent
 * for the flow's life), svc_rev how to make the reply look like it came from
 * the VIP. All written by the agent, except svc_ct, svc_rev and
 * svc_affinity, which the programs write. */

enum up_svc_flags {
	UP_SVC_AFFINITY = 1 << 0, /* sessionAffinity: ClientIP */
};

struct up_svc_key {
	__u8 addr[16];    /* the VIP, IPv4 mapped */
	__u16 port;       /* network order */
	__u8 l4proto;
	__u8 _pad;
};

struct up_svc {
	__u32 id;           /* names the slots; unique per frontend */
	__u16 count;        /* slots in rev; 0: no usable backend, the Service is stale */
	__u8 rev;           /* 0 or 1: which slots are current */
	__u8 flags;         /* enum up_svc_flags */
	__u32 affinity_sec; /* sessionAffinity timeout */
	__u32 gen;          /* bumped on every change: affinity older than it is void */
};

struct up_slot_key {
	__u32 svc_id;
	__u16 slot;
	__u8 rev;
	__u8 _pad;
};

struct up_backend {
	__u8 addr[16];   /* IPv4 mapped */
	__u16 port;      /* network order */
	__u16 _pad;
	__u32 _pad2;
};

/* A translated flow, as the client sent it. */
struct up_ct_key {
	__u8 client[16];
	__u8 vip[16];
	__u16 client_port; /* network order */
	__u16 vport;       /* network order */
	__u8 l4proto;
	__u8 _pad[3];
};

struct up_ct {
	__u32 backend_id;
	__u32 svc_id;
	__u64 seen_ns;
	/* The backend itself: an id the agent handed out again (after a
	 * restart) to another backend must not inherit the flow. */
	__u8 addr[16];
	__u16 port;
	__u8 flags;         /* enum up_ct_flags */
	__u8 _pad;
	/* The frontend's gen when the flow picked its backend from the
	 * frontend's slots (or from an affinity entry of that gen, picked
	 * from them). While the frontend's gen is still that, the backend
	 * is in its slots, so listed (the agent deletes a backend only
	 * after each frontend using it has been rewritten with a new gen,
	 * and never hands out a frontend id a flow or an affinity entry
	 * still holds): the
	 * flow's packets need not look it up. Once the frontend changes,
	 * they do, for the rest of the flow. 0 (an older build's flow)
	 * never matches. */
	__u32 gen;
};

enum up_ct_flags {
	/* The pod used the tuple directly (its svc_rev entry was deleted):
	 * the flow's next packet writes it again. */
	UP_CT_CHECK_REV = 1 << 0,
	/* Its TCP connection ended (a FIN or a RST, either way): a SYN on
	 * the tuple is a new connection, which picks a backend afresh. */
	UP_CT_CLOSED = 1 << 1,
	/* How it ended, for another VIP's flow that wants its tuple at the
	 * backend (tuple_free): a half-closed connection still carries the
	 * other way, so the tuple is free only after a FIN each way or a
	 * RST. Flows an older build marked have none of these: held. */
	UP_CT_FIN_CLIENT = 1 << 2,
	UP_CT_FIN_BACKEND = 1 << 3,
	UP_CT_RESET = 1 << 4,
};

/* The reply direction of a translated flow, as the backend sends it. */
struct up_rev_key {
	__u8 backend[16];
	__u8 client[16];
	__u16 backend_port;
	__u16 client_port;
	__u8 l4proto;
	__u8 _pad[3];
};

struct up_rev {
	__u8 vip[16];
	__u16 vport;
	__u16 _pad;
	__u32 svc_id; /* whose svc_counters the reply counts in (0: none) */
};

struct up_affinity_key {
	__u32 svc_id;
	__u8 client[16];
};

struct up_affinity {
	__u32 backend_id;
	__u32 gen;      /* the frontend's gen when it was chosen (gens are node-wide, never reused) */
	__u64 seen_ns;
	__u8 addr[16];  /* the backend itself, as in up_ct */
	__u16 port;
	__u16 _pad[3];
};

/* svc_frags: an IP fragment after the first has no L4 header, so nothing
 * to find its flow by: the first fragment of a translated datagram (or of
 * a reply) records where the rest of it goes, by its identification. */
struct up_frag_key {
	__u8 saddr[16];
	__u8 daddr[16];
	__u32 id;       /* the IP identification (IPv4: 16 bits), as sent */
	__u8 l4proto;
	__u8 reply;     /* 0: a client's datagram to a VIP; 1: a backend's reply. The map
			 * is node-wide: a backend's own egress must not find its reply's entry. */
	__u8 _pad[2];
};

struct up_frag {
	__u8 addr[16];  /* the new destination (a backend) or source (the VIP) */
	__u16 port;     /* the backend's port (its MAC is found as for the first fragment) */
	__u16 _pad;
	__u32 svc_id;   /* whose svc_counters count it */
};

/* svc_counters: per-CPU, per frontend id. The agent creates an entry with
 * its frontend and deletes it with it; the programs only bump one that is
 * there, so the map never holds more than the frontends. */
struct up_svc_counters {
	struct up_counter to_backend;   /* the clients' frames, translated */
	struct up_counter from_backend; /* the backends' replies, given the VIP back */
	__u64 flows;                    /* flows that picked a backend */
	__u64 failures;                 /* frames with no backend to give: stale, or a slot missing mid-update */
};

/* svc_names: frontend id -> the Service port it is, for metrics and
 * underpassctl. Written by the agent; the programs never read it. */
struct up_svc_name {
	char service[128]; /* namespace/name: 63 + 1 + 63 at most */
	char port[16];     /* the port's name (15 at most), or its number */
};

enum up_svc_stat {
	UP_SVC_STAT_TRANSLATED = 0, /* frames to a VIP sent to a backend */
	UP_SVC_STAT_REVERSED = 1,   /* replies given the VIP back as source */
	UP_SVC_STAT_NEW_FLOWS = 2,  /* flows that picked a backend */
	UP_SVC_STAT_NO_SLOT = 3,    /* a slot or backend missing mid-update: left to the host */
	UP_SVC_STAT_STALE = 4,      /* a frontend with no backend: the stale guard took it */
	UP_SVC_STAT_UNTRANSLATABLE = 5, /* SCTP to another port (its CRC covers the port): left to the host */
	UP_SVC_STAT_MAX = 6,
	UP_SVC_STAT_SLOTS = 8,
};

#endif
