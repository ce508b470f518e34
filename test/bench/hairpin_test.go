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
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"text/tabwriter"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/underpass-cni/underpass/internal/attach"
	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
	"github.com/underpass-cni/underpass/internal/testutil"
	"github.com/underpass-cni/underpass/test/netenv"
)

type path struct {
	name     string
	from, to *netenv.NS
	dst      netip.Addr // what the client connects to
	listen   netip.Addr // where the server listens; zero: dst
	port     uint16     // the servers' port; 0: any (a Service path needs its frontend's)
	ref      string     // the path this one is compared with
}

func (p path) server() netip.Addr {
	if p.listen.IsValid() {
		return p.listen
	}
	return p.dst
}

// sample is one measurement of a path.
type sample struct {
	gbps, rrPerSec, connPerSec float64
}

// BenchmarkPaths measures every path once per round, the paths interleaved
// (A, B, C, A, B, C, ...: a machine that slows down mid-run slows all of
// them alike), for UNDERPASS_BENCH_ROUNDS rounds (default 5), and prints
// each figure's median with its min-max spread, so a reader can tell a gap
// from noise. iperf3 client and server are pinned to CPUs 0 and 1.
func BenchmarkPaths(b *testing.B) {
	rounds := 5
	if v, err := strconv.Atoi(os.Getenv("UNDERPASS_BENCH_ROUNDS")); err == nil && v > 0 {
		rounds = v
	}
	paths := setupPaths(b)
	samples := map[string][]sample{}
	for i := 0; i < b.N; i++ {
		for r := range rounds {
			for _, p := range paths {
				s := sample{gbps: iperf(b, p), rrPerSec: rr(b, p, 2*time.Second), connPerSec: connects(b, p, time.Second)}
				samples[p.name] = append(samples[p.name], s)
				b.Logf("round %d/%d %s: %.2f Gbit/s, %.0f RR/s, %.0f conn/s", r+1, rounds, p.name, s.gbps, s.rrPerSec, s.connPerSec)
			}
		}
	}
	b.ReportMetric(0, "ns/op")
	printTable(os.Stdout, paths, samples, rounds)
}

