package cni_test

import (
	"errors"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"

	"github.com/underpass-cni/underpass/internal/attach"
	"github.com/underpass-cni/underpass/internal/loader"
	"github.com/underpass-cni/underpass/test/netenv"
)

var specVersions = []string{"0.4.0", "1.0.0", "1.1.0"}

func TestMainMode(t *testing.T) {
	for _, v := range specVersions {
		t.Run(v, func(t *testing.T) {
			h := newHarness(t, harnessOpts{})
			l := h.conflist("up-main", v, h.mainConf(true))
			h.lifecycle(t, l, v)
		})
	}
}

func TestChainedMode(t *testing.T) {
	for _, v := range specVersions {
		t.Run(v, func(t *testing.T) {
			h := newHarness(t, harnessOpts{})
			l := h.conflist("up-chained", v, h.chainedConfs(true)...)
			h.lifecycle(t, l, v)
		})
	}
}

// lifecycle: two pods up, every path works both ways with exact counters,
// CHECK passes, DEL leaves nothing.
func (h *harness) lifecycle(t *testing.T, l *libcni.NetworkConfigList, version string) {
	a, b := h.podPair(l)
	if !a.ip4.IsValid() || !a.ip6.IsValid() || a.mac == nil {
		t.Fatalf("pod a result lacks addresses or MAC: %+v", a.res)
	}
	if len(a.res.Routes) != 2 {
		t.Errorf("pod a got routes %v: want only IPAM's two default routes (no service or host routes)", a.res.Routes)
	}
	h.checkRegistered(t, a)

	h.connectivity(t, a, b)

	if err := h.check(l, a); err != nil {
		t.Fatalf("CHECK a: %v", err)
	}
	if version == "1.1.0" {
		if err := h.status(l); err != nil {
			t.Fatalf("STATUS: %v", err)
		}
	}
	h.del(l, a)
	h.del(l, b)
	h.del(l, a) // idempotent
	h.assertNoLeak(t, nil, a.ns, b.ns)
}

func (h *harness) checkRegistered(t *testing.T, p *pod) {
	t.Helper()
	id, ep := h.endpointOf(t, p)
	h.checkFilters(t, p, id)
	u := h.env.Uplinks[0]
	if ep.ParentIfindex != u.Index || ep.Mode != loader.ModeMacvlan {
		t.Errorf("registered on parent %d mode %s, want %d macvlan", ep.ParentIfindex, ep.Mode, u.Index)
	}
	if ep.MAC.String() != p.mac.String() {
		t.Errorf("registered MAC %s, pod has %s", ep.MAC, p.mac)
	}
	if ep.PodName != p.name {
		t.Errorf("registered pod name %q, want %q (from CNI_ARGS)", ep.PodName, p.name)
	}
}

// checkFilters checks that p's interface runs the programs of endpoint id
// both ways.
func (h *harness) checkFilters(t *testing.T, p *pod, id uint32) {
	t.Helper()
	att, err := attach.InspectEndpoint(p.netns, mustIndex(t, p))
	must(t, err)
	if att != (attach.EndpointFilters{Ingress: id, Egress: id}) {
		t.Errorf("pod %s runs the programs of endpoints %+v, want %d", p.name, att, id)
	}
}

