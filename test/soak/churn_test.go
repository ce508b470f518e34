package soak_test

import (
	"fmt"
	"maps"
	"math"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/underpass-cni/underpass/test/netenv"
)

// Margins for the agent's resources after the churn: a scrape in flight or
// a GC run holding a netlink socket is not a leak; one per churned pod is.
const (
	fdMargin        = 4
	goroutineMargin = 5
)

func envInt(t *testing.T, name string, def int) int {
	t.Helper()
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil || n <= 0 {
		t.Fatalf("%s=%q: want a positive integer", name, v)
	}
	return n
}

func TestChurn(t *testing.T) {
	cycles := envInt(t, "UNDERPASS_SOAK_CYCLES", 100)
	parallel := envInt(t, "UNDERPASS_SOAK_PARALLEL", 8)

	l := newLab(t)
	a, b := l.stablePod("pod-a"), l.stablePod("pod-b")
	node4 := l.up.Node4.Addr()
	checkStablePaths(t, l, a, b)
	lnA := netenv.ListenTCP(t, a.ns, netip.AddrPortFrom(a.ip4, 0))
	lnNode := netenv.ListenTCP(t, l.env.Node, netip.AddrPortFrom(node4, 0))

	// Let the agent see the stable pods (reconcile and GC run every
	// second) before the baseline.
	time.Sleep(2500 * time.Millisecond)
	base := l.snapshot()
	wantStable(t, base, a, b)
	logFrom := l.ag.Out.Len()

	// Background traffic and scrapes, until the churn is done.
	stop := make(chan struct{})
	var bg sync.WaitGroup
	trafficProbs, scrapeProbs := &problems{}, &problems{}
	pings := stablePings(l, a, b)
	for _, f := range pings {
		bg.Go(func() { f.run(t, stop, trafficProbs) })
	}
	tcps := []*tcpFlow{
		{name: "tcp host -> pod-a", from: l.env.Node, dst: lnA.Addr().(*net.TCPAddr).AddrPort()},
		{name: "tcp pod-b -> host", from: b.ns, dst: lnNode.Addr().(*net.TCPAddr).AddrPort()},
	}
	for _, f := range tcps {
		bg.Go(func() { f.run(stop, trafficProbs) })
	}
	var scrapes atomic.Int64
	var maxGoroutines, maxFDs, maxScrape atomic.Int64
	bg.Go(func() {
		for {
			select {
			case <-stop:
				return
			case <-time.After(200 * time.Millisecond):
			}
			scrapes.Add(1)
			t0 := time.Now()
			g, err := l.scrape("go_goroutines")
			if d := int64(time.Since(t0)); d > maxScrape.Load() {
				maxScrape.Store(d)
			}
			if err != nil {
				scrapeProbs.add("%s /metrics: %v", time.Now().Format("15:04:05.000"), err)
			} else if int64(g) > maxGoroutines.Load() {
				maxGoroutines.Store(int64(g))
			}
			if code, body, err := l.get("/readyz"); err != nil || code != http.StatusOK {
				scrapeProbs.add("%s /readyz: %d %q %v", time.Now().Format("15:04:05.000"), code, strings.TrimSpace(body), err)
			}
			if n, _, err := fds(l.ag.Pid()); err == nil && int64(n) > maxFDs.Load() {
				maxFDs.Store(int64(n))
			}
		}
	})

	// The churn.
	run := l.churn(t, a, cycles, parallel)
	addDur, delDur, cycleLog, failures := run.addDur, run.delDur, run.cycleLog, run.failures
	churnSent, churnRecv, churnTook := &run.sent, &run.recv, run.took
	close(stop)
	bg.Wait()

	for _, f := range failures {
		t.Errorf("churn: %s", f)
	}
	trafficProbs.report(t, "traffic during the churn")
	scrapeProbs.report(t, "agent scrapes during the churn")

	// Settle: the agent's GC and reconcile tick every second; scrapes in
	// flight are over. Fds and goroutines get a few seconds to come back.
	var after state
	deadline := time.Now().Add(20 * time.Second)
	for {
		time.Sleep(500 * time.Millisecond)
		after = l.snapshot()
		if (after.agentFDs <= base.agentFDs+fdMargin && after.goroutines <= base.goroutines+goroutineMargin &&
			after.agentNetns == base.agentNetns) || time.Now().After(deadline) {
			break
		}
	}
	compareState(t, base, after)
	wantStable(t, after, a, b)

	if code, body, err := l.get("/readyz"); err != nil || code != http.StatusOK {
		t.Errorf("agent not ready after the churn: %d %q %v", code, strings.TrimSpace(body), err)
	}
	if n, err := l.scrape("underpass_endpoints"); err != nil || n != 2 {
		t.Errorf("underpass_endpoints = %v (%v), want 2", n, err)
	}
	for _, p := range []*pod{a, b} {
		if err := l.check(p); err != nil {
			t.Errorf("CHECK %s after the churn: %v", p.name, err)
		}
	}
	// And the stable paths still work.
	netenv.MustPing(t, a.ns, b.ip4, 3)
	netenv.MustPing(t, l.env.Node, a.ip4, 3)

	gcRemoved := checkAgentLog(t, l.ag.Out.String()[logFrom:])
	if dir := os.Getenv("UNDERPASS_SOAK_LOG_DIR"); dir != "" {
		must(t, os.MkdirAll(dir, 0o755))
		must(t, os.WriteFile(filepath.Join(dir, "agent.log"), []byte(l.ag.Out.String()), 0o644))
		must(t, os.WriteFile(filepath.Join(dir, "cycles.tsv"), []byte(
			"cycle\tcontainer\tip4\tadd_start\tadd\tdel_start\tdel\tadd_err\tdel_err\n"+strings.Join(cycleLog, "\n")+"\n"), 0o644))
		t.Logf("agent log and per-cycle timings written to %s", dir)
	}
	if l.ag.Exited() {
		t.Errorf("underpassd exited during the test: %v", l.ag.Err())
	}

	var sent, lost, rts, tcpErrs, retrans int64
	var maxRTT time.Duration
	for _, f := range pings {
		sent += f.sent.Load()
		lost += f.lost.Load()
	}
	for _, f := range tcps {
		rts += f.roundTrips.Load()
		tcpErrs += f.errs.Load()
		retrans += f.retrans.Load()
		maxRTT = max(maxRTT, time.Duration(f.maxRTT.Load()))
	}
	t.Logf("soak: cycles=%d parallel=%d duration=%s (%.1f cycles/s) failures=%d | ADD p50=%s p99=%s max=%s | DEL p50=%s p99=%s max=%s | "+
		"pings sent=%d lost=%d (6 flows) | tcp round trips=%d errors=%d retransmits=%d max rtt=%s | churn pod pings sent=%d lost=%d | "+
		"agent fds %d->%d (max %d, netns fds %d->%d) goroutines %d->%d (max %d) threads %d->%d | scrapes=%d failed=%d slowest=%s | gc removed %d churned endpoints",
		cycles, parallel, churnTook.Round(time.Millisecond), float64(cycles)/churnTook.Seconds(), len(failures),
		pct(addDur, 0.50), pct(addDur, 0.99), pct(addDur, 1), pct(delDur, 0.50), pct(delDur, 0.99), pct(delDur, 1),
		sent, lost, rts, tcpErrs, retrans, maxRTT.Round(100*time.Microsecond), churnSent.Load(), churnSent.Load()-churnRecv.Load(),
		base.agentFDs, after.agentFDs, maxFDs.Load(), base.agentNetns, after.agentNetns,
		base.goroutines, after.goroutines, maxGoroutines.Load(), base.threadCount, after.threadCount,
		scrapes.Load(), scrapeProbs.n, time.Duration(maxScrape.Load()).Round(100*time.Microsecond), gcRemoved)

	// The agent still stops cleanly.
	stopAgent(t, l.ag)
}

