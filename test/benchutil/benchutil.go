// Package benchutil measures paths between network namespaces for the
// benchmarks (test/bench, test/agent): TCP throughput with iperf3 (client
// and server pinned to CPUs 0 and 1), request/response on one connection
// with sockperf (both ends on one CPU: see rrCPU), connections set up and
// closed one after the other; and prints interleaved rounds as median
// [min-max] tables.
//
// Figures are printed, never asserted: wall-clock speed depends on the
// machine.
package benchutil

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"text/tabwriter"
	"time"

	"github.com/underpass-cni/underpass/test/netenv"
)

// Path is one way from a client namespace to a server namespace.
type Path struct {
	Name     string
	From, To *netenv.NS
	Dst      netip.Addr // what the client connects to
	Port     uint16     // the port it connects to; 0: the server's
	Listen   netip.Addr // where the server listens; zero: Dst
	// ListenPort is the server's port; 0: Port, or any free one if Port
	// is 0 too. A Service path sets Port to the Service's port and
	// ListenPort to its target port.
	ListenPort uint16
	Ref        string // the path this one is compared with in the table
}

func (p Path) server() netip.Addr {
	if p.Listen.IsValid() {
		return p.Listen
	}
	return p.Dst
}

func (p Path) serverPort() uint16 {
	if p.ListenPort != 0 {
		return p.ListenPort
	}
	return p.Port
}

// serverPortFrom is serverPort, or when the path leaves it to the tool, one
// of the thousand ports from base (a tool's own server binds a fixed port,
// unlike a Go listener on port 0).
func (p Path) serverPortFrom(base uint16) uint16 {
	if port := p.serverPort(); port != 0 {
		return port
	}
	return base + uint16(time.Now().UnixNano()%1000)
}

// dialPort is where the client connects for a server listening on port.
func (p Path) dialPort(listening uint16) uint16 {
	if p.Port != 0 {
		return p.Port
	}
	return listening
}

// Sample is one measurement of a path.
type Sample struct {
	Gbps, RRPerSec, ConnPerSec float64
}

// Require fails tb unless the tools Measure runs are installed (make deps
// installs them).
func Require(tb testing.TB) {
	tb.Helper()
	for _, tool := range []string{"iperf3", "sockperf", "taskset"} {
		if _, err := exec.LookPath(tool); err != nil {
			tb.Fatalf("the benchmark needs %s (make deps installs it): %v", tool, err)
		}
	}
}

// Rounds is UNDERPASS_BENCH_ROUNDS, default 5.
func Rounds() int {
	if v, err := strconv.Atoi(os.Getenv("UNDERPASS_BENCH_ROUNDS")); err == nil && v > 0 {
		return v
	}
	return 5
}

// Measure measures p once: iperf3 for 3 s, RR for 2 s, connects for 1 s.
func Measure(tb testing.TB, p Path) Sample {
	tb.Helper()
	gbps := Iperf(tb, p)
	rr, _ := RR(tb, p, 2*time.Second)
	return Sample{Gbps: gbps, RRPerSec: rr, ConnPerSec: Connects(tb, p, time.Second)}
}

