package datapath_test

// VLAN sub-interface parents (issue #17): two networks on two VLANs of one
// NIC, eth0.100 and eth0.200, the Rancher/Docker layout. The parents are the
// VLAN interfaces; eth0, the trunk, carries no program. Each VLAN has its
// own subnet and gateway on the wire, and nothing routes between them
// (netenv.AddVLAN).
//
// Without 8021q (the dev host) the test skips through
// testutil.SkipIfNotSupported (feature "vlan"); the VM matrix loads 8021q
// and sets UNDERPASS_REQUIRE_FEATURES=ipvlan,vlan, so it cannot skip there.

import (
	"fmt"
	"net"
	"net/netip"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/vishvananda/netlink"

	"github.com/underpass-cni/underpass/internal/loader"
	"github.com/underpass-cni/underpass/internal/metrics"
	"github.com/underpass-cni/underpass/internal/testutil"
	"github.com/underpass-cni/underpass/test/netenv"
)

type vlanNet struct {
	*node    // the shared datapath, with up = this VLAN's parent
	a, b     *netenv.Container
	idA, idB uint32
}

func TestVLANParents(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.SkipIfNotSupported(t, testutil.ProbeVLAN())
	env := netenv.New(t, netenv.Options{})
	trunk := env.Uplinks[0]
	v100 := env.AddVLAN(trunk, 100, netip.MustParsePrefix("10.100.0.0/24"), netip.MustParsePrefix("2001:db8:100::/64"))
	v200 := env.AddVLAN(trunk, 200, netip.MustParsePrefix("10.200.0.0/24"), netip.MustParsePrefix("2001:db8:200::/64"))
	// As the agent does with parents: [eth0.100, eth0.200].
	n := startNode(t, env, loader.ModeMacvlan, v100, v200)

	var nets []*vlanNet
	for _, up := range []*netenv.Uplink{v100, v200} {
		v := &vlanNet{node: &node{env: env, dp: n.dp, up: up}}
		v.a, v.idA = v.container(t, fmt.Sprintf("a%d", up.VID), 10)
		v.b, v.idB = v.container(t, fmt.Sprintf("b%d", up.VID), 11)
		if v.a.Parent != up.Name || v.a.ParentIndex != up.Index {
			t.Fatalf("container a on %s/%d, want %s/%d", v.a.Parent, v.a.ParentIndex, up.Name, up.Index)
		}
		nets = append(nets, v)
	}
	hostLn := netenv.ListenTCP(t, env.Node, netip.AddrPortFrom(netip.IPv6Unspecified(), 0))
	hostPort := uint16(hostLn.Addr().(*net.TCPAddr).Port)

	for _, v := range nets {
		t.Run(v.up.Name, func(t *testing.T) { testVLAN(t, v, hostPort) })
	}

	t.Run("no cross-talk between the VLANs", func(t *testing.T) {
		for _, d := range [][2]*vlanNet{{nets[0], nets[1]}, {nets[1], nets[0]}} {
			testNoCrossTalk(t, d[0], d[1])
		}
	})

	t.Run("counters per VLAN parent", func(t *testing.T) {
		testVLANCounters(t, n, nets)
	})
}

// testVLAN: the hairpin both ways, container to container, the gateway, and
// the Service steering on one VLAN parent.
func testVLAN(t *testing.T, v *vlanNet, hostPort uint16) {
	a := v.a

	t.Run("host to container", func(t *testing.T) {
		// Everything of every VLAN passes the trunk's wire end.
		v.hostToContainerHairpin(t, a, v.idA)
	})

	t.Run("container to host", func(t *testing.T) {
		before, after := v.containerToHost(t, a, v.idA, hostPort)
		if after.EpToHost.Packets <= before.EpToHost.Packets {
			t.Errorf("ep_to_host did not move (%d -> %d): the hairpin was not used", before.EpToHost.Packets, after.EpToHost.Packets)
		}
	})

	t.Run("container to container", func(t *testing.T) {
		wantPing(t, a.NS, v.b.IP4.Addr())
		wantPing(t, a.NS, v.b.IP6.Addr())
		wantPing(t, v.b.NS, a.IP4.Addr())
	})

	t.Run("container and its VLAN's gateway", func(t *testing.T) {
		wantWireBothWays(t, a, v.up, v.up.GatewayNS)
	})

	t.Run("live VIP is steered to the host", func(t *testing.T) {
		v.liveVIPStaysOff(t, a, hostPort, a.NS, a.IfName)
	})

	testStaleNeverLeaks(t, v.node, a.NS, v.idA, a.NS, a.IfName)
}