func pct(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	i := int(math.Ceil(p*float64(len(s)))) - 1
	return s[max(i, 0)].Round(100 * time.Microsecond)
}

// wantStable checks that s holds exactly the stable pods' entries.
func wantStable(t *testing.T, s state, pods ...*pod) {
	t.Helper()
	var leases []string
	ids := map[string]uint32{}
	for id, cid := range s.endpoints {
		ids[cid] = id
	}
	if len(s.endpoints) != len(pods) {
		t.Errorf("endpoints: %v, want only the stable pods", s.endpoints)
	}
	for _, p := range pods {
		leases = append(leases, p.ip4.String(), p.ip6.String())
		id, ok := ids[p.id]
		if !ok {
			t.Errorf("stable pod %s is not registered", p.name)
			continue
		}
		for _, a := range []netip.Addr{p.ip4, p.ip6} {
			if got := s.epByIP[a]; got != id {
				t.Errorf("ep_by_ip[%s] = %d, want %s's %d", a, got, p.name, id)
			}
		}
		if got := s.epByMAC[p.mac.String()]; got != id {
			t.Errorf("ep_by_mac[%s] = %d, want %s's %d", p.mac, got, p.name, id)
		}
		if !slices.Contains(s.epStats, id) {
			t.Errorf("ep_stats has no entry for %s (%d)", p.name, id)
		}
	}
	slices.Sort(leases)
	if !slices.Equal(s.leases, leases) {
		t.Errorf("host-local leases %v, want the stable pods' %v", s.leases, leases)
	}
	if len(s.epByIP) != 2*len(pods) || len(s.epByMAC) != len(pods) || len(s.epStats) != len(pods) {
		t.Errorf("ep_by_ip %v, ep_by_mac %v, ep_stats %v: want only the %d stable pods' entries", s.epByIP, s.epByMAC, s.epStats, len(pods))
	}
}

