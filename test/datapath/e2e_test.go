// Package datapath_test runs the datapath end to end in network namespaces:
// a wire netns (switch + gateway), a node netns whose veth eth0 is the parent
// NIC, and containers on macvlan bridge slaves, with real ping and TCP.
package datapath_test

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/underpass-cni/underpass/internal/attach"
	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
	"github.com/underpass-cni/underpass/internal/testutil"
	"github.com/underpass-cni/underpass/test/netenv"
)

type node struct {
	env *netenv.Env
	dp  *loader.Objects
	up  *netenv.Uplink
}

var must = testutil.Must

// newNode builds the lab and does what underpassd will do at start-up: load,
// register and attach the parent, publish the node's addresses and services.
func newNode(t *testing.T, opts netenv.Options) *node {
	t.Helper()
	return newNodeMode(t, opts, loader.ModeMacvlan)
}

// newNodeMode is newNode with the parent registered in another mode
// (ipvlan_test.go).
func newNodeMode(t *testing.T, opts netenv.Options, mode loader.Mode) *node {
	t.Helper()
	env := netenv.New(t, opts)
	return startNode(t, env, mode, env.Uplinks[0])
}

// startNode is newNodeMode on a lab built already, with one or more parents
// (each registered and its program attached; n.up is the first): the
// node's addresses on every uplink and VLAN are the host's.
func startNode(t *testing.T, env *netenv.Env, mode loader.Mode, parents ...*netenv.Uplink) *node {
	t.Helper()
	dp := testutil.LoadDatapath(t)
	n := &node{env: env, dp: dp, up: parents[0]}
	m := &dp.Maps
	must(t, datapath.SetConfig(m, datapath.Config{ServicesSynced: true, HostReachable: true}, 1))
	for _, p := range parents {
		must(t, datapath.PutParent(m, p.Index, p.MAC, mode))
		must(t, env.Node.Do(func() error {
			_, err := attach.Egress(dp.EgressTarget(attach.RoleParent, p.Index))
			return err
		}))
	}
	hosts := datapath.HostSet{}
	for _, u := range append(append([]*netenv.Uplink(nil), env.Uplinks...), env.VLANs...) {
		hosts.Add(netip.PrefixFrom(u.Node4.Addr(), 32), loader.HostLocal)
		hosts.Add(netip.PrefixFrom(u.Node6.Addr(), 128), loader.HostLocal)
	}
	must(t, datapath.SyncHostCIDRs(m, hosts))
	must(t, datapath.SyncServiceCIDRs(m, []netip.Prefix{netenv.SvcCIDR4, netenv.SvcCIDR6}))
	_, _, err := datapath.SyncLiveServices(m, map[netip.Addr]bool{netenv.LiveVIP4: true, netenv.LiveVIP6: true})
	must(t, err)
	// The node itself answers on the live VIPs: a stand-in for kube-proxy.
	must(t, env.Node.Do(func() error {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return err
		}
		for _, a := range []netip.Addr{netenv.LiveVIP4, netenv.LiveVIP6} {
			addr := &netlink.Addr{IPNet: &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(a.BitLen(), a.BitLen())}}
			if err := netlink.AddrAdd(lo, addr); err != nil {
				return fmt.Errorf("add %s to lo: %w", a, err)
			}
		}
		return nil
	}))
	return n
}

func (n *node) container(t *testing.T, name string, host int) (*netenv.Container, uint32) {
	t.Helper()
	c := n.env.AddMacvlanContainerOn(n.up, name, n.up.IP4(host), n.up.IP6(host))
	id, err := datapath.Register(&n.dp.Maps, datapath.Endpoint{
		ContainerID: "e2e-" + name, IfName: c.IfName, Netns: c.Path, ParentIfindex: c.ParentIndex,
		ParentName: c.Parent, Ifindex: c.Index, Mode: loader.ModeMacvlan, MAC: c.MAC,
		Addrs: []netip.Prefix{c.IP4, c.IP6}, PodName: name, PodNamespace: "e2e",
	})
	must(t, err)
	return c, id
}

func (n *node) config(t *testing.T, c datapath.Config) {
	t.Helper()
	must(t, datapath.SetConfig(&n.dp.Maps, c, 2))
}