// testNoCrossTalk: from's container a cannot reach to's container a, neither
// routed (its gateway routes nothing) nor at L2: with an on-link route to
// the other's address it resolves it on its own VLAN, and none of its
// frames reach the other VLAN (its gateway's interface, the container).
// Control: its own VLAN's gateway interface sees those frames.
func testNoCrossTalk(t *testing.T, from, to *vlanNet) {
	t.Run(fmt.Sprintf("%s to %s", from.up.Name, to.up.Name), func(t *testing.T) {
		src, dst := from.a, to.a
		ctl := netenv.StartCounter(t, from.up.GatewayNS, from.up.GatewayIf, netenv.MatchSrcMAC(src.MAC))
		atGw := netenv.StartCounter(t, to.up.GatewayNS, to.up.GatewayIf, netenv.MatchSrcMAC(src.MAC))
		atDst := netenv.StartCounter(t, dst.NS, dst.IfName, netenv.MatchSrcMAC(src.MAC))
		atB := netenv.StartCounter(t, to.b.NS, to.b.IfName, netenv.MatchSrcMAC(src.MAC))

		// Routed: through the default route to its own gateway.
		wantNoPing(t, src.NS, dst.IP4.Addr())
		wantNoPing(t, src.NS, dst.IP6.Addr())

		// L2: on-link routes make src ARP / solicit for dst on its own VLAN.
		var routes []*netlink.Route
		must(t, src.NS.Do(func() error {
			l, err := netlink.LinkByName(src.IfName)
			if err != nil {
				return err
			}
			for _, p := range []netip.Prefix{dst.IP4, dst.IP6} {
				a := p.Addr()
				r := &netlink.Route{LinkIndex: l.Attrs().Index, Scope: netlink.SCOPE_LINK,
					Dst: &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(a.BitLen(), a.BitLen())}}
				if err := netlink.RouteAdd(r); err != nil {
					return fmt.Errorf("route %s dev %s: %w", a, src.IfName, err)
				}
				routes = append(routes, r)
			}
			return nil
		}))
		t.Cleanup(func() {
			src.NS.Do(func() error {
				for _, r := range routes {
					netlink.RouteDel(r)
				}
				return nil
			})
		})
		wantNoPing(t, src.NS, dst.IP4.Addr())
		wantNoPing(t, src.NS, dst.IP6.Addr())

		netenv.Barrier(t, src.NS, src.IfName, ctl)
		netenv.Barrier(t, to.up.GatewayNS, to.up.GatewayIf, atGw, atDst, atB)
		if ctl.Count() == 0 {
			t.Fatalf("the gateway of %s saw none of %s's frames: the test proves nothing", from.up.Name, src.Name)
		}
		if atGw.Count() != 0 || atDst.Count() != 0 || atB.Count() != 0 {
			t.Fatalf("%s's frames crossed into %s: %d at its gateway, %d at %s, %d at %s",
				src.Name, to.up.Name, atGw.Count(), atDst.Count(), dst.Name, atB.Count(), to.b.Name)
		}
		t.Logf("%s -> %s: %d frames on %s, 0 on %s", src.Name, dst.Name, ctl.Count(), from.up.Name, to.up.Name)
	})
}

// testVLANCounters: the endpoints' series carry their VLAN parent, and the
// hairpin and stale counters of each parent add up to its endpoints' own.
func testVLANCounters(t *testing.T, n *node, nets []*vlanNet) {
	reg := prometheus.NewPedanticRegistry()
	must(t, reg.Register(metrics.New(&n.dp.Maps, metrics.Options{})))
	mfs, err := reg.Gather()
	must(t, err)
	type key struct{ metric, label, parent string }
	sums := map[key]float64{}
	podParent := map[string]string{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			l := map[string]string{}
			for _, lp := range m.GetLabel() {
				l[lp.GetName()] = lp.GetValue()
			}
			parent, ok := l["parent"]
			if !ok {
				continue
			}
			podParent[l["pod"]] = parent
			sums[key{mf.GetName(), l["direction"] + l["action"], parent}] += m.GetCounter().GetValue()
		}
	}
	for _, v := range nets {
		var hostToEp, epToHost, stale uint64
		for _, c := range []struct {
			pod string
			id  uint32
		}{{fmt.Sprintf("a%d", v.up.VID), v.idA}, {fmt.Sprintf("b%d", v.up.VID), v.idB}} {
			if got := podParent[c.pod]; got != v.up.Name {
				t.Errorf("pod %s: parent label %q, want %q", c.pod, got, v.up.Name)
			}
			s := v.stats(t, c.id)
			hostToEp += s.HostToEp.Packets
			epToHost += s.EpToHost.Packets
			stale += s.StaleDropped
		}
		got := func(metric, label string) uint64 { return uint64(sums[key{metric, label, v.up.Name}]) }
		h2e := got("underpass_host_redirects_total", "host_to_endpoint")
		e2h := got("underpass_host_redirects_total", "endpoint_to_host")
		st := got("underpass_stale_service_packets_total", "dropped")
		t.Logf("parent %s: host_to_endpoint %d, endpoint_to_host %d, stale dropped %d", v.up.Name, h2e, e2h, st)
		if h2e == 0 || e2h == 0 || st < 4 {
			t.Errorf("parent %s: host_to_endpoint %d, endpoint_to_host %d, stale dropped %d: want the hairpin both ways and >= 4 stale drops",
				v.up.Name, h2e, e2h, st)
		}
		// The scrape came first: the endpoints' own counters can only be
		// ahead of it (background traffic such as ND), never behind.
		if hostToEp < h2e || epToHost < e2h || stale != st {
			t.Errorf("parent %s: series (%d, %d, %d) do not add up to its endpoints' counters (%d, %d, %d)",
				v.up.Name, h2e, e2h, st, hostToEp, epToHost, stale)
		}
	}
}