// connectivity checks every path of pod a, both ways, and that a's
// counters moved by exactly what its interface carried.
func (h *harness) connectivity(t *testing.T, a, b *pod) {
	t.Helper()
	u := h.env.Uplinks[0]
	node4, node6 := u.Node4.Addr(), u.Node6.Addr()
	const n = 5

	// Neighbours first, so the counted run is not about resolution (it
	// would be counted exactly anyway; this keeps the echo count clean).
	for _, dst := range []netip.Addr{b.ip4, b.ip6, u.Gateway4, u.Gateway6, node4, node6, netenv.LiveVIP4} {
		netenv.Ping(t, a.ns, dst, 1)
	}
	before := h.stats(t, a)
	nat0 := h.svcNAT.Packets(t)
	h.exactCounters(t, a, 7*n, func() {
		// And the other way: the node, the wire and pod b reach a.
		pingBothWays(t, a, []netip.Addr{b.ip4, b.ip6, u.Gateway4, u.Gateway6, node4, node6, netenv.LiveVIP4}, []*netenv.NS{h.env.Node, h.env.Wire, b.ns}, n)
	})
	after := h.stats(t, a)
	// Host traffic went through the hairpin: node pings both ways plus the
	// VIP, each request or reply one redirect.
	if got := after.EpToHost.Packets - before.EpToHost.Packets; got < 3*n {
		t.Errorf("endpoint->host redirects moved by %d, want at least %d", got, 3*n)
	}
	if got := after.HostToEp.Packets - before.HostToEp.Packets; got < 3*n {
		t.Errorf("host->endpoint redirects moved by %d, want at least %d", got, 3*n)
	}

	// TCP both ways through the host: to the VIP (the node's DNAT sends it
	// to a server on the node's address) and from the node to a server in
	// the pod.
	ln := netenv.ListenTCP(t, h.env.Node, netip.AddrPortFrom(node4, 0))
	port := uint16(ln.Addr().(interface{ AddrPort() netip.AddrPort }).AddrPort().Port())
	if err := netenv.DialTCP(a.ns, netip.AddrPortFrom(netenv.LiveVIP4, port), 2*time.Second); err != nil {
		t.Errorf("pod a -> live VIP: %v", err)
	}
	// The pings to the VIP and the connection went through the node's NAT,
	// as they would through kube-proxy's: the rule sees the first packet
	// of each flow (the ping run, the TCP connection), conntrack the rest.
	if got := h.svcNAT.Packets(t) - nat0; got != 2 {
		t.Errorf("the node's DNAT of %s translated %d flows, want 2 (the pings, the connection)", netenv.LiveVIP4, got)
	}
	lp := netenv.ListenTCP(t, a.ns, netip.AddrPortFrom(netip.IPv6Unspecified(), 0))
	pport := uint16(lp.Addr().(interface{ AddrPort() netip.AddrPort }).AddrPort().Port())
	for _, dst := range []netip.Addr{a.ip4, a.ip6} {
		if err := netenv.DialTCP(h.env.Node, netip.AddrPortFrom(dst, pport), 2*time.Second); err != nil {
			t.Errorf("node -> pod a %s: %v", dst, err)
		}
	}

	// A stale VIP never reaches the gateway: dropped, counted for pod a.
	s0 := h.stats(t, a)
	if r := netenv.Ping(t, a.ns, netenv.StaleVIP4, 3); r.Received != 0 {
		t.Errorf("stale VIP answered: %v", r)
	}
	err := netenv.DialTCP(a.ns, netip.AddrPortFrom(netenv.StaleVIP4, 80), 300*time.Millisecond)
	if err == nil || errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("dial to stale VIP: %v, want a timeout (drop mode)", err)
	}
	if s1 := h.stats(t, a); s1.StaleDropped-s0.StaleDropped < 3 {
		t.Errorf("stale drops for pod a moved by %d, want at least 3", s1.StaleDropped-s0.StaleDropped)
	}
}

// macvlan private and vepa keep their meaning with underpass: the hairpin
// never carries pod -> pod (private: isolated; vepa: only the wire's
// switch may turn it around, and the lab's bridge does not), while host
// <-> pod works both ways, including a private pod that speaks first (its
// ARP for the node goes in as a unicast to the parent, which macvlan hands
// to the host alone).
func TestMacvlanModesKeepTheirMeaning(t *testing.T) {
	for _, mode := range []string{"private", "vepa"} {
		t.Run(mode, func(t *testing.T) {
			h := newHarness(t, harnessOpts{})
			u := h.env.Uplinks[0]
			conf := h.mainConf(false)
			conf["macvlanMode"] = mode
			l := h.conflist("up-"+mode, "1.1.0", conf)
			a, b := h.podPair(l)

			// The pod speaks first: no neighbour entry for the node yet.
			netenv.MustPing(t, a.ns, u.Node4.Addr(), 2)
			netenv.MustPing(t, h.env.Node, b.ip4, 2)
			netenv.MustPing(t, b.ns, u.Gateway4, 2)

			if r := netenv.Ping(t, a.ns, b.ip4, 3); r.Received != 0 {
				t.Errorf("%s: pod a reached pod b: %v", mode, r)
			}
			if r := netenv.Ping(t, b.ns, a.ip4, 3); r.Received != 0 {
				t.Errorf("%s: pod b reached pod a: %v", mode, r)
			}
			h.del(l, a)
			h.del(l, b)
			h.assertNoLeak(t, nil, a.ns, b.ns)
		})
	}
}