func (n *node) stats(t *testing.T, id uint32) loader.EndpointStats {
	t.Helper()
	s, err := datapath.EndpointStats(&n.dp.Maps, id)
	must(t, err)
	return s
}

func wantPing(t *testing.T, from *netenv.NS, to netip.Addr) {
	t.Helper()
	if r := netenv.Ping(t, from, to, 3); r.Received != r.Sent {
		t.Fatalf("ping %s -> %s: %s", from.Name, to, r)
	}
}

// wantWireBothWays: container c pings up's gateway on both families, and
// from, a namespace on the wire side, pings c on both.
func wantWireBothWays(t *testing.T, c *netenv.Container, up *netenv.Uplink, from *netenv.NS) {
	t.Helper()
	wantPing(t, c.NS, up.Gateway4)
	wantPing(t, c.NS, up.Gateway6)
	wantPing(t, from, c.IP4.Addr())
	wantPing(t, from, c.IP6.Addr())
}

func wantNoPing(t *testing.T, from *netenv.NS, to netip.Addr) {
	t.Helper()
	if r := netenv.Ping(t, from, to, 2); r.Received != 0 {
		t.Fatalf("ping %s -> %s got through: %s", from.Name, to, r)
	}
}

// echo dials addr from ns, writes a message and reads it back.
func echo(t *testing.T, ns *netenv.NS, addr netip.AddrPort) {
	t.Helper()
	if err := netenv.Echo(ns, addr, "through the underpass", 3*time.Second); err != nil {
		t.Fatal(err)
	}
}

// hostToContainerHairpin: the node pings container c (endpoint id) and
// echoes to it on both families; none of those frames may reach the wire
// (counted at n.up's wire end) and host_to_ep must move. It returns the
// endpoint's stats from before and after, for the caller's log.
func (n *node) hostToContainerHairpin(t *testing.T, c *netenv.Container, id uint32) (before, after loader.EndpointStats) {
	t.Helper()
	c4 := netenv.StartCounter(t, n.env.Wire, n.up.Port, netenv.MatchDstIP(c.IP4.Addr()))
	c6 := netenv.StartCounter(t, n.env.Wire, n.up.Port, netenv.MatchDstIP(c.IP6.Addr()))
	before = n.stats(t, id)
	wantPing(t, n.env.Node, c.IP4.Addr())
	wantPing(t, n.env.Node, c.IP6.Addr())
	ln := netenv.ListenTCP(t, c.NS, netip.AddrPortFrom(netip.IPv6Unspecified(), 0))
	port := uint16(ln.Addr().(*net.TCPAddr).Port)
	echo(t, n.env.Node, netip.AddrPortFrom(c.IP4.Addr(), port))
	echo(t, n.env.Node, netip.AddrPortFrom(c.IP6.Addr(), port))
	netenv.Barrier(t, n.env.Node, n.up.Name, c4, c6)
	if c4.Count() != 0 || c6.Count() != 0 {
		t.Errorf("%d+%d host->container frames went out to the wire instead of the hairpin", c4.Count(), c6.Count())
	}
	after = n.stats(t, id)
	if after.HostToEp.Packets <= before.HostToEp.Packets {
		t.Errorf("host_to_ep did not move (%d -> %d): the hairpin was not used", before.HostToEp.Packets, after.HostToEp.Packets)
	}
	return before, after
}

// containerToHost: container c (endpoint id) pings the node's addresses on
// n.up and echoes to hostPort on both; it returns the endpoint's stats from
// before and after, for the caller to judge what carried the frames.
func (n *node) containerToHost(t *testing.T, c *netenv.Container, id uint32, hostPort uint16) (before, after loader.EndpointStats) {
	t.Helper()
	host4, host6 := n.up.Node4.Addr(), n.up.Node6.Addr()
	before = n.stats(t, id)
	wantPing(t, c.NS, host4)
	wantPing(t, c.NS, host6)
	echo(t, c.NS, netip.AddrPortFrom(host4, hostPort))
	echo(t, c.NS, netip.AddrPortFrom(host6, hostPort))
	return before, n.stats(t, id)
}

