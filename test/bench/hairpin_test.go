// Package bench compares paths on one node, in one run: host <-> container
// through the underpass hairpin (the parent NIC), a host-side macvlan shim
// (the usual workaround), and a veth pair (what ptp and Spiderpool's
// coordinator add per pod), against macvlan slave <-> slave (the kernel's
// own bridge mode: the ceiling); and pod -> ClusterIP -> pod translated at
// the pod (services.mode: ebpf) against the same two pods direct.
//
//	make bench    # or: go test -run '^$' -bench Paths -benchtime 1x ./test/bench/
//
// Figures are printed, never asserted: wall-clock speed depends on the machine.
package bench

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/underpass-cni/underpass/internal/attach"
	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
	"github.com/underpass-cni/underpass/internal/testutil"
	"github.com/underpass-cni/underpass/test/benchutil"
	"github.com/underpass-cni/underpass/test/netenv"
)

// BenchmarkPaths measures every path once per round, the paths interleaved
// (A, B, C, A, B, C, ...: a machine that slows down mid-run slows all of
// them alike), for UNDERPASS_BENCH_ROUNDS rounds (default 5), and prints
// each figure's median with its min-max spread, so a reader can tell a gap
// from noise. iperf3 client and server are pinned to CPUs 0 and 1, both
// ends of sockperf's request/response to one CPU (see benchutil.RR).
func BenchmarkPaths(b *testing.B) {
	benchutil.Require(b)
	rounds := benchutil.Rounds()
	paths := setupPaths(b)
	samples := benchutil.Samples{}
	for i := 0; i < b.N; i++ {
		for r := range rounds {
			for _, p := range paths {
				s := benchutil.Measure(b, p)
				samples[p.Name] = append(samples[p.Name], s)
				b.Logf("round %d/%d %s: %.2f Gbit/s, %.0f RR/s, %.0f conn/s", r+1, rounds, p.Name, s.Gbps, s.RRPerSec, s.ConnPerSec)
			}
		}
	}
	b.ReportMetric(0, "ns/op")
	benchutil.PrintTable(os.Stdout, paths, samples, rounds)
	// Each row against its reference, paired by round; and the two pods
	// with their programs (services.mode: ebpf) against two bare slaves:
	// what the source guard, the counters and the mode's lookups cost.
	var pairs []benchutil.Ratio
	for _, p := range paths {
		if p.Ref != "" {
			pairs = append(pairs, benchutil.Ratio{A: p.Name, B: p.Ref})
		}
	}
	pairs = append(pairs, benchutil.Ratio{A: podToPod, B: slaveToSlave})
	fmt.Println()
	benchutil.PrintRatios(os.Stdout, pairs, samples)
}

const (
	slaveToSlave = "macvlan slave->slave"
	podToPod     = "pod->pod (both with programs)"
)

// setupPaths builds the node: the hairpin on the parent, a veth pair, a
// host-side macvlan shim, plain macvlan slaves, and two registered pods
// for pod -> ClusterIP -> pod translated at the pod (services.mode: ebpf).
func setupPaths(b *testing.B) []benchutil.Path {
	env := netenv.New(b, netenv.Options{})
	up := env.Uplinks[0]
	dir := filepath.Join(testutil.MountBPFFS(b), "underpass")
	dp, err := loader.Load(dir, loader.Options{})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { dp.Close() })
	must(b, datapath.PutParent(&dp.Maps, up.Index, up.MAC, loader.ModeMacvlan))
	must(b, env.Node.Do(func() error { _, err := attach.Egress(dp.EgressTarget(attach.RoleParent, up.Index)); return err }))
	hosts := datapath.HostSet{}
	hosts.Add(netip.PrefixFrom(up.Node4.Addr(), 32), loader.HostLocal)
	must(b, datapath.SyncHostCIDRs(&dp.Maps, hosts))

	a := env.AddMacvlanContainer("a", up.IP4(10), netip.Prefix{})
	c := env.AddMacvlanContainer("b", up.IP4(11), netip.Prefix{})
	_, err = datapath.Register(&dp.Maps, datapath.Endpoint{ContainerID: "bench-a", IfName: "eth0",
		ParentIfindex: a.ParentIndex, Mode: loader.ModeMacvlan, MAC: a.MAC, Addrs: []netip.Prefix{a.IP4}})
	must(b, err)
	v := vethContainer(b, env)
	shimmed := env.AddMacvlanContainer("shimmed", up.IP4(12), netip.Prefix{})
	hostShim(b, env, up, shimmed.IP4.Addr())

	// pod -> ClusterIP -> pod: both pods registered with their programs, as
	// the plugin does; the direct path between the same two pods is the
	// ceiling the translated one is held to.
	client := env.AddMacvlanContainer("svc-client", up.IP4(13), netip.Prefix{})
	backend := env.AddMacvlanContainer("svc-backend", up.IP4(14), netip.Prefix{})
	for _, p := range []*netenv.Container{client, backend} {
		addEndpoint(b, dp, p, up.MAC)
	}
	const port = 5299
	vip := netip.MustParseAddr("10.96.50.50")
	must(b, datapath.SyncServiceCIDRs(&dp.Maps, []netip.Prefix{netip.MustParsePrefix("10.96.0.0/16")}))
	must(b, datapath.SetConfig(&dp.Maps, datapath.Config{HostReachable: true, ServicesEBPF: true}, 1))
	must(b, datapath.SyncFrontends(&dp.Maps, []datapath.Frontend{{VIP: vip, Port: port, Proto: datapath.ProtoTCP,
		Backends: []netip.AddrPort{netip.AddrPortFrom(backend.IP4.Addr(), port)}}}))

	return []benchutil.Path{
		{Name: slaveToSlave, From: c.NS, To: a.NS, Dst: a.IP4.Addr()},
		{Name: "hairpin host->container", From: env.Node, To: a.NS, Dst: a.IP4.Addr(), Ref: slaveToSlave},
		{Name: "hairpin container->host", From: a.NS, To: env.Node, Dst: up.Node4.Addr(), Ref: slaveToSlave},
		{Name: "host shim host->container", From: env.Node, To: shimmed.NS, Dst: shimmed.IP4.Addr(), Ref: slaveToSlave},
		{Name: "veth pair host->container", From: env.Node, To: v, Dst: netip.MustParseAddr("10.200.0.2"), Ref: slaveToSlave},
		{Name: podToPod, From: client.NS, To: backend.NS, Dst: backend.IP4.Addr(), Port: port},
		{Name: "pod->ClusterIP->pod (ebpf)", From: client.NS, To: backend.NS, Dst: vip, Listen: backend.IP4.Addr(), Port: port,
			Ref: podToPod},
	}
}