func compareState(t *testing.T, base, after state) {
	t.Helper()
	eq := func(what string, b, a []string) {
		if !slices.Equal(b, a) {
			t.Errorf("%s: %v, baseline %v (added %v, gone %v)", what, a, b, diff(a, b), diff(b, a))
		}
	}
	eq("node links", base.nodeLinks, after.nodeLinks)
	eq("lab namespaces", base.netns, after.netns)
	eq("host-local leases", base.leases, after.leases)
	eq("files under the pin dir", base.pins, after.pins)
	if !maps.Equal(base.endpoints, after.endpoints) {
		t.Errorf("endpoints %v, baseline %v", after.endpoints, base.endpoints)
	}
	if !maps.Equal(base.epByIP, after.epByIP) {
		t.Errorf("ep_by_ip %v, baseline %v", after.epByIP, base.epByIP)
	}
	if !maps.Equal(base.epByMAC, after.epByMAC) {
		t.Errorf("ep_by_mac %v, baseline %v", after.epByMAC, base.epByMAC)
	}
	if !slices.Equal(base.epStats, after.epStats) {
		t.Errorf("ep_stats ids %v, baseline %v", after.epStats, base.epStats)
	}
	if !slices.Equal(base.parents, after.parents) {
		t.Errorf("parents %v, baseline %v", after.parents, base.parents)
	}
	if after.agentFDs > base.agentFDs+fdMargin {
		t.Errorf("agent has %d open fds, %d at the baseline (margin %d)", after.agentFDs, base.agentFDs, fdMargin)
	}
	if after.agentNetns != base.agentNetns {
		t.Errorf("agent holds %d network namespace fds, %d at the baseline", after.agentNetns, base.agentNetns)
	}
	if after.testNetns != base.testNetns {
		t.Errorf("the test process holds %d network namespace fds, %d at the baseline", after.testNetns, base.testNetns)
	}
	if after.goroutines > base.goroutines+goroutineMargin {
		t.Errorf("agent has %d goroutines, %d at the baseline (margin %d)", after.goroutines, base.goroutines, goroutineMargin)
	}
}

func diff(a, b []string) []string {
	var out []string
	for _, s := range a {
		if !slices.Contains(b, s) {
			out = append(out, s)
		}
	}
	return out
}

var (
	levelRe = regexp.MustCompile(`\blevel=(\w+)`)
	msgRe   = regexp.MustCompile(`\bmsg="((?:[^"\\]|\\.)*)"|\bmsg=(\S+)`)
)

// checkAgentLog checks what the agent logged during the churn: only log
// records (no panic or race report), no warning or error at all, and every line naming a churned pod (its container id,
// netns or pod name all contain "churn") is one the churn explains: none is.
// In particular the agent's endpoint GC removes no churned endpoint: every
// DEL ran, and DEL holds the datapath lock from deleting the slave to
// unregistering it, which the GC takes to confirm, so it never sees one
// half-deleted. It returns how many churned endpoints the GC removed.
func checkAgentLog(t *testing.T, log string) (gcRemoved int) {
	t.Helper()
	var bad []string
	for line := range strings.SplitSeq(log, "\n") {
		if line == "" {
			continue
		}
		level := ""
		if m := levelRe.FindStringSubmatch(line); m != nil {
			level = m[1]
		}
		msg := ""
		if m := msgRe.FindStringSubmatch(line); m != nil {
			msg = m[1] + m[2]
		}
		switch {
		case level == "":
			bad = append(bad, line) // not a log record: a panic, a race report, stray output
		case level == "WARN" || level == "ERROR":
			bad = append(bad, line)
		case !strings.Contains(line, "churn"):
		case msg == "endpoint gc: removed endpoint":
			gcRemoved++
			bad = append(bad, line) // a lost DEL, or the GC racing one
		default:
			bad = append(bad, line)
		}
	}
	for i, line := range bad {
		if i == 30 {
			t.Errorf("agent log: … and %d more unexpected lines", len(bad)-i)
			break
		}
		t.Errorf("agent log: unexpected line during the churn: %s", line)
	}
	return gcRemoved
}

