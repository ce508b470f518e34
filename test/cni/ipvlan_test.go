package cni_test

import (
	"net/netip"
	"testing"

	"github.com/containernetworking/cni/libcni"

	"github.com/underpass-cni/underpass/internal/loader"
	"github.com/underpass-cni/underpass/internal/testutil"
	"github.com/underpass-cni/underpass/test/netenv"
)

// ipvlan through the plugin, main mode (l2) and chained after the reference
// ipvlan plugin. The development host has no ipvlan driver: these run in
// the kernel matrix (make test-kernels), where a skip is a failure.
func TestIpvlanMainMode(t *testing.T) {
	testutil.SkipIfNotSupported(t, netenv.ProbeIpvlan())
	h := newHarness(t, harnessOpts{})
	conf := h.mainConf(true)
	conf["mode"], conf["ipvlanMode"] = "ipvlan", "l2"
	delete(conf, "macvlanMode")
	h.ipvlanLifecycle(t, h.conflist("up-ipvlan", "1.1.0", conf))
}

func TestIpvlanChained(t *testing.T) {
	testutil.SkipIfNotSupported(t, netenv.ProbeIpvlan())
	h := newHarness(t, harnessOpts{})
	h.ipvlanLifecycle(t, h.conflist("up-ipvlan-chained", "1.1.0",
		map[string]any{"type": "ipvlan", "master": "eth0", "mode": "l2", "ipam": h.hostLocal(true)},
		map[string]any{"type": "underpass", "bpffs": h.bpffs}))
}

// ipvlanLifecycle: two pods registered as ipvlan endpoints (the parent's
// MAC, not in ep_by_mac), reachable from each other, the wire and the host;
// pod -> host works too (ipvlan delivers it without the hairpin); a stale VIP
// is dropped; CHECK passes; DEL leaves nothing.
func (h *harness) ipvlanLifecycle(t *testing.T, l *libcni.NetworkConfigList) {
	t.Helper()
	u := h.env.Uplinks[0]
	a, b := h.podPair(l)
	for _, p := range []*pod{a, b} {
		id, ep := h.endpointOf(t, p)
		if loader.Mode(ep.Mode) != loader.ModeIPvlanL2 || int(ep.ParentIfindex) != u.Index {
			t.Fatalf("pod %s registered as mode %d on parent %d, want ipvlan l2 on %d", p.name, ep.Mode, ep.ParentIfindex, u.Index)
		}
		if string(p.mac) != string(u.MAC) {
			t.Errorf("pod %s has MAC %s, want the parent's %s", p.name, p.mac, u.MAC)
		}
		h.checkFilters(t, p, id)
	}

	const n = 3
	before := h.stats(t, a)
	pingBothWays(t, a, []netip.Addr{b.ip4, b.ip6, u.Gateway4, u.Gateway6, u.Node4.Addr(), u.Node6.Addr()}, []*netenv.NS{h.env.Node, h.env.Wire, b.ns}, n)
	after := h.stats(t, a)
	if got := after.HostToEp.Packets - before.HostToEp.Packets; got < 2*n {
		t.Errorf("host->endpoint redirects moved by %d, want at least %d (the node's pings and their replies)", got, 2*n)
	}
	if after.Tx.Packets-before.Tx.Packets < 12*n || after.Rx.Packets-before.Rx.Packets < 12*n {
		t.Errorf("pod a's counters moved rx %d tx %d, want at least %d each", after.Rx.Packets-before.Rx.Packets, after.Tx.Packets-before.Tx.Packets, 12*n)
	}
	s0 := h.stats(t, a)
	if r := netenv.Ping(t, a.ns, netenv.StaleVIP4, 3); r.Received != 0 {
		t.Errorf("stale VIP answered: %v", r)
	}
	if s1 := h.stats(t, a); s1.StaleDropped-s0.StaleDropped < 3 {
		t.Errorf("stale drops for pod a moved by %d, want at least 3", s1.StaleDropped-s0.StaleDropped)
	}
	if err := h.check(l, a); err != nil {
		t.Fatalf("CHECK a: %v", err)
	}
	h.del(l, a)
	h.del(l, b)
	h.assertNoLeak(t, nil, a.ns, b.ns)
}