// liveVIPStaysOff: container c echoes to the live VIPs on the node's
// hostPort; none of those frames may reach the wire (counted at n.up's wire
// end, the marker frame sent on barrierIf in barrierNS).
func (n *node) liveVIPStaysOff(t *testing.T, c *netenv.Container, hostPort uint16, barrierNS *netenv.NS, barrierIf string) {
	t.Helper()
	c4 := netenv.StartCounter(t, n.env.Wire, n.up.Port, netenv.MatchDstIP(netenv.LiveVIP4))
	c6 := netenv.StartCounter(t, n.env.Wire, n.up.Port, netenv.MatchDstIP(netenv.LiveVIP6))
	echo(t, c.NS, netip.AddrPortFrom(netenv.LiveVIP4, hostPort))
	echo(t, c.NS, netip.AddrPortFrom(netenv.LiveVIP6, hostPort))
	netenv.Barrier(t, barrierNS, barrierIf, c4, c6)
	if c4.Count() != 0 || c6.Count() != 0 {
		t.Errorf("%d+%d frames to live VIPs reached the wire", c4.Count(), c6.Count())
	}
}

func TestHostToContainer(t *testing.T) {
	n := newNode(t, netenv.Options{})
	c, id := n.container(t, "a", 10)
	host4, host6 := n.up.Node4.Addr(), n.up.Node6.Addr()

	t.Run("ping", func(t *testing.T) {
		wantPing(t, n.env.Node, c.IP4.Addr())
		wantPing(t, n.env.Node, c.IP6.Addr())
		wantPing(t, c.NS, host4)
		wantPing(t, c.NS, host6)
	})
	t.Run("tcp", func(t *testing.T) {
		lc := netenv.ListenTCP(t, c.NS, netip.AddrPortFrom(netip.IPv6Unspecified(), 0))
		port := uint16(lc.Addr().(*net.TCPAddr).Port)
		echo(t, n.env.Node, netip.AddrPortFrom(c.IP4.Addr(), port))
		echo(t, n.env.Node, netip.AddrPortFrom(c.IP6.Addr(), port))
		ln := netenv.ListenTCP(t, n.env.Node, netip.AddrPortFrom(netip.IPv6Unspecified(), 0))
		port = uint16(ln.Addr().(*net.TCPAddr).Port)
		echo(t, c.NS, netip.AddrPortFrom(host4, port))
		echo(t, c.NS, netip.AddrPortFrom(host6, port))
	})
	s := n.stats(t, id)
	if s.HostToEp.Packets == 0 || s.EpToHost.Packets == 0 {
		t.Fatalf("hairpin counters did not move: %+v", s)
	}
}

func TestContainerPathsUnaffected(t *testing.T) {
	n := newNode(t, netenv.Options{})
	a, _ := n.container(t, "a", 10)
	b, _ := n.container(t, "b", 11)
	wire := n.env.AddWireHost("w", n.up.IP4(50), n.up.IP6(50))
	wantPing(t, a.NS, b.IP4.Addr())
	wantPing(t, a.NS, b.IP6.Addr())
	wantWireBothWays(t, a, n.up, wire.NS)
	wantPing(t, n.env.Node, wire.IP4.Addr())
	// The hairpin counts nothing for traffic that does not involve the host.
	g, err := datapath.GlobalStats(&n.dp.Maps)
	must(t, err)
	if g[loader.StatHostToEndpoint].Packets != 0 {
		t.Fatalf("host->endpoint counted %d packets with no host traffic", g[loader.StatHostToEndpoint].Packets)
	}
}