// addEndpoint registers c and attaches its programs as the plugin's ADD.
func addEndpoint(b *testing.B, dp *loader.Objects, c *netenv.Container, parentMAC net.HardwareAddr) {
	netns, err := ns.GetNS(c.Path)
	must(b, err)
	defer netns.Close()
	ep := &datapath.Endpoint{ContainerID: "bench-" + c.NS.Name, IfName: c.IfName, Netns: c.Path, Ifindex: c.Index,
		MAC: c.MAC, Addrs: []netip.Prefix{c.IP4}, ParentIfindex: c.ParentIndex, ParentName: c.Parent, ParentMAC: parentMAC,
		Mode: loader.ModeMacvlan}
	_, err = datapath.AddEndpoint(dp, netns, ep, datapath.AddOptions{}, nil)
	must(b, err)
}

// hostShim is the usual workaround the field notes describe: a macvlan
// interface of the host's own on the parent, with an address, and a route
// to the container through it.
func hostShim(b *testing.B, env *netenv.Env, up *netenv.Uplink, to netip.Addr) {
	nh := env.Node.Netlink()
	la := netlink.NewLinkAttrs()
	la.Name, la.ParentIndex = "shim0", up.Index
	must(b, nh.LinkAdd(&netlink.Macvlan{LinkAttrs: la, Mode: netlink.MACVLAN_MODE_BRIDGE}))
	l, err := nh.LinkByName("shim0")
	must(b, err)
	addr := up.IP4(200).Addr()
	must(b, nh.AddrAdd(l, &netlink.Addr{IPNet: &net.IPNet{IP: addr.AsSlice(), Mask: net.CIDRMask(32, 32)}}))
	// As the recipes say: the shim answers ARP only for its own address,
	// or it answers for the node's and draws the other paths' replies.
	must(b, env.Node.Do(func() error {
		for _, k := range []string{"arp_ignore=1", "arp_announce=2"} {
			name, val, _ := strings.Cut(k, "=")
			if err := os.WriteFile("/proc/sys/net/ipv4/conf/shim0/"+name, []byte(val), 0o644); err != nil {
				return err
			}
		}
		return nil
	}))
	must(b, nh.LinkSetUp(l))
	must(b, nh.RouteAdd(&netlink.Route{LinkIndex: l.Attrs().Index, Dst: &net.IPNet{IP: to.AsSlice(), Mask: net.CIDRMask(32, 32)},
		Src: addr.AsSlice(), Scope: netlink.SCOPE_LINK}))
}

var must = testutil.Must

// vethContainer adds a netns joined to the node by a veth pair, routed
// 10.200.0.0/30: the per-pod veth of the ptp alternative.
func vethContainer(b *testing.B, env *netenv.Env) *netenv.NS {
	v := env.AddNS("veth")
	vh, err := netns.GetFromPath(v.Path)
	must(b, err)
	defer vh.Close()
	la := netlink.NewLinkAttrs()
	la.Name = "vh0"
	veth := &netlink.Veth{LinkAttrs: la, PeerName: "eth0", PeerNamespace: netlink.NsFd(int(vh))}
	nh := env.Node.Netlink()
	must(b, nh.LinkAdd(veth))
	l, err := nh.LinkByName("vh0")
	must(b, err)
	must(b, nh.AddrAdd(l, &netlink.Addr{IPNet: &net.IPNet{IP: net.IPv4(10, 200, 0, 1), Mask: net.CIDRMask(30, 32)}}))
	must(b, nh.LinkSetUp(l))
	ch := v.Netlink()
	cl, err := ch.LinkByName("eth0")
	must(b, err)
	must(b, ch.AddrAdd(cl, &netlink.Addr{IPNet: &net.IPNet{IP: net.IPv4(10, 200, 0, 2), Mask: net.CIDRMask(30, 32)}}))
	must(b, ch.LinkSetUp(cl))
	lo, err := ch.LinkByName("lo")
	must(b, err)
	must(b, ch.LinkSetUp(lo))
	return v
}
