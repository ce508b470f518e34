package datapath_test

// ipvlan end to end, per mode. ipvlan slaves share the parent's MAC, so the
// datapath finds them by IP (ep_by_ip; nothing in ep_by_mac).
//
// How each direction travels (see test/vm/RESULTS.md for the measured table):
//   - host -> container: the hairpin on the parent's egress in every mode
//     (dst IP an endpoint; in L3/L3S the host's route to the pod subnet
//     points at the wire gateway, so the program matches by IP and
//     rewrites the destination MAC to the parent's).
//   - container -> host: L2: the driver itself forwards a slave's frame to
//     the parent MAC into the host stack (ipvlan_xmit_mode_l2); L3/L3S: the
//     driver routes it in the node's netns, a local destination is
//     delivered there. Neither touches the parent's egress.
//   - container -> wire, live and stale VIPs: through the parent's egress
//     in every mode (L2: the slave's frame to the gateway MAC; L3/L3S: the
//     node's routing sends it out of eth0).
//
// L3/L3S slaves have no ARP/ND: the wire and the host cannot resolve their
// addresses on a shared subnet. The containers of those modes live on a pod
// subnet that the wire routes via the node, as L3 deployments do.
//
// Without the ipvlan driver (the dev host) the tests skip, through
// testutil.SkipIfNotSupported; the VM matrix sets
// UNDERPASS_REQUIRE_FEATURES=ipvlan so they cannot skip there.

import (
	"errors"
	"net"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/underpass-cni/underpass/internal/attach"
	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
	"github.com/underpass-cni/underpass/internal/testutil"
	"github.com/underpass-cni/underpass/test/netenv"
)

var (
	podNet4 = netip.MustParsePrefix("203.0.113.0/24")
	podNet6 = netip.MustParsePrefix("2001:db8:99::/64")
)

type ipvlanMode struct {
	name   string
	link   netenv.IPvlanMode
	parent loader.Mode
	routed bool // L3/L3S: containers on podNet, routed by the wire via the node
}

var ipvlanModes = []ipvlanMode{
	{"l2", netenv.IPvlanL2, loader.ModeIPvlanL2, false},
	{"l3", netenv.IPvlanL3, loader.ModeIPvlanL3, true},
	{"l3s", netenv.IPvlanL3S, loader.ModeIPvlanL3S, true},
}

// ipvlanContainer adds an ipvlan container and registers it the way the
// plugin does for ipvlan: mode of the parent, MAC = the parent's MAC, found
// by IP only.
func (n *node) ipvlanContainer(t *testing.T, m ipvlanMode, name string, host int) (*netenv.Container, uint32) {
	t.Helper()
	ip4, ip6 := n.up.IP4(host), n.up.IP6(host)
	if m.routed {
		ip4, ip6 = netenv.NthAddr(podNet4, host), netenv.NthAddr(podNet6, host)
	}
	c := n.env.AddIpvlanContainer(name, m.link, ip4, ip6)
	if c.MAC.String() != n.up.MAC.String() {
		t.Fatalf("ipvlan slave MAC %s, want the parent's %s", c.MAC, n.up.MAC)
	}
	id, err := datapath.Register(&n.dp.Maps, datapath.Endpoint{
		ContainerID: "e2e-ipvlan-" + name, IfName: c.IfName, Netns: c.Path, ParentIfindex: c.ParentIndex,
		ParentName: c.Parent, Ifindex: c.Index, Mode: m.parent, MAC: c.MAC,
		Addrs: []netip.Prefix{c.IP4, c.IP6}, PodName: name, PodNamespace: "e2e",
	})
	must(t, err)
	k := datapath.MACKey(c.MAC, c.ParentIndex)
	var ref loader.EndpointRef
	if err := n.dp.Maps.EpByMac.Lookup(&k, &ref); !errors.Is(err, ebpf.ErrKeyNotExist) {
		t.Fatalf("ipvlan endpoint in ep_by_mac (lookup: %v, %+v): the parent's MAC would be taken for a slave", err, ref)
	}
	// The slave's own programs, as the plugin attaches them: every test
	// below runs with the per-endpoint counters and the spoofing check.
	must(t, attach.Endpoint(n.dp.EndpointTarget(id, c.Path, c.Index)))
	t.Cleanup(func() { attach.DetachEndpoint(attach.EndpointOptions{ID: id, Ifindex: c.Index, Netns: c.Path}) })
	return c, id
}

