package cni_test

import (
	"errors"
	"net"
	"net/netip"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/underpass-cni/underpass/loader"
	"github.com/underpass-cni/underpass/test/netenv"
)

// A pod that takes another pod's or the node's address, or another pod's
// MAC, gets nothing out: its frames are dropped at its own interface and
// counted spoofed_source, the wire sees none of them, and the pod it
// impersonates keeps working.
func TestSpoofingThroughThePlugin(t *testing.T) {
	h := newHarness(t, harnessOpts{})
	u := h.env.Uplinks[0]
	l := h.conflist("up-spoof", "1.1.0", h.mainConf(false))
	a, b := h.newPod("a"), h.newPod("b")
	h.add(l, a)
	h.add(l, b)
	h.baselineParents()
	netenv.MustPing(t, a.ns, u.Gateway4, 1) // neighbours resolved while honest

	eth0 := func() netlink.Link {
		t.Helper()
		lk, err := a.ns.Netlink().LinkByName("eth0")
		must(t, err)
		return lk
	}
	// setAddr replaces a's address with p (same subnet, so the default route
	// stays usable) and returns the undo.
	setAddr := func(addr netip.Addr) func() {
		t.Helper()
		own := &netlink.Addr{IPNet: &net.IPNet{IP: a.ip4.AsSlice(), Mask: net.CIDRMask(24, 32)}}
		fake := &netlink.Addr{IPNet: &net.IPNet{IP: addr.AsSlice(), Mask: net.CIDRMask(24, 32)}}
		must(t, a.ns.Netlink().AddrDel(eth0(), own))
		must(t, a.ns.Netlink().AddrAdd(eth0(), fake))
		must(t, a.ns.Netlink().RouteAdd(&netlink.Route{LinkIndex: eth0().Attrs().Index, Gw: u.Gateway4.AsSlice()}))
		// Removing the address flushed the neighbours: a static entry makes
		// the pings themselves go out (else only ARP would, and the kernel
		// would drop the queued pings when it failed).
		must(t, a.ns.Netlink().NeighSet(&netlink.Neigh{LinkIndex: eth0().Attrs().Index, Family: netlink.FAMILY_V4,
			State: netlink.NUD_PERMANENT, IP: u.Gateway4.AsSlice(), HardwareAddr: u.GatewayMAC}))
		return func() {
			must(t, a.ns.Netlink().AddrDel(eth0(), fake))
			must(t, a.ns.Netlink().AddrAdd(eth0(), own))
			must(t, a.ns.Netlink().RouteAdd(&netlink.Route{LinkIndex: eth0().Attrs().Index, Gw: u.Gateway4.AsSlice()}))
		}
	}
	setMAC := func(mac net.HardwareAddr) func() {
		t.Helper()
		own := eth0().Attrs().HardwareAddr
		must(t, a.ns.Netlink().LinkSetHardwareAddr(eth0(), mac))
		return func() { must(t, a.ns.Netlink().LinkSetHardwareAddr(eth0(), own)) }
	}

	// Another pod's MAC: macvlan itself refuses it on the same parent.
	if err := a.ns.Netlink().LinkSetHardwareAddr(eth0(), b.mac); !errors.Is(err, unix.EADDRINUSE) {
		t.Fatalf("setting pod b's MAC on pod a: %v, want EADDRINUSE from macvlan", err)
	}

	for _, tc := range []struct {
		name  string
		spoof func() (undo func())
	}{
		{"pod b's address", func() func() { return setAddr(b.ip4) }},
		{"the node's address", func() func() { return setAddr(u.Node4.Addr()) }},
		{"an unassigned address", func() func() { return setAddr(u.IP4(250).Addr()) }},
		{"the gateway's MAC", func() func() { return setMAC(u.GatewayMAC) }},
		{"a made-up MAC", func() func() { return setMAC(net.HardwareAddr{0x02, 0xba, 0xd0, 0, 0, 1}) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			wire := netenv.StartCounter(t, h.env.Wire, u.Port, netenv.MatchDstIP(u.Gateway4))
			before := h.stats(t, a)
			undo := tc.spoof()
			r := netenv.Ping(t, a.ns, u.Gateway4, 3)
			undo()
			netenv.Barrier(t, h.env.Node, u.Name, wire)
			after := h.stats(t, a)
			if r.Received != 0 {
				t.Errorf("spoofed pings answered: %v", r)
			}
			if n := wire.Count(); n != 0 {
				t.Errorf("%d spoofed frames reached the wire", n)
			}
			if d := after.Drops[loader.DropSpoofedSource] - before.Drops[loader.DropSpoofedSource]; d < 3 {
				t.Errorf("spoofed_source drops of pod a moved by %d, want at least 3", d)
			}
			// The impersonated pod and the honest a work as before.
			netenv.MustPing(t, b.ns, u.Gateway4, 2)
			netenv.MustPing(t, h.env.Node, b.ip4, 2)
			netenv.MustPing(t, a.ns, u.Gateway4, 2)
		})
	}
	h.del(l, a)
	h.del(l, b)
	h.assertNoLeak(t, nil, a.ns, b.ns)
}