func TestServices(t *testing.T) {
	n := newNode(t, netenv.Options{})
	c, id := n.container(t, "a", 10)
	ln := netenv.ListenTCP(t, n.env.Node, netip.AddrPortFrom(netip.IPv6Unspecified(), 0))
	port := uint16(ln.Addr().(*net.TCPAddr).Port)

	t.Run("live VIP is steered to the host", func(t *testing.T) {
		echo(t, c.NS, netip.AddrPortFrom(netenv.LiveVIP4, port))
		echo(t, c.NS, netip.AddrPortFrom(netenv.LiveVIP6, port))
	})

	testStaleNeverLeaks(t, n, c.NS, id, c.NS, c.IfName)

	t.Run("reject mode refuses at once", func(t *testing.T) {
		n.config(t, datapath.Config{ServicesSynced: true, HostReachable: true, StaleReject: true})
		defer n.config(t, datapath.Config{ServicesSynced: true, HostReachable: true})
		for _, vip := range []netip.Addr{netenv.StaleVIP4, netenv.StaleVIP6} {
			// A generous timeout: a drop would show as a timeout, not as
			// a refusal, whatever the machine's speed.
			err := netenv.DialTCP(c.NS, netip.AddrPortFrom(vip, 80), 5*time.Second)
			if !errors.Is(err, syscall.ECONNREFUSED) {
				t.Fatalf("dial stale %s: %v, want ECONNREFUSED", vip, err)
			}
			if err := udpRefused(c.NS, netip.AddrPortFrom(vip, 53)); err != nil {
				t.Fatal(err)
			}
		}
		if s := n.stats(t, id); s.StaleRejected < 4 {
			t.Fatalf("stale_rejected = %d, want >= 4", s.StaleRejected)
		}
	})

	t.Run("deleting a service makes it stale live", func(t *testing.T) {
		must(t, datapath.DeleteLiveService(&n.dp.Maps, netenv.LiveVIP4))
		if err := netenv.DialTCP(c.NS, netip.AddrPortFrom(netenv.LiveVIP4, port), 300*time.Millisecond); err == nil {
			t.Fatal("deleted VIP still reachable")
		}
		must(t, datapath.AddLiveService(&n.dp.Maps, netenv.LiveVIP4))
		echo(t, c.NS, netip.AddrPortFrom(netenv.LiveVIP4, port))
	})
}

// testStaleNeverLeaks: a pod's TCP and ping to stale VIPs leave no frame at
// the wire and are counted for the pod; then a control proves the wire
// counter would have seen a leak. The barrier marker is sent from
// (barrierNS, barrierIf), the side the pod's traffic leaves from.
func testStaleNeverLeaks(t *testing.T, n *node, client *netenv.NS, id uint32, barrierNS *netenv.NS, barrierIf string) {
	t.Run("stale VIP never reaches the wire", func(t *testing.T) {
		c4 := netenv.StartCounter(t, n.env.Wire, n.up.Port, netenv.MatchDstIP(netenv.StaleVIP4))
		c6 := netenv.StartCounter(t, n.env.Wire, n.up.Port, netenv.MatchDstIP(netenv.StaleVIP6))
		before := n.stats(t, id)
		for _, vip := range []netip.Addr{netenv.StaleVIP4, netenv.StaleVIP6} {
			if err := netenv.DialTCP(client, netip.AddrPortFrom(vip, 80), 300*time.Millisecond); err == nil {
				t.Fatalf("connected to stale VIP %s", vip)
			}
			wantNoPing(t, client, vip)
		}
		netenv.Barrier(t, barrierNS, barrierIf, c4, c6)
		if c4.Count() != 0 || c6.Count() != 0 {
			t.Fatalf("%d+%d frames to stale VIPs reached the wire", c4.Count(), c6.Count())
		}
		after := n.stats(t, id)
		if after.StaleDropped < before.StaleDropped+4 {
			t.Fatalf("stale drops for the client went %d -> %d", before.StaleDropped, after.StaleDropped)
		}
	})

	t.Run("control: the counter sees leaks", func(t *testing.T) {
		// Without the guard (VIP outside the service CIDRs) the same
		// traffic goes to the gateway, and the counter sees it.
		leak := netip.MustParseAddr("10.97.0.99")
		cnt := netenv.StartCounter(t, n.env.Wire, n.up.Port, netenv.MatchDstIP(leak))
		netenv.DialTCP(client, netip.AddrPortFrom(leak, 80), 200*time.Millisecond)
		netenv.Barrier(t, barrierNS, barrierIf, cnt)
		if cnt.Count() == 0 {
			t.Fatal("counter saw nothing: the stale test above proves nothing")
		}
	})
}

