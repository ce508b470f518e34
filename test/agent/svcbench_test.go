package agent_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"net/netip"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
	"github.com/underpass-cni/underpass/test/benchutil"
	"github.com/underpass-cni/underpass/test/k8s/kapi"
	"github.com/underpass-cni/underpass/test/netenv"
)

// svcPhase is one node setup the Service paths run under: the agent's
// services.mode and, in host mode, the kube-proxy mode that translates.
type svcPhase struct {
	ebpf  bool
	proxy string // "iptables" or "nftables"; "" with ebpf
	paths []benchutil.Path
}

// BenchmarkServicePaths measures, with a real kube-apiserver, the real
// agent and the real kube-proxy, in one run, interleaved (every path once
// per round, UNDERPASS_BENCH_ROUNDS rounds, default 5): pod -> pod direct
// (the ceiling); pod -> ClusterIP -> pod translated at the pod (the agent
// in services.mode: ebpf, no kube-proxy); and the same ClusterIP through
// the host (services.mode: host, masquerade: true: the agent steers the VIP
// to the node, kube-proxy DNATs it, the agent's table masquerades it) with
// kube-proxy in iptables mode, then in nftables mode. Both pods have their
// programs (datapath.AddEndpoint) in every path; the direct path runs with
// the agent in ebpf mode, next to the ebpf path, so the gap between the
// two is the translation alone. The pods direct again with the agent in
// services.mode: host (next to the iptables path) show what the ebpf mode
// costs traffic that is no Service's. Within a phase, the paths take
// turns going first.
//
// Between phases the agent restarts with the other config, kube-proxy is
// killed and `kube-proxy --cleanup` removes its rules (checked: the VIP is
// in no netfilter rule); in each path the Service translation counter of
// the pods' programs (svc_stats) must rise in ebpf mode and stay put
// elsewhere, and in host mode the agent's masquerade rule must count the
// flows, so no path is measured through another's translation. While
// each path's RR runs, the kernel's BPF statistics are on, and the table
// after the ratios gives the datapath programs' run time per transaction:
// how much of a gap between paths the programs themselves account for.
//
//	go test -run '^$' -bench ServicePaths -benchtime 1x -v ./test/agent/
//
// A benchmark, so never part of `make test`. Figures are printed, never
// asserted.
func BenchmarkServicePaths(b *testing.B) {
	benchutil.Require(b)
	for _, tool := range []string{"iptables-save", "nft"} {
		if _, err := exec.LookPath(tool); err != nil {
			b.Fatalf("the benchmark needs %s (make deps installs it): %v", tool, err)
		}
	}
	rounds := benchutil.Rounds()
	l := newLab(b, netenv.Options{})
	u := l.Uplinks[0]
	c, kubeconfig := startKube(b, l)
	client := l.AddMacvlanContainer("client", u.IP4(10), netip.Prefix{})
	backend := l.AddMacvlanContainer("backend", u.IP4(11), netip.Prefix{})
	// Every Kubernetes node forwards; the lab's node must too.
	must(b, l.Node.Do(func() error { return os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1"), 0o644) }))
	createNode(b, c.Client, u.Node4.Addr())
	vip := createBackedService(b, c.Client, "bench", backend.IP4.Addr()) // 80 -> 8080

	const direct = "pod->pod direct (ceiling)"
	// The same pods direct with the agent in services.mode: host: what the
	// ebpf mode's lookups cost traffic that is no Service's.
	const directHost = "pod->pod direct, services.mode host"
	isDirect := func(name string) bool { return name == direct || name == directHost }
	svcPath := func(name string) benchutil.Path {
		return benchutil.Path{Name: "pod->ClusterIP->pod, " + name, From: client.NS, To: backend.NS,
			Dst: vip, Port: 80, Listen: backend.IP4.Addr(), ListenPort: 8080, Ref: direct}
	}
	ebpf, iptables, nftables := svcPath("services.mode ebpf"), svcPath("kube-proxy iptables"), svcPath("kube-proxy nftables")
	phases := []svcPhase{
		{ebpf: true, paths: []benchutil.Path{
			{Name: direct, From: client.NS, To: backend.NS, Dst: backend.IP4.Addr(), Port: 8080},
			ebpf,
		}},
		{proxy: "iptables", paths: []benchutil.Path{
			{Name: directHost, From: client.NS, To: backend.NS, Dst: backend.IP4.Addr(), Port: 8080, Ref: direct},
			iptables,
		}},
		{proxy: "nftables", paths: []benchutil.Path{nftables}},
	}
	var paths []benchutil.Path
	for _, ph := range phases {
		paths = append(paths, ph.paths...)
	}

	n := &svcNode{l: l, b: b, kubeconfig: kubeconfig, vip: vip, backend: backend.IP4.Addr(), backendNS: backend.NS, client: client.NS,
		progNs: map[string][]float64{}}
	n.switchTo(phases[0]) // the agent loads the datapath the pods' programs join
	dp := l.open()
	for _, p := range []*netenv.Container{client, backend} {
		addEndpoint(b, l.Node, dp, p, u.MAC)
	}
	n.dp = dp
	n.answers(phases[0])

	samples := benchutil.Samples{}
	for i := 0; i < b.N; i++ {
		for r := range rounds {
			for _, ph := range phases {
				start := time.Now()
				n.switchTo(ph)
				b.Logf("round %d/%d: switched to %s in %s", r+1, rounds, ph, time.Since(start).Round(10*time.Millisecond))
				paths := ph.paths
				if r%2 == 1 { // a phase's paths take turns going first
					paths = slices.Clone(paths)
					slices.Reverse(paths)
				}
				for _, p := range paths {
					s := n.measure(p, ph, !isDirect(p.Name))
					samples[p.Name] = append(samples[p.Name], s)
					b.Logf("round %d/%d %s: %.2f Gbit/s, %.0f RR/s (programs %.0f ns a transaction), %.0f conn/s",
						r+1, rounds, p.Name, s.Gbps, s.RRPerSec, n.progNs[p.Name][len(n.progNs[p.Name])-1], s.ConnPerSec)
				}
			}
		}
	}
	n.switchTo(svcPhase{ebpf: true}) // kube-proxy gone, its rules cleaned up
	b.ReportMetric(0, "ns/op")
	fmt.Println()
	benchutil.PrintTable(os.Stdout, paths, samples, rounds)
	fmt.Println()
	// The goals of issue #16: ebpf >= 95% of direct, >= 2x the kube-proxy
	// path's RR rate.
	benchutil.PrintRatios(os.Stdout, []benchutil.Ratio{
		{A: ebpf.Name, B: direct},
		{A: ebpf.Name, B: iptables.Name},
		{A: ebpf.Name, B: nftables.Name},
		{A: directHost, B: direct},
	}, samples)
	fmt.Println()
	fmt.Println("underpass programs' run time per RR transaction (kernel BPF statistics, all programs), median [min-max]:")
	for _, p := range paths {
		med, lo, hi := benchutil.Spread(n.progNs[p.Name])
		fmt.Printf("  %-50s %5.0f ns [%.0f-%.0f]\n", p.Name, med, lo, hi)
	}
}

func (ph svcPhase) String() string {
	if ph.ebpf {
		return "services.mode ebpf, no kube-proxy"
	}
	return "services.mode host + kube-proxy " + ph.proxy
}

// svcNode is the node's state between the benchmark's phases.
type svcNode struct {
	l                 *lab
	b                 *testing.B
	kubeconfig        string
	vip, backend      netip.Addr
	backendNS, client *netenv.NS
	dp                *loader.Objects
	progNs            map[string][]float64 // per path, a sample per round

	ag        *agent
	ebpf      bool
	proxy     string
	stopProxy func()
}

// switchTo stops what ph does not run and starts what it does, and waits
// until the VIP answers through ph's path.
func (n *svcNode) switchTo(ph svcPhase) {
	b, l := n.b, n.l
	b.Helper()
	if n.proxy != "" && n.proxy != ph.proxy {
		n.stopProxy()
		n.proxy, n.stopProxy = "", nil
		cleanupKubeProxy(b, l, n.vip)
	}
	if n.ag == nil || n.ebpf != ph.ebpf {
		if n.ag != nil {
			n.ag.stop()
		}
		mode := "services:\n  masquerade: true\n  mode: host\n"
		if ph.ebpf {
			// No host path at all: the masquerade table (on by default)
			// goes too.
			mode = "services:\n  masquerade: false\n  mode: ebpf\n"
		}
		l.writeConfig(fmt.Sprintf("staleServices:\n  cidrs: [%s, %s]\n%s  kubernetes: \"true\"\n  kubeconfig: %s\n",
			kapi.ServiceCIDRv4, kapi.ServiceCIDRv6, mode, n.kubeconfig))
		n.ag, n.ebpf = l.start(agentBin), ph.ebpf
		n.ag.waitReady()
		dp := l.openOnce()
		waitFor(b, 30*time.Second, fmt.Sprintf("the frontend of %s in the datapath: %v", n.vip, ph.ebpf), func() bool {
			fs, err := datapath.Frontends(&dp.Maps)
			return err == nil && slices.ContainsFunc(fs, func(f datapath.Frontend) bool { return f.VIP == n.vip }) == ph.ebpf
		})
		waitFor(b, 30*time.Second, n.vip.String()+" live in the datapath", l.liveHas([]netip.Addr{n.vip}, true))
		_, _, err := l.Node.Exec(context.Background(), "nft", "list", "table", "inet", "underpass")
		if (err == nil) != !ph.ebpf {
			b.Fatalf("services.mode ebpf %v: the agent's masquerade table there: %v", ph.ebpf, err == nil)
		}
	}
	if ph.proxy != "" && n.proxy == "" {
		n.stopProxy, n.proxy = startKubeProxy(b, l, ph.proxy, n.kubeconfig), ph.proxy
		waitProgrammed(b, l, ph.proxy, n.vip)
	}
	if ph.proxy == "" && ph.ebpf {
		// Nothing on the host may translate the VIP: only the pods' programs.
		if where := netfilterNames(b, l, n.vip); where != "" {
			b.Fatalf("services.mode ebpf: %s is in the node's netfilter rules (%s)", n.vip, where)
		}
	}
	if n.dp != nil { // the pods registered
		n.answers(ph)
	}
}

// answers waits until the VIP answers through ph's path (a listener's
// backlog completes the handshake).
func (n *svcNode) answers(ph svcPhase) {
	b := n.b
	b.Helper()
	ln := netenv.ListenTCP(b, n.backendNS, netip.AddrPortFrom(n.backend, 8080))
	defer ln.Close()
	var err error
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); {
		var c net.Conn
		if c, err = netenv.DialTCPConn(n.client, netip.AddrPortFrom(n.vip, 80), time.Second); err == nil {
			c.Close()
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	// What the node held when it did not answer.
	for _, c := range [][]string{{"nft", "list", "ruleset"}, {"cat", "/proc/net/nf_conntrack"}} {
		out, stderr, err := n.l.Node.Exec(context.Background(), c[0], c[1:]...)
		b.Logf("%s:\n%s%s %v", strings.Join(c, " "), out, stderr, err)
	}
	for _, c := range [][]string{{"ip", "route"}, {"ip", "neigh"}, {"ip", "-s", "link"}} {
		out, stderr, err := n.client.Exec(context.Background(), c[0], c[1:]...)
		b.Logf("client: %s:\n%s%s %v", strings.Join(c, " "), out, stderr, err)
		out, stderr, err = n.l.Node.Exec(context.Background(), c[0], c[1:]...)
		b.Logf("node: %s:\n%s%s %v", strings.Join(c, " "), out, stderr, err)
	}
	if _, body, err := n.l.get("/metrics"); err == nil {
		for _, line := range strings.Split(body, "\n") {
			if strings.HasPrefix(line, "underpass_") && !strings.HasSuffix(line, " 0") {
				b.Log(line)
			}
		}
	}
	b.Fatalf("%s:80 does not answer through %s: %v", n.vip, ph, err)
}

// measure measures p and checks where it was translated: a Service path
// in ebpf mode by the pods' programs (svc_stats translated rises), in host
// mode by the host (the programs translate nothing and the agent's
// masquerade rule counts the flows); a direct path by nothing.
func (n *svcNode) measure(p benchutil.Path, ph svcPhase, service bool) benchutil.Sample {
	b := n.b
	b.Helper()
	xlate0, masq0 := n.settled()
	gbps := benchutil.Iperf(b, p)
	rr, progNs := n.rrWithProgramTime(p)
	s := benchutil.Sample{Gbps: gbps, RRPerSec: rr, ConnPerSec: benchutil.Connects(b, p, time.Second)}
	n.progNs[p.Name] = append(n.progNs[p.Name], progNs)
	xlate1, masq1 := n.settled()
	dx, dm := xlate1-xlate0, masq1-masq0
	b.Logf("%s: %d packets translated at the pod, %d masqueraded by the host", p.Name, dx, dm)
	switch {
	case service && ph.ebpf && dx == 0:
		b.Fatalf("%s: the pods' programs translated nothing", p.Name)
	case (!service || !ph.ebpf) && dx != 0:
		b.Fatalf("%s: the pods' programs translated %d packets", p.Name, dx)
	case service && !ph.ebpf && dm == 0:
		b.Fatalf("%s: the agent's masquerade rule counted nothing", p.Name)
	case (!service || ph.ebpf) && dm != 0:
		b.Fatalf("%s: the host masqueraded %d packets", p.Name, dm)
	}
	return s
}

// rrWithProgramTime measures p's RR rate with the kernel's BPF run-time
// statistics on, and returns the time underpass's programs ran per
// transaction: how much of the RR gap between paths the programs
// themselves account for, under real traffic (prog.Benchmark runs them
// on one frame in a loop, with warm caches). The statistics cost every
// program run two clock reads; they are on for the RR of every path
// alike (a path with more program runs loses a little more), and off for
// throughput and connects. Program runs per transaction are logged: 4 on
// the direct path (each pod's two filters), more through the host.
func (n *svcNode) rrWithProgramTime(p benchutil.Path) (perSec, progNsPerTransaction float64) {
	b := n.b
	b.Helper()
	stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	must(b, err)
	defer stats.Close()
	t0, runs0 := programTime(b)
	perSec, transactions := benchutil.RR(b, p, 2*time.Second)
	t1, runs1 := programTime(b)
	b.Logf("%s: %.1f program runs a transaction", p.Name, float64(runs1-runs0)/float64(transactions))
	return perSec, float64(t1-t0) / float64(transactions)
}

// programTime sums the run time and the runs of every program in the
// kernel named as one of underpass's: the pods' filters attached at the
// start run the programs loaded then, whatever the agent pinned at a later
// restart (a filter's time includes the body it tail-calls: a tail call is
// not a run of its own). So the benchmark must run alone: another test's
// programs of these names would count too.
func programTime(tb testing.TB) (time.Duration, uint64) {
	tb.Helper()
	ours := programNames()
	var sum time.Duration
	var runs uint64
	for id := ebpf.ProgramID(0); ; {
		next, err := ebpf.ProgramGetNextID(id)
		if errors.Is(err, os.ErrNotExist) {
			return sum, runs
		}
		must(tb, err)
		id = next
		prog, err := ebpf.NewProgramFromID(id)
		if errors.Is(err, os.ErrNotExist) {
			continue // unloaded in between
		}
		must(tb, err)
		info, err := prog.Info()
		if err == nil && ours[info.Name] {
			var st *ebpf.ProgramStats
			if st, err = prog.Stats(); err == nil {
				sum += st.Runtime
				runs += st.RunCount
			}
		}
		prog.Close()
		must(tb, err)
	}
}

// programNames are the names of underpass's programs as the kernel may
// report them: it keeps 15 characters of a name, and cilium/ebpf gives the
// whole one back from BTF when it has it.
var programNames = sync.OnceValue(func() map[string]bool {
	ours := map[string]bool{}
	v := reflect.TypeOf(loader.Programs{})
	for i := range v.NumField() {
		name := v.Field(i).Tag.Get("ebpf")
		ours[name], ours[name[:min(len(name), unix.BPF_OBJ_NAME_LEN-1)]] = true, true
	}
	return ours
})

// settled returns the translated and masqueraded counters once they hold
// still: the last packets of a connection closed just before (the end of
// answers' probe, of the previous measurement) are not counted against
// the next path.
func (n *svcNode) settled() (translated, masq uint64) {
	translated, masq = n.translated(), masqueraded(n.b, n.l)
	for range 30 {
		time.Sleep(100 * time.Millisecond)
		x, m := n.translated(), masqueraded(n.b, n.l)
		if x == translated && m == masq {
			break
		}
		translated, masq = x, m
	}
	return translated, masq
}

func (n *svcNode) translated() uint64 {
	st, err := datapath.ServiceStats(&n.dp.Maps)
	must(n.b, err)
	return st[loader.SvcStatTranslated].Packets
}

var nftPackets = regexp.MustCompile(`packets (\d+) `)

// masqueraded sums the packet counters of the masquerade rules in the
// agent's table (0 without the table).
func masqueraded(tb testing.TB, l *lab) uint64 {
	out, _, err := l.Node.Exec(context.Background(), "nft", "list", "table", "inet", "underpass")
	if err != nil {
		return 0
	}
	var sum uint64
	for _, line := range strings.Split(out, "\n") {
		if m := nftPackets.FindStringSubmatch(line); m != nil && strings.Contains(line, "masquerade") {
			v, err := strconv.ParseUint(m[1], 10, 64)
			must(tb, err)
			sum += v
		}
	}
	return sum
}

// cleanupKubeProxy runs `kube-proxy --cleanup` in the node netns (it
// removes the rules of every mode) and checks that no rule names vip.
func cleanupKubeProxy(tb testing.TB, l *lab, vip netip.Addr) {
	tb.Helper()
	bin, err := kapi.BinDir()
	must(tb, err)
	out, stderr, err := l.Node.Exec(context.Background(), filepath.Join(bin, "kube-proxy"), "--cleanup")
	if err != nil {
		tb.Fatalf("kube-proxy --cleanup: %v\n%s%s", err, out, stderr)
	}
	if where := netfilterNames(tb, l, vip); where != "" {
		tb.Fatalf("after kube-proxy --cleanup, %s is still in the node's netfilter rules (%s)", vip, where)
	}
}

// netfilterNames says which of the node's rule listings (nftables, which
// holds iptables-nft's tables too, and iptables-save) name vip: "" if none.
func netfilterNames(tb testing.TB, l *lab, vip netip.Addr) string {
	tb.Helper()
	var where []string
	for _, c := range [][]string{{"nft", "list", "ruleset"}, {"iptables-save"}} {
		out, stderr, err := l.Node.Exec(context.Background(), c[0], c[1:]...)
		if err != nil {
			tb.Fatalf("%s: %v %s", strings.Join(c, " "), err, stderr)
		}
		if strings.Contains(out, vip.String()) {
			where = append(where, strings.Join(c, " "))
		}
	}
	return strings.Join(where, ", ")
}