// checkStablePaths pings every path between the two stable pods and the
// host once: they work before any churn starts.
func checkStablePaths(t *testing.T, l *lab, a, b *pod) {
	t.Helper()
	for _, f := range stablePings(l, a, b) {
		netenv.MustPing(t, f.from, f.dst, 3)
	}
}

// stablePings are the ping flows between two stable pods and the host,
// both families.
func stablePings(l *lab, a, b *pod) []*pingFlow {
	node4, node6 := l.up.Node4.Addr(), l.up.Node6.Addr()
	return []*pingFlow{
		{name: "pod-a -> pod-b " + b.ip4.String(), from: a.ns, dst: b.ip4},
		{name: "pod-b -> pod-a " + a.ip6.String(), from: b.ns, dst: a.ip6},
		{name: "host -> pod-a " + a.ip4.String(), from: l.env.Node, dst: a.ip4},
		{name: "host -> pod-b " + b.ip6.String(), from: l.env.Node, dst: b.ip6},
		{name: "pod-a -> host " + node4.String(), from: a.ns, dst: node4},
		{name: "pod-b -> host " + node6.String(), from: b.ns, dst: node6},
	}
}

// churnRun is what l.churn did.
type churnRun struct {
	mu             sync.Mutex
	addDur, delDur []time.Duration
	cycleLog       []string // one TSV line per cycle, for UNDERPASS_SOAK_LOG_DIR
	failures       []string
	sent, recv     atomic.Int64 // pings from the churned pods to target
	took           time.Duration
}

func (r *churnRun) fail(format string, args ...any) {
	r.mu.Lock()
	r.failures = append(r.failures, fmt.Sprintf(format, args...))
	r.mu.Unlock()
}

// churn runs cycles of short-lived pods, parallel at a time, through the
// plugin: a new netns, ADD, two pings to target, DEL, the netns removed.
func (l *lab) churn(t *testing.T, target *pod, cycles, parallel int) *churnRun {
	run := &churnRun{}
	work := make(chan int)
	var workers sync.WaitGroup
	start := time.Now()
	for range parallel {
		workers.Go(func() {
			for i := range work {
				l.churnOnce(t, run, target, i)
			}
		})
	}
	for i := range cycles {
		work <- i
	}
	close(work)
	workers.Wait()
	run.took = time.Since(start)
	return run
}

func (l *lab) churnOnce(t *testing.T, run *churnRun, target *pod, i int) {
	name := fmt.Sprintf("churn%05d", i)
	n, err := netenv.CreateNS(l.env.Prefix + name)
	if err != nil {
		run.fail("cycle %d: %v", i, err)
		return
	}
	p := &pod{name: name, id: fmt.Sprintf("soak-churn-%05d", i), netns: n.Path, ns: n}
	addStart := time.Now()
	err = l.add(p)
	d := time.Since(addStart)
	if err != nil {
		run.fail("cycle %d: ADD %s: %v", i, p.id, err)
	} else {
		run.mu.Lock()
		run.addDur = append(run.addDur, d)
		run.mu.Unlock()
		r, err := tryPing(t, n, target.ip4, 2)
		if err != nil {
			run.fail("cycle %d: ping from %s: %v", i, p.id, err)
		}
		run.sent.Add(int64(r.Sent))
		run.recv.Add(int64(r.Received))
		if r.Received == 0 {
			run.fail("cycle %d: pod %s (%s) never reached %s: %v", i, p.id, p.ip4, target.name, r)
		}
	}
	delStart := time.Now()
	derr := l.del(p)
	dd := time.Since(delStart)
	if derr != nil {
		run.fail("cycle %d: DEL %s: %v", i, p.id, derr)
	}
	run.mu.Lock()
	if derr == nil {
		run.delDur = append(run.delDur, dd)
	}
	run.cycleLog = append(run.cycleLog, fmt.Sprintf("%d\t%s\t%s\t%s\t%s\t%s\t%s\t%v\t%v",
		i, p.id, p.ip4, addStart.Format("15:04:05.000000"), d.Round(time.Microsecond),
		delStart.Format("15:04:05.000000"), dd.Round(time.Microsecond), err, derr))
	run.mu.Unlock()
	if err := n.Delete(); err != nil {
		run.fail("cycle %d: %v", i, err)
	}
}