// udpRefused sends a datagram on a connected UDP socket and expects the ICMP
// port unreachable answer to surface as ECONNREFUSED on the next read.
func udpRefused(ns *netenv.NS, addr netip.AddrPort) error {
	var conn *net.UDPConn
	err := ns.Do(func() error {
		var err error
		conn, err = net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(addr))
		return err
	})
	if err != nil {
		return err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := conn.Write([]byte("query")); err != nil {
		return fmt.Errorf("udp write to %s: %w", addr, err)
	}
	_, err = conn.Read(make([]byte, 64))
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("udp to stale %s: %v, want ECONNREFUSED", addr, err)
	}
	return nil
}

// A node whose default route leaves through a second NIC: the host routes
// stale VIPs there, so that NIC's egress needs the guard too.
func TestTwoNICNode(t *testing.T) {
	n := newNode(t, netenv.Options{SecondUplink: true, DefaultViaSecond: true})
	c, _ := n.container(t, "a", 10)
	up2 := n.env.Uplinks[1]
	must(t, n.env.Node.Do(func() error {
		_, err := attach.Egress(n.dp.EgressTarget(attach.RoleUplink, up2.Index))
		return err
	}))

	cnt := []*netenv.Counter{}
	for _, u := range n.env.Uplinks {
		cnt = append(cnt,
			netenv.StartCounter(t, n.env.Wire, u.Port, netenv.MatchDstIP(netenv.StaleVIP4)),
			netenv.StartCounter(t, n.env.Wire, u.Port, netenv.MatchDstIP(netenv.StaleVIP6)))
	}
	for _, vip := range []netip.Addr{netenv.StaleVIP4, netenv.StaleVIP6} {
		netenv.DialTCP(n.env.Node, netip.AddrPortFrom(vip, 80), 300*time.Millisecond) // from the host
		netenv.DialTCP(c.NS, netip.AddrPortFrom(vip, 80), 300*time.Millisecond)       // from the pod
	}
	netenv.Barrier(t, n.env.Node, up2.Name, cnt[2], cnt[3])
	netenv.Barrier(t, c.NS, c.IfName, cnt[0], cnt[1])
	for i, k := range cnt {
		if k.Count() != 0 {
			t.Fatalf("counter %d: %d frames to a stale VIP reached the wire", i, k.Count())
		}
	}

	// Control: a non-service address does leave through eth1.
	other := netip.MustParseAddr("10.97.0.99")
	k := netenv.StartCounter(t, n.env.Wire, up2.Port, netenv.MatchDstIP(other))
	netenv.DialTCP(n.env.Node, netip.AddrPortFrom(other, 80), 200*time.Millisecond)
	netenv.Barrier(t, n.env.Node, up2.Name, k)
	if k.Count() == 0 {
		t.Fatal("control traffic did not reach the second wire: the test proves nothing")
	}
}

func TestHostReachabilityToggle(t *testing.T) {
	n := newNode(t, netenv.Options{})
	c, id := n.container(t, "a", 10)
	wantPing(t, n.env.Node, c.IP4.Addr())

	// Container <-> wire traffic keeps flowing throughout.
	var wg sync.WaitGroup
	var wire netenv.PingResult
	wg.Go(func() { wire = netenv.Ping(t, c.NS, n.up.Gateway4, 150) })

	n.config(t, datapath.Config{ServicesSynced: true, HostReachable: false})
	wantNoPing(t, n.env.Node, c.IP4.Addr())
	wantNoPing(t, c.NS, n.up.Node4.Addr())
	wantNoPing(t, n.env.Node, c.IP6.Addr())
	if s := n.stats(t, id); s.Drops[loader.DropHostUnreachable] == 0 {
		t.Fatal("host_unreachable drops not counted")
	}
	n.config(t, datapath.Config{ServicesSynced: true, HostReachable: true})
	wantPing(t, n.env.Node, c.IP4.Addr())
	wantPing(t, c.NS, n.up.Node4.Addr())
	wantPing(t, n.env.Node, c.IP6.Addr())

	wg.Wait()
	if wire.Lost() != 0 {
		t.Fatalf("container <-> wire lost pings during the toggle: %s", wire)
	}
}