func TestIpvlan(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.SkipIfNotSupported(t, netenv.ProbeIpvlan())
	for _, m := range ipvlanModes {
		// Each mode has its own lab (a parent carries one ipvlan mode);
		// most of the time is spent waiting for pings that must not come
		// back, so the modes run side by side.
		t.Run(m.name, func(t *testing.T) {
			t.Parallel()
			testIpvlanMode(t, m)
		})
	}
}

func testIpvlanMode(t *testing.T, m ipvlanMode) {
	n := newNodeMode(t, netenv.Options{}, m.parent)
	a, idA := n.ipvlanContainer(t, m, "a", 10)
	b, _ := n.ipvlanContainer(t, m, "b", 11)
	host4, host6 := n.up.Node4.Addr(), n.up.Node6.Addr()
	hostLn := netenv.ListenTCP(t, n.env.Node, netip.AddrPortFrom(netip.IPv6Unspecified(), 0))
	hostPort := uint16(hostLn.Addr().(*net.TCPAddr).Port)

	// Frames the tests count at the wire are sent before a marker frame; an
	// L3/L3S slave cannot send the (broadcast) marker itself, the driver
	// drops a slave's multicast in those modes, so the node sends it on
	// eth0, the NIC everything of the container leaves through.
	barrierNS, barrierIf := a.NS, a.IfName
	if m.routed {
		barrierNS, barrierIf = n.env.Node, n.up.Name
	}

	t.Run("host to container", func(t *testing.T) {
		before, after := n.hostToContainerHairpin(t, a, idA)
		t.Logf("%s host->container: host_to_ep +%d packets", m.name, after.HostToEp.Packets-before.HostToEp.Packets)
	})

	t.Run("container to host", func(t *testing.T) {
		before, after := n.containerToHost(t, a, idA, hostPort)
		// Informational: the driver (L2) or the node's routing (L3/L3S)
		// delivers these, not the hairpin; the host's answers are
		// host->container and hairpinned.
		t.Logf("%s container->host: ep_to_host +%d, host_to_ep +%d packets", m.name,
			after.EpToHost.Packets-before.EpToHost.Packets, after.HostToEp.Packets-before.HostToEp.Packets)
	})

	t.Run("container and wire gateway", func(t *testing.T) {
		wantWireBothWays(t, a, n.up, n.env.Wire)
	})

	t.Run("container to container", func(t *testing.T) {
		wantPing(t, a.NS, b.IP4.Addr())
		wantPing(t, a.NS, b.IP6.Addr())
	})

	t.Run("live VIP is steered to the host", func(t *testing.T) {
		n.liveVIPStaysOff(t, a, hostPort, barrierNS, barrierIf)
	})

	testStaleNeverLeaks(t, n, a.NS, idA, barrierNS, barrierIf)

	t.Run("host reachability off", func(t *testing.T) {
		n.config(t, datapath.Config{ServicesSynced: true, HostReachable: false})
		defer n.config(t, datapath.Config{ServicesSynced: true, HostReachable: true})
		before := n.stats(t, idA)
		wantNoPing(t, n.env.Node, a.IP4.Addr())
		wantNoPing(t, n.env.Node, a.IP6.Addr())
		// The request reaches the host by the driver or by routing; the
		// answer is what the hairpin drops.
		wantNoPing(t, a.NS, host4)
		wantNoPing(t, a.NS, host6)
		wantPing(t, a.NS, n.up.Gateway4)
		after := n.stats(t, idA)
		if after.Drops[loader.DropHostUnreachable] <= before.Drops[loader.DropHostUnreachable] {
			t.Fatal("host_unreachable drops not counted")
		}
	})
	wantPing(t, n.env.Node, a.IP4.Addr())

	t.Run("endpoint programs count and pass the slave's own traffic", func(t *testing.T) {
		s := n.stats(t, idA)
		if s.Drops[loader.DropSpoofedSource] != 0 {
			t.Fatalf("%d of the slave's own frames dropped as spoofed", s.Drops[loader.DropSpoofedSource])
		}
		if s.Tx.Packets == 0 || s.Rx.Packets == 0 {
			t.Fatalf("endpoint counters did not move: rx %+v tx %+v", s.Rx, s.Tx)
		}
		t.Logf("%s endpoint a: rx %d tx %d packets", m.name, s.Rx.Packets, s.Tx.Packets)
	})
}
