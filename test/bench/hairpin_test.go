// Package bench compares host <-> container paths on one node, in one run:
// the underpass hairpin (host <-> macvlan slave through the parent NIC), a
// veth pair (what ptp and Spiderpool's coordinator add per pod), and macvlan
// slave <-> slave (the kernel's own bridge mode: the ceiling).
//
//	make bench    # or: go test -run '^$' -bench Paths -benchtime 1x ./test/bench/
//
// Figures are printed, never asserted: wall-clock speed depends on the machine.
package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"text/tabwriter"
	"time"

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
	dst      netip.Addr
}

type figures struct {
	gbps     float64
	rrPerSec float64
}

func BenchmarkPaths(b *testing.B) {
	env := netenv.New(b, netenv.Options{})
	up := env.Uplinks[0]
	dir := filepath.Join(testutil.MountBPFFS(b), "underpass")
	dp, err := loader.Load(dir, loader.Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer dp.Close()
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

	paths := []path{
		{"hairpin host->container", env.Node, a.NS, a.IP4.Addr()},
		{"hairpin container->host", a.NS, env.Node, up.Node4.Addr()},
		{"veth pair host->container", env.Node, v, netip.MustParseAddr("10.200.0.2")},
		{"macvlan slave->slave", c.NS, a.NS, a.IP4.Addr()},
	}
	results := map[string]figures{}
	for _, p := range paths {
		b.Run(p.name, func(b *testing.B) {
			var f figures
			for i := 0; i < b.N; i++ {
				f = figures{gbps: iperf(b, p), rrPerSec: rr(b, p, 2*time.Second)}
			}
			b.ReportMetric(f.gbps, "Gbit/s")
			b.ReportMetric(f.rrPerSec, "RR/s")
			b.ReportMetric(1e6/f.rrPerSec, "us/RR")
			b.ReportMetric(0, "ns/op")
			results[p.name] = f
		})
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "path\tTCP Gbit/s\tvs slave<->slave\tTCP RR/s\tus per RR\t")
	ref := results["macvlan slave->slave"]
	for _, p := range paths {
		f := results[p.name]
		fmt.Fprintf(tw, "%s\t%.2f\t%+.1f%%\t%.0f\t%.1f\t\n", p.name, f.gbps, 100*(f.gbps-ref.gbps)/ref.gbps, f.rrPerSec, 1e6/f.rrPerSec)
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
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	srv := p.to.Command(ctx, "iperf3", "-s", "-1", "-B", p.dst.String(), "-p", port)
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
		out, _, err := p.from.Exec(ctx, "iperf3", "-c", p.dst.String(), "-p", port, "-t", "3", "-J")
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
	ln := netenv.ListenTCP(b, p.to, netip.AddrPortFrom(p.dst, 0))
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