// Iperf runs a 3 s iperf3 TCP test and returns the receiver's Gbit/s.
func Iperf(tb testing.TB, p Path) float64 {
	tb.Helper()
	sport := p.serverPortFrom(5201)
	cport := strconv.Itoa(int(p.dialPort(sport)))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	srv := p.To.Command(ctx, "iperf3", "-s", "-1", "-B", p.server().String(), "-p", strconv.Itoa(int(sport)), "-A", "1")
	var srvOut strings.Builder
	srv.Stdout, srv.Stderr = &srvOut, &srvOut
	if err := srv.Start(); err != nil {
		tb.Fatal(err)
	}
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
		out, _, err := p.From.Exec(ctx, "iperf3", "-c", p.Dst.String(), "-p", cport, "-t", "3", "-J", "-A", "0")
		res.Error = ""
		if jerr := json.Unmarshal([]byte(out), &res); jerr != nil && err == nil {
			err = jerr
		}
		if err == nil && res.Error == "" && res.End.SumReceived.BitsPerSecond > 0 {
			break
		}
		if i == 50 {
			tb.Fatalf("iperf3 %s: %v %s\nserver: %s", p.Name, err, res.Error, srvOut.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
	return res.End.SumReceived.BitsPerSecond / 1e9
}

// listen starts p's server for RR and Connects and returns where the
// client dials.
func listen(tb testing.TB, p Path) (net.Listener, netip.AddrPort) {
	ln := netenv.ListenTCP(tb, p.To, netip.AddrPortFrom(p.server(), p.serverPort()))
	port := uint16(ln.Addr().(*net.TCPAddr).Port)
	return ln, netip.AddrPortFrom(p.Dst, p.dialPort(port))
}

// rrCPU is the one CPU both ends of RR run on. On a VM, a ping-pong
// between two CPUs measures mostly how fast an idle vCPU wakes up (an IPI
// through the hypervisor: over a veth pair on the 2-core development VM, a
// transaction took 99 us across two CPUs against 23 us on one), which hides
// the datapath's own cost; on one CPU every microsecond of a transaction is
// the stack's and the programs' work.
const rrCPU = "1"

var (
	sockperfValid = regexp.MustCompile(`\[Valid Duration\] RunTime=([0-9.]+) sec; SentMessages=\d+; ReceivedMessages=(\d+)`)
	sockperfTotal = regexp.MustCompile(`\[Total Run\] RunTime=[0-9.]+ sec; Warm up time=\d+ msec; SentMessages=\d+; ReceivedMessages=(\d+)`)
)

// RR counts request/response transactions on one TCP connection for d:
// sockperf ping-pong with 14-byte messages (its smallest), both ends
// pinned to rrCPU. perSec leaves sockperf's warm-up out; total counts the
// whole run, warm-up included: what a counter read around the call sees.
func RR(tb testing.TB, p Path, d time.Duration) (perSec float64, total uint64) {
	tb.Helper()
	sport := p.serverPortFrom(11111)
	ctx, cancel := context.WithTimeout(context.Background(), d+30*time.Second)
	defer cancel()
	// --uc-reuseaddr: iperf3's connections just before leave the port in
	// TIME_WAIT (Go's listeners set SO_REUSEADDR; sockperf, by default, not).
	srv := p.To.Command(ctx, "taskset", "-c", rrCPU, "sockperf", "server", "--tcp", "--uc-reuseaddr",
		"-i", p.server().String(), "-p", strconv.Itoa(int(sport)))
	var srvOut strings.Builder
	srv.Stdout, srv.Stderr = &srvOut, &srvOut
	if err := srv.Start(); err != nil {
		tb.Fatal(err)
	}
	stop := sync.OnceFunc(func() {
		srv.Process.Kill()
		srv.Wait()
	})
	defer stop()
	fail := func(format string, args ...any) {
		stop() // its output is read only once it has exited
		tb.Fatalf("sockperf ping-pong %s: "+format+"\nserver: %s", append(append([]any{p.Name}, args...), srvOut.String())...)
	}
	secs := strconv.FormatFloat(d.Seconds(), 'f', -1, 64)
	// The server needs a moment to listen: sockperf then says it cannot
	// connect, having sent nothing, and is run again. Any other failure
	// ends the measurement (a run that sent traffic and failed would count
	// in what the caller reads around the call).
	for {
		out, stderr, err := p.From.Exec(ctx, "taskset", "-c", rrCPU, "sockperf", "ping-pong", "--tcp",
			"-i", p.Dst.String(), "-p", strconv.Itoa(int(p.dialPort(sport))), "-t", secs, "-m", "14")
		all := out + stderr
		if strings.Contains(all, "Can`t connect socket") {
			if ctx.Err() != nil {
				fail("the server never listened: %v\n%s", err, all)
			}
			time.Sleep(100 * time.Millisecond)
			continue
		}
		m, t := sockperfValid.FindStringSubmatch(all), sockperfTotal.FindStringSubmatch(all)
		if err != nil || m == nil || t == nil {
			fail("%v\n%s", err, all)
		}
		runtime, _ := strconv.ParseFloat(m[1], 64)
		received, _ := strconv.ParseFloat(m[2], 64)
		total, _ = strconv.ParseUint(t[1], 10, 64)
		if runtime <= 0 || received <= 0 {
			fail("no transactions\n%s", all)
		}
		return received / runtime, total
	}
}

// Connects counts TCP connections set up and closed per second, one after
// the other (each a new flow: for a Service, a new backend choice), for d.
func Connects(tb testing.TB, p Path, d time.Duration) float64 {
	tb.Helper()
	ln, dst := listen(tb, p)
	defer ln.Close()
	n := 0
	start := time.Now()
	for time.Since(start) < d {
		conn, err := netenv.DialTCPConn(p.From, dst, 3*time.Second)
		if err != nil {
			tb.Fatalf("%s: connection %d: %v", p.Name, n+1, err)
		}
		conn.Close()
		n++
	}
	return float64(n) / time.Since(start).Seconds()
}

// Samples holds each path's samples, by name, in round order.
type Samples map[string][]Sample

// Figure picks one figure of a sample.
type Figure struct {
	Name string
	Prec int // decimals printed
	Of   func(Sample) float64
}

// Figures are the three figures, in the tables' order.
var Figures = []Figure{
	{"TCP Gbit/s", 2, func(s Sample) float64 { return s.Gbps }},
	{"TCP RR/s", 0, func(s Sample) float64 { return s.RRPerSec }},
	{"conn/s", 0, func(s Sample) float64 { return s.ConnPerSec }},
}

// Spread returns the median, min and max of xs (zeros if empty).
func Spread(xs []float64) (med, lo, hi float64) {
	if len(xs) == 0 {
		return 0, 0, 0
	}
	xs = slices.Sorted(slices.Values(xs))
	return xs[len(xs)/2], xs[0], xs[len(xs)-1]
}

// Of returns path name's values of f, in round order.
func (s Samples) Of(name string, f Figure) []float64 {
	var xs []float64
	for _, x := range s[name] {
		xs = append(xs, f.Of(x))
	}
	return xs
}

// PrintTable prints, per path, the median and the min-max of each figure
// and the median's ratio to the path it is compared with (Ref).
func PrintTable(w io.Writer, paths []Path, samples Samples, rounds int) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "path (%d interleaved rounds, median [min-max])\t", rounds)
	for _, f := range Figures {
		fmt.Fprintf(tw, "%s\tvs ref\t", f.Name)
	}
	fmt.Fprintln(tw)
	for _, p := range paths {
		fmt.Fprintf(tw, "%s\t", p.Name)
		for _, f := range Figures {
			m, lo, hi := Spread(samples.Of(p.Name, f))
			fmt.Fprintf(tw, "%.*f [%.*f-%.*f]\t", f.Prec, m, f.Prec, lo, f.Prec, hi)
			if p.Ref == "" {
				fmt.Fprint(tw, "ref\t")
				continue
			}
			r, _, _ := Spread(samples.Of(p.Ref, f))
			fmt.Fprintf(tw, "%.0f%%\t", 100*m/r)
		}
		fmt.Fprintln(tw)
	}
	tw.Flush()
}

// Ratio compares path A with path B.
type Ratio struct{ A, B string }

// PrintRatios prints, per pair, A's median over B's for each figure, and
// the median and min-max of the per-round ratios (A and B measured in the
// same round): a paired figure, which a slow round moves less.
func PrintRatios(w io.Writer, pairs []Ratio, samples Samples) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprint(tw, "ratio (of medians; per round: median [min-max])\t")
	for _, f := range Figures {
		fmt.Fprintf(tw, "%s\t", f.Name)
	}
	fmt.Fprintln(tw)
	for _, r := range pairs {
		fmt.Fprintf(tw, "%s / %s\t", r.A, r.B)
		for _, f := range Figures {
			a, b := samples.Of(r.A, f), samples.Of(r.B, f)
			ma, _, _ := Spread(a)
			mb, _, _ := Spread(b)
			var per []float64
			for i := range min(len(a), len(b)) {
				per = append(per, a[i]/b[i])
			}
			m, lo, hi := Spread(per)
			fmt.Fprintf(tw, "%.2fx; %.2f [%.2f-%.2f]\t", ma/mb, m, lo, hi)
		}
		fmt.Fprintln(tw)
	}
	tw.Flush()
}