// setupPaths builds the node: the hairpin on the parent, a veth pair, a
// host-side macvlan shim, plain macvlan slaves, and two registered pods
// for pod -> ClusterIP -> pod translated at the pod (services.mode: ebpf).
func setupPaths(b *testing.B) []path {
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

	return []path{
		{name: "macvlan slave->slave", from: c.NS, to: a.NS, dst: a.IP4.Addr()},
		{name: "hairpin host->container", from: env.Node, to: a.NS, dst: a.IP4.Addr(), ref: "macvlan slave->slave"},
		{name: "hairpin container->host", from: a.NS, to: env.Node, dst: up.Node4.Addr(), ref: "macvlan slave->slave"},
		{name: "host shim host->container", from: env.Node, to: shimmed.NS, dst: shimmed.IP4.Addr(), ref: "macvlan slave->slave"},
		{name: "veth pair host->container", from: env.Node, to: v, dst: netip.MustParseAddr("10.200.0.2"), ref: "macvlan slave->slave"},
		{name: "pod->pod (both with programs)", from: client.NS, to: backend.NS, dst: backend.IP4.Addr(), port: port},
		{name: "pod->ClusterIP->pod (ebpf)", from: client.NS, to: backend.NS, dst: vip, listen: backend.IP4.Addr(), port: port,
			ref: "pod->pod (both with programs)"},
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

// printTable prints, per path, the median and the min-max of each figure
// and the median's gap to the path it is compared with.
func printTable(w io.Writer, paths []path, samples map[string][]sample, rounds int) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "path (%d interleaved rounds, median [min-max])\tTCP Gbit/s\tvs ref\tTCP RR/s\tvs ref\tconn/s\tvs ref\t\n", rounds)
	med := func(name string, f func(sample) float64) (float64, float64, float64) {
		var xs []float64
		for _, s := range samples[name] {
			xs = append(xs, f(s))
		}
		slices.Sort(xs)
		if len(xs) == 0 {
			return 0, 0, 0
		}
		return xs[len(xs)/2], xs[0], xs[len(xs)-1]
	}
	figs := []func(sample) float64{
		func(s sample) float64 { return s.gbps },
		func(s sample) float64 { return s.rrPerSec },
		func(s sample) float64 { return s.connPerSec },
	}
	for _, p := range paths {
		fmt.Fprintf(tw, "%s\t", p.name)
		for i, f := range figs {
			m, lo, hi := med(p.name, f)
			prec := 0
			if i == 0 {
				prec = 2
			}
			fmt.Fprintf(tw, "%.*f [%.*f-%.*f]\t", prec, m, prec, lo, prec, hi)
			if p.ref == "" {
				fmt.Fprint(tw, "ref\t")
				continue
			}
			r, _, _ := med(p.ref, f)
			fmt.Fprintf(tw, "%.0f%%\t", 100*m/r)
		}
		fmt.Fprintln(tw)
	}
	tw.Flush()
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

// iperf runs a 3 s iperf3 TCP test and returns the receiver's Gbit/s.
func iperf(b *testing.B, p path) float64 {
	port := strconv.Itoa(5201 + int(time.Now().UnixNano()%1000))
	if p.port != 0 {
		port = strconv.Itoa(int(p.port))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	srv := p.to.Command(ctx, "iperf3", "-s", "-1", "-B", p.server().String(), "-p", port, "-A", "1")
	var srvOut strings.Builder
	srv.Stdout, srv.Stderr = &srvOut, &srvOut
	must(b, srv.Start())
	defer srv.Wait()
	var res struct {
		Error string `json:"error"`
		End   struct {
			SumReceived struct {
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
	}
	// The server needs a moment to listen, and iperf3 -J reports a refused
	// connection in its JSON with exit status 0.
	for i := 0; ; i++ {
		out, _, err := p.from.Exec(ctx, "iperf3", "-c", p.dst.String(), "-p", port, "-t", "3", "-J", "-A", "0")
		res.Error = ""
		if jerr := json.Unmarshal([]byte(out), &res); jerr != nil && err == nil {
			err = jerr
		}
		if err == nil && res.Error == "" && res.End.SumReceived.BitsPerSecond > 0 {
			break
		}
		if i == 50 {
			b.Fatalf("iperf3 %s: %v %s\nserver: %s", p.name, err, res.Error, srvOut.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
	return res.End.SumReceived.BitsPerSecond / 1e9
}

// rr counts 1-byte request/response transactions on one TCP connection.
func rr(b *testing.B, p path, d time.Duration) float64 {
	ln := netenv.ListenTCP(b, p.to, netip.AddrPortFrom(p.server(), p.port))
	defer ln.Close()
	port := uint16(ln.Addr().(*net.TCPAddr).Port)
	conn, err := netenv.DialTCPConn(p.from, netip.AddrPortFrom(p.dst, port), 3*time.Second)
	must(b, err)
	defer conn.Close()
	buf := []byte{1}
	n := 0
	start := time.Now()
	for time.Since(start) < d {
		if _, err := conn.Write(buf); err != nil {
			b.Fatal(err)
		}
		if _, err := conn.Read(buf); err != nil {
			b.Fatal(err)
		}
		n++
	}
	return float64(n) / time.Since(start).Seconds()
}

// connects counts TCP connections set up and closed per second, one after
// the other (each a new flow: for a Service, a new backend choice).
func connects(b *testing.B, p path, d time.Duration) float64 {
	ln := netenv.ListenTCP(b, p.to, netip.AddrPortFrom(p.server(), p.port))
	defer ln.Close()
	port := uint16(ln.Addr().(*net.TCPAddr).Port)
	n := 0
	start := time.Now()
	for time.Since(start) < d {
		conn, err := netenv.DialTCPConn(p.from, netip.AddrPortFrom(p.dst, port), 3*time.Second)
		if err != nil {
			b.Fatal(err)
		}
		conn.Close()
		n++
	}
	return float64(n) / time.Since(start).Seconds()
}
