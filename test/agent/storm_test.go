package agent_test

// Reload storm and metrics exposure tests for the real underpassd.
//
// TestReloadStorm rewrites the config file hundreds of times (valid and
// invalid variants, atomically and in place, SIGHUPs interleaved, /metrics
// scraped all along) and then checks that the agent survived, converged to
// what the file says, counted its rejections and leaked neither goroutines
// nor file descriptors.
//
// TestReloadSIGHUPRace replays step by step the two SIGHUP interleavings
// the storm hits at random (a half-written file applied; a file reverted to
// the bytes the watcher last reported is never re-applied).
//
// TestMetricsLoopbackByDefault checks which addresses the agent's HTTP
// listener is bound to, from the kernel's socket tables of the agent's netns.

import (
	"bufio"
	"encoding/hex"
	"errors"
	"fmt"
	"math/rand/v2"
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
	"syscall"
	"testing"
	"time"

	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
	"github.com/underpass-cni/underpass/internal/testutil"
	"github.com/underpass-cni/underpass/test/netenv"
)

// ---------------------------------------------------------------------------
// Config variants.

// stormCfg is one agent config, in the terms the datapath exposes: every
// field but logLevel can be read back from the pinned maps.
type stormCfg struct {
	reach  bool
	cidrs  []string // staleServices.cidrs
	action string   // staleServices.action
	static []string // services.static
	hosts  []string // hostCIDRs
	level  string   // logLevel

	// For invalid variants: raw YAML inserted at the top or the bottom.
	defectTop, defectBottom string
}

// stormValid returns valid variant n (0 <= n < 120; they all differ).
func stormValid(n int) stormCfg {
	c := stormCfg{
		reach:  n%2 == 0,
		action: []string{"drop", "reject"}[(n/2)%2],
		level:  []string{"debug", "info", "warn"}[n%3],
	}
	if k := (n / 4) % 8; k != 7 { // k == 7: stale guard off
		base := 96 + k
		c.cidrs = []string{fmt.Sprintf("10.%d.0.0/16", base)}
		if n%5 == 0 {
			c.cidrs = append(c.cidrs, fmt.Sprintf("fd00:%x::/112", base))
		}
		for j := range n % 4 {
			c.static = append(c.static, fmt.Sprintf("10.%d.0.%d", base, j+1))
		}
	}
	if n%3 == 0 {
		c.hosts = []string{fmt.Sprintf("169.254.20.%d/32", 10+n%7)}
	}
	if n >= 32 { // more distinct variants: a second host CIDR
		c.hosts = append(c.hosts, fmt.Sprintf("169.254.%d.0/24", 100+n/32))
	}
	return c
}

// stormInvalidKinds describe what is wrong with each invalid variant.
var stormInvalidKinds = []string{
	"YAML parse error (unclosed flow sequence)",
	"YAML parse error (tab indentation)",
	"unknown key (typo)",
	"service CIDR overlapping the node subnet",
	"host CIDR inside a service CIDR",
	"bad staleServices.action",
	"static service outside every service CIDR",
	"service CIDR /33",
	"duplicate key",
}

// stormInvalid returns an invalid variant of kind k built on valid variant n.
func stormInvalid(k, n int) stormCfg {
	c := stormValid(n)
	top := n%2 == 0 // where a textual defect goes: torn reads then differ
	put := func(s string) {
		if top {
			c.defectTop = s
		} else {
			c.defectBottom = s
		}
	}
	switch k {
	case 0:
		put("hostCIDRs: [169.254.20.10/32\n")
	case 1:
		put("staleServices:\n\tcidrs: [10.96.0.0/16]\n")
	case 2:
		put("hostReachabilty: true\n")
	case 3:
		c.cidrs, c.static, c.hosts = []string{"192.0.2.0/25"}, nil, nil
	case 4:
		c.cidrs, c.static, c.hosts = []string{"10.96.0.0/16"}, nil, []string{"10.96.5.0/24"}
	case 5:
		c.action = "dropp"
	case 6:
		c.cidrs, c.static = []string{"10.96.0.0/16"}, []string{"10.96.0.1", "10.200.0.1"}
	case 7:
		c.cidrs, c.static = []string{"10.96.0.0/33"}, nil
	case 8:
		put("gcInterval: 2s\n")
	}
	return c
}

func stormList(items []string) string { return "[" + strings.Join(items, ", ") + "]" }

// yaml renders the full file. tag goes into a comment: it changes the
// file's bytes (so the agent's watcher sees a new state) but not the config.
func (c stormCfg) yaml(bpffs, listen, tag string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "# storm %s\n", tag)
	b.WriteString(c.defectTop)
	fmt.Fprintf(&b, "bpffs: %s\n", bpffs)
	if listen != "" {
		fmt.Fprintf(&b, "metrics: {listen: %q}\n", listen)
	}
	b.WriteString("gcInterval: 1s\n")
	fmt.Fprintf(&b, "logLevel: %s\n", c.level)
	fmt.Fprintf(&b, "hostReachability: %t\n", c.reach)
	if len(c.hosts) > 0 {
		fmt.Fprintf(&b, "hostCIDRs: %s\n", stormList(c.hosts))
	}
	b.WriteString("staleServices:\n")
	if len(c.cidrs) > 0 {
		fmt.Fprintf(&b, "  cidrs: %s\n", stormList(c.cidrs))
	}
	fmt.Fprintf(&b, "  action: %s\n", c.action)
	b.WriteString("services:\n")
	if len(c.static) > 0 {
		fmt.Fprintf(&b, "  static: %s\n", stormList(c.static))
	}
	b.WriteString("  kubernetes: \"false\"\n")
	b.WriteString(c.defectBottom)
	return b.String()
}

// stormState is what the datapath says is in force.
type stormState struct {
	Reach, Reject bool
	SvcCIDRs      []string // svc_cidrs keys
	HostSteer     []string // host_cidrs keys with the STEER flag (hostCIDRs)
	Live          []string // live_svcs (static services; Kubernetes is off)
}

func (s stormState) String() string {
	return fmt.Sprintf("{hostReachability:%t reject:%t svcCIDRs:%v hostCIDRs:%v live:%v}",
		s.Reach, s.Reject, s.SvcCIDRs, s.HostSteer, s.Live)
}

func (s stormState) equal(o stormState) bool {
	return s.Reach == o.Reach && s.Reject == o.Reject && slices.Equal(s.SvcCIDRs, o.SvcCIDRs) &&
		slices.Equal(s.HostSteer, o.HostSteer) && slices.Equal(s.Live, o.Live)
}

func stormCanon(items []string, parse func(string) string) []string {
	out := []string{}
	for _, s := range items {
		out = append(out, parse(s))
	}
	slices.Sort(out)
	return out
}

// want is the datapath state a valid variant must produce (computed from the
// variant, not through internal/config).
func (c stormCfg) want() stormState {
	pfx := func(s string) string { return netip.MustParsePrefix(s).Masked().String() }
	addr := func(s string) string { return netip.MustParseAddr(s).String() }
	return stormState{
		Reach:     c.reach,
		Reject:    c.action == "reject",
		SvcCIDRs:  stormCanon(c.cidrs, pfx),
		HostSteer: stormCanon(c.hosts, pfx),
		Live:      stormCanon(c.static, addr),
	}
}

func stormObserve(m *loader.Maps) (stormState, error) {
	var s stormState
	c, _, err := datapath.GetConfig(m)
	if err != nil {
		return s, err
	}
	s.Reach, s.Reject = c.HostReachable, c.StaleReject
	svc, err := datapath.LPMEntries(m.SvcCidrs)
	if err != nil {
		return s, err
	}
	s.SvcCIDRs = stormKeys(svc, func(uint32) bool { return true })
	hosts, err := datapath.LPMEntries(m.HostCidrs)
	if err != nil {
		return s, err
	}
	s.HostSteer = stormKeys(hosts, func(f uint32) bool { return f&uint32(loader.HostSteer) != 0 })
	live, err := datapath.LiveServices(m)
	if err != nil {
		return s, err
	}
	s.Live = stormKeys(live, func(bool) bool { return true })
	return s, nil
}

// stormKeys is the keys of m whose values keep holds for, as sorted
// strings (empty, not nil, when none).
func stormKeys[K interface {
	comparable
	String() string
}, V any](m map[K]V, keep func(V) bool) []string {
	out := []string{}
	for k, v := range m {
		if keep(v) {
			out = append(out, k.String())
		}
	}
	slices.Sort(out)
	return out
}

// ---------------------------------------------------------------------------
// Agent helpers (variants of the harness's, which always pass --log-level).

// startWithConfigLevel is lab.start without --log-level, so the config's
// logLevel is the one in force.
func (l *lab) startWithConfigLevel(bin string) *agent {
	l.t.Helper()
	return l.startArgs(bin, "--config", l.cfg)
}

// agentPID returns the agent's pid (nsenter execs it, so it is the
// command's) after checking that it really is underpassd.
func agentPID(t *testing.T, a *agent) int {
	t.Helper()
	pid := a.Cmd.Process.Pid
	exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
	if err != nil {
		t.Fatalf("agent pid %d: %v", pid, err)
	}
	if filepath.Base(exe) != "underpassd" {
		t.Fatalf("pid %d runs %s, not underpassd", pid, exe)
	}
	return pid
}

func countFDs(pid int) (int, error) {
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	return len(ents), err
}

// seriesValue finds one series in an exposition body (-1 if absent).
func seriesValue(body, series string) float64 {
	v, found, err := testutil.SeriesValue(body, series)
	if !found || err != nil {
		return -1
	}
	return v
}

// The harness's client gives up after 5s; on a loaded 2-CPU machine shared
// with other suites a scrape can take longer, and a timeout is not what
// these tests are about. slowGet and slowMetric wait up to 30s.
func (l *lab) slowGet(path string) (int, string, error) {
	return getFrom(l.Node, netip.MustParseAddrPort(metricsAddr), path, 30*time.Second)
}

// slowMetric is lab.metric through slowGet: one series, -1 if absent.
func (l *lab) slowMetric(name, labels string) float64 {
	l.t.Helper()
	code, body, err := l.slowGet("/metrics")
	if err != nil || code != http.StatusOK {
		l.t.Fatalf("scrape /metrics: %d %v", code, err)
	}
	if labels != "" {
		name += "{" + labels + "}"
	}
	return seriesValue(body, name)
}

func (l *lab) slowWaitMetric(name, labels string, want float64) {
	l.t.Helper()
	waitFor(l.t, 30*time.Second, fmt.Sprintf("%s{%s} == %v", name, labels, want), func() bool {
		return l.slowMetric(name, labels) == want
	})
}

func (l *lab) reloads(result string) int {
	l.t.Helper()
	return int(l.slowMetric("underpass_config_reloads_total", `result="`+result+`"`))
}

var stormPanic = regexp.MustCompile(`(?m)^(panic: |fatal error: |goroutine \d+ \[|WARNING: DATA RACE)`)

// ---------------------------------------------------------------------------
// The storm.

type stormDriver struct {
	t   *testing.T
	l   *lab
	a   *agent
	rng *rand.Rand
	seq int

	valid, invalid, atomicW, inPlace, split, hups int
	kinds                                         map[int]int
}

// render renders c; with unique, a comment makes the bytes differ from
// every earlier write (the agent's watcher then reports the file even if
// the same config was written before), else equal configs are equal bytes.
func (d *stormDriver) render(c stormCfg, unique bool) string {
	tag := ""
	if unique {
		d.seq++
		tag = "#" + strconv.Itoa(d.seq)
	}
	return c.yaml(d.l.dir, metricsAddr, tag)
}

func (d *stormDriver) count(valid bool) {
	if valid {
		d.valid++
	} else {
		d.invalid++
	}
}

// writeAtomic writes a temp file and renames it over the config.
func (d *stormDriver) writeAtomic(c stormCfg, valid, unique bool) {
	d.t.Helper()
	tmp := d.l.cfg + ".storm.tmp"
	if err := os.WriteFile(tmp, []byte(d.render(c, unique)), 0o644); err != nil {
		d.t.Fatal(err)
	}
	if err := os.Rename(tmp, d.l.cfg); err != nil {
		d.t.Fatal(err)
	}
	d.atomicW++
	d.count(valid)
}

// writeInPlace truncates the config file and writes it again. With split,
// it writes a random prefix, sends SIGHUP, pauses up to 2ms and writes the
// rest: the agent is asked to reload while the file is half written.
func (d *stormDriver) writeInPlace(c stormCfg, valid, split, unique bool) {
	d.t.Helper()
	data := []byte(d.render(c, unique))
	f, err := os.OpenFile(d.l.cfg, os.O_WRONLY|os.O_TRUNC|os.O_CREATE, 0o644)
	if err != nil {
		d.t.Fatal(err)
	}
	if split {
		cut := 1 + d.rng.IntN(len(data)-1)
		if _, err := f.Write(data[:cut]); err != nil {
			d.t.Fatal(err)
		}
		d.hup()
		time.Sleep(time.Duration(d.rng.IntN(2000)) * time.Microsecond)
		data = data[cut:]
		d.split++
	}
	if _, err := f.Write(data); err != nil {
		d.t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		d.t.Fatal(err)
	}
	d.inPlace++
	d.count(valid)
}

func (d *stormDriver) hup() {
	d.t.Helper()
	if err := d.a.Cmd.Process.Signal(syscall.SIGHUP); err != nil {
		d.t.Fatalf("SIGHUP: %v (agent exited? %v)", err, d.a.Exited())
	}
	d.hups++
}

// storm runs n iterations alternating valid and invalid variants (with some
// randomness), mixing atomic and in-place writes and SIGHUPs, with a pause
// every 75 iterations long enough for the agent's file watcher (two
// identical polls 500ms apart) to report what the file holds. The last
// write is final, a valid config. With revert, final is also what the file
// holds during the last pause, byte for byte: the storm ends by reverting
// the file to the state the agent last saw settled (an operator's edits,
// SIGHUPs, then "undo"). Without it, the last write's bytes are new.
func (d *stormDriver) storm(n int, final stormCfg, revert bool) {
	lastPause := -1
	for i := range n - 1 {
		if i%75 == 74 {
			lastPause = i
		}
	}
	for i := range n {
		valid := i%2 == 0
		if d.rng.IntN(5) == 0 {
			valid = !valid
		}
		var c stormCfg
		switch {
		case i == n-1 || (revert && i == lastPause):
			c, valid = final, true
		case valid:
			c = stormValid(d.rng.IntN(120))
		default:
			k := d.rng.IntN(len(stormInvalidKinds))
			d.kinds[k]++
			c = stormInvalid(k, d.rng.IntN(120))
		}
		unique := i == n-1 && !revert
		switch r := d.rng.IntN(10); {
		case i == lastPause:
			d.writeAtomic(c, valid, unique)
		case r < 5:
			d.writeAtomic(c, valid, unique)
		case r < 8:
			d.writeInPlace(c, valid, false, unique)
		default:
			d.writeInPlace(c, valid, true, unique)
		}
		if i < n-1 && d.rng.IntN(3) == 0 {
			d.hup()
		}
		if d.a.Exited() {
			d.t.Fatalf("underpassd exited during the storm (iteration %d): %v", i, d.a.Err())
		}
		if i%75 == 74 && i < n-1 {
			time.Sleep(1600 * time.Millisecond)
		} else {
			time.Sleep(time.Duration(d.rng.IntN(4000)) * time.Microsecond)
		}
	}
}

// waitInForce polls the pinned maps until they show want, and then checks
// that they still do after the watcher had time for two more polls. On
// failure it reports an error and returns false.
func (d *stormDriver) waitInForce(m *loader.Maps, want stormState, what string) bool {
	d.t.Helper()
	var got stormState
	var err error
	deadline := time.Now().Add(30 * time.Second)
	for {
		got, err = stormObserve(m)
		if err == nil && got.equal(want) {
			break
		}
		if d.a.Exited() {
			d.t.Fatalf("underpassd exited: %v", d.a.Err())
		}
		if time.Now().After(deadline) {
			d.t.Errorf("%s: the datapath does not show the config that should be in force (waited 30s):\n  want %v\n  got  %v (err %v)",
				what, want, got, err)
			return false
		}
		time.Sleep(50 * time.Millisecond)
	}
	time.Sleep(1500 * time.Millisecond)
	if got, err = stormObserve(m); err != nil || !got.equal(want) {
		d.t.Errorf("%s: the config in force changed after it had converged:\n  want %v\n  got  %v (err %v)", what, want, got, err)
		return false
	}
	return true
}

// resync rewrites c with new bytes, so the watcher must report it, and
// waits for it: after a failed check, the rest of the test goes on from a
// known config.
func (d *stormDriver) resync(m *loader.Maps, c stormCfg, what string) {
	d.t.Helper()
	d.writeAtomic(c, true, true)
	if !d.waitInForce(m, c.want(), what+": rewritten with new bytes") {
		d.t.FailNow()
	}
}

// scraper scrapes /metrics in a loop until stopped.
type scraper struct {
	ok, failed atomic.Int64
	mu         sync.Mutex
	firstErr   string
	slowest    time.Duration
	stop       chan struct{}
	done       chan struct{}
}

func startScraper(l *lab) *scraper {
	s := &scraper{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(s.done)
		for {
			select {
			case <-s.stop:
				return
			default:
			}
			began := time.Now()
			code, body, err := l.slowGet("/metrics")
			took := time.Since(began)
			s.mu.Lock()
			s.slowest = max(s.slowest, took)
			s.mu.Unlock()
			if err == nil && code == http.StatusOK && seriesValue(body, `underpass_config_reloads_total{result="error"}`) >= 0 {
				s.ok.Add(1)
				time.Sleep(5 * time.Millisecond) // a tight loop, but leave the 2 CPUs some air
				continue
			}
			s.failed.Add(1)
			s.mu.Lock()
			if s.firstErr == "" {
				s.firstErr = fmt.Sprintf("at %s after %s: code %d, err %v, body %.200q",
					began.Format("15:04:05.000"), took.Round(time.Millisecond), code, err, body)
			}
			s.mu.Unlock()
			time.Sleep(10 * time.Millisecond)
		}
	}()
	return s
}

func (s *scraper) finish() {
	close(s.stop)
	<-s.done
}

// stormResources samples go_goroutines and the fd count a few times and keeps the
// smallest: a scrape in flight adds a goroutine or two.
func stormResources(l *lab, pid int) (gor, fds int) {
	l.t.Helper()
	gor, fds = 1<<30, 1<<30
	for range 5 {
		g := int(l.slowMetric("go_goroutines", ""))
		f, err := countFDs(pid)
		if err != nil {
			l.t.Fatal(err)
		}
		gor, fds = min(gor, g), min(fds, f)
		time.Sleep(200 * time.Millisecond)
	}
	return gor, fds
}

func TestReloadStorm(t *testing.T) {
	const (
		phase1 = 300 // ends with a valid write (a revert)
		phase2 = 100 // ends with a valid write (new bytes)
		burst  = 40  // then invalid writes only
		margin = 4   // goroutines and fds
	)
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("UNDERPASS_STORM_SEED"); s != "" {
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatal(err)
		}
		seed = v
	}
	t.Logf("seed %d (UNDERPASS_STORM_SEED=%d replays the write sequence; the timing differs)", seed, seed)

	l := newLab(t, netenv.Options{})
	// v0 is the start-up config and phase 1's last write. logLevel warn
	// makes the level observable: no "config reloaded" info lines.
	v0 := stormValid(5)
	v0.level = "warn"
	if err := os.WriteFile(l.cfg, []byte(v0.yaml(l.dir, metricsAddr, "")), 0o644); err != nil {
		t.Fatal(err)
	}
	a := l.startWithConfigLevel(agentBin)
	a.waitReady()
	pid := agentPID(t, a)
	dp := l.open()
	m := &dp.Maps
	d := &stormDriver{t: t, l: l, a: a, rng: rand.New(rand.NewPCG(seed, seed^0x5eed)), kinds: map[int]int{}}
	if !d.waitInForce(m, v0.want(), "start-up") {
		t.FailNow()
	}

	// Warm-up, so that whatever a first reload, rejection or SIGHUP
	// allocates once is in the baseline: a valid change, an invalid one,
	// a SIGHUP on the invalid file, back to v0.
	d.writeAtomic(stormValid(17), true, true)
	if !d.waitInForce(m, stormValid(17).want(), "warm-up") {
		t.FailNow()
	}
	e0 := l.reloads("error")
	d.writeAtomic(stormInvalid(2, 3), false, true)
	l.slowWaitMetric("underpass_config_reloads_total", `result="error"`, float64(e0+1))
	d.hup()
	l.slowWaitMetric("underpass_config_reloads_total", `result="error"`, float64(e0+2))
	d.writeAtomic(v0, true, true)
	if !d.waitInForce(m, v0.want(), "warm-up end") {
		t.FailNow()
	}

	gor0, fds0 := stormResources(l, pid)
	err0, ok0 := l.reloads("error"), l.reloads("success")
	coll0 := l.slowMetric("underpass_collection_errors_total", "")
	rej0 := len(a.rejections())
	d.valid, d.invalid, d.atomicW, d.inPlace, d.split, d.hups = 0, 0, 0, 0, 0, 0
	t.Logf("baseline: go_goroutines %d, fds %d, reloads success %d error %d", gor0, fds0, ok0, err0)

	sc := startScraper(l)
	start := time.Now()

	// Phase 1: the last write is valid: v0, byte for byte what the file
	// held during the last pause.
	d.storm(phase1, v0, true)
	t.Logf("phase 1: %d writes (%d valid, %d invalid; %d atomic, %d in place of which %d split around a SIGHUP), %d SIGHUPs, %s",
		phase1, d.valid, d.invalid, d.atomicW, d.inPlace, d.split, d.hups, time.Since(start).Round(time.Millisecond))
	if !d.waitInForce(m, v0.want(), fmt.Sprintf("phase 1 (%d writes, the last one valid: a revert to the file as it was at the last pause)", phase1)) {
		d.resync(m, v0, "phase 1")
	}

	// logLevel warn is in force: a SIGHUP reload logs its info line only
	// below warn. The rejection that follows is logged (ERROR) by the same
	// goroutine after that reload, so once it shows, the info line would
	// have shown too.
	mark := len(a.Out.String())
	s1 := l.reloads("success")
	d.hup()
	l.slowWaitMetric("underpass_config_reloads_total", `result="success"`, float64(s1+1))
	e1 := l.reloads("error")
	d.writeAtomic(stormInvalid(5, 8), false, true)
	l.slowWaitMetric("underpass_config_reloads_total", `result="error"`, float64(e1+1))
	waitFor(t, 10*time.Second, "the rejection logged", func() bool {
		return strings.Contains(a.Out.String()[mark:], `msg="config rejected`)
	})
	if tail := a.Out.String()[mark:]; strings.Contains(tail, `msg="config reloaded"`) {
		t.Errorf("logLevel warn from the config is not in force: an info line was logged:\n%s", tail)
	}

	// Phase 2: a storm ending with a valid write of new bytes.
	v1 := stormValid(40) // logLevel info
	d.storm(phase2, v1, false)
	if !d.waitInForce(m, v1.want(), fmt.Sprintf("phase 2 (%d writes, the last one valid)", phase2)) {
		d.resync(m, v1, "phase 2")
	}
	// The info line of a SIGHUP reload shows now (logLevel info).
	mark = len(a.Out.String())
	d.hup()
	waitFor(t, 10*time.Second, "info line of the SIGHUP reload (logLevel info)", func() bool {
		return strings.Contains(a.Out.String()[mark:], `msg="config reloaded" trigger=SIGHUP`)
	})

	// Phase 3: only invalid writes; v1 must stay.
	for i := range burst {
		k := d.rng.IntN(len(stormInvalidKinds))
		d.kinds[k]++
		c := stormInvalid(k, d.rng.IntN(120))
		unique := i == burst-1 // the watcher must report the last one
		switch r := d.rng.IntN(3); {
		case r == 0 || unique:
			d.writeAtomic(c, false, unique)
		default:
			d.writeInPlace(c, false, r == 2, false)
		}
		if i < burst-1 && d.rng.IntN(2) == 0 {
			d.hup()
		}
		time.Sleep(time.Duration(d.rng.IntN(4000)) * time.Microsecond)
	}
	eLast := l.reloads("error")
	waitFor(t, 20*time.Second, "the last invalid write rejected", func() bool {
		return l.reloads("error") > eLast
	})
	d.waitInForce(m, v1.want(), fmt.Sprintf("phase 3 (%d invalid writes after a valid one)", burst))
	took := time.Since(start)

	sc.finish()
	if a.Exited() {
		t.Fatalf("underpassd exited: %v", a.Err())
	}
	if code, body, err := l.slowGet("/readyz"); err != nil || code != http.StatusOK {
		t.Fatalf("/readyz after the storm: %d %q %v", code, body, err)
	}

	// Reload counters. A rejection comes from a watcher report (one per
	// state that stayed put for two polls, so at most one per invalid
	// write: no write is paused half-way for that long) or from a SIGHUP
	// (at most one per signal; signals sent while one is pending coalesce,
	// and a SIGHUP may catch a valid file half written, which is why the
	// bound counts all SIGHUPs). How many of each happen depends on timing,
	// so only the bounds are exact; the same goes for successes.
	errs, oks := l.reloads("error")-err0, l.reloads("success")-ok0
	rejLines := a.rejections()[rej0:]
	t.Logf("storm total: %d writes (%d valid, %d invalid; %d atomic, %d in place, %d split around a SIGHUP), %d SIGHUPs, invalid kinds %v",
		d.valid+d.invalid, d.valid, d.invalid, d.atomicW, d.inPlace, d.split, d.hups, d.kinds)
	t.Logf("reloads: %d error (%d 'config rejected' lines), %d success; scrapes %d ok, %d failed, slowest %s; storm to settled %s",
		errs, len(rejLines), oks, sc.ok.Load(), sc.failed.Load(), sc.slowest.Round(time.Millisecond), took.Round(time.Millisecond))
	if errs <= 0 || errs > d.invalid+d.hups {
		t.Errorf("reload errors %d, want 1..%d (invalid writes %d + SIGHUPs %d)", errs, d.invalid+d.hups, d.invalid, d.hups)
	}
	if oks <= 0 || oks > d.valid+d.hups {
		t.Errorf("reload successes %d, want 1..%d (valid writes %d + SIGHUPs %d)", oks, d.valid+d.hups, d.valid, d.hups)
	}
	if failed := strings.Count(a.Out.String(), "config reload failed to apply"); failed > 0 || len(rejLines) != errs {
		t.Errorf("%d reloads failed to apply; %d rejection lines for %d errors counted", failed, len(rejLines), errs)
	}
	for _, line := range rejLines {
		if strings.Contains(line, "no such file") {
			t.Errorf("the agent saw the config file missing (renames are atomic): %s", line)
		}
	}
	if sc.failed.Load() > 0 || sc.ok.Load() == 0 {
		t.Errorf("scrapes during the storm: %d ok, %d failed (first: %s)", sc.ok.Load(), sc.failed.Load(), sc.firstErr)
	}
	if c := l.slowMetric("underpass_collection_errors_total", ""); c != coll0 {
		t.Errorf("underpass_collection_errors_total %v -> %v during the storm", coll0, c)
	}
	// A half-written file applied through SIGHUP: what was cut off takes
	// its default, bpffs among them (the agent warns that it changed).
	t.Logf("half-written files applied (bpffs changed warnings): %d", strings.Count(a.Out.String(), "bpffs changed"))

	// Resources: back to the baseline once the storm is over.
	var gor, fds int
	waitFor(t, 60*time.Second, "goroutines and fds back to the baseline", func() bool {
		gor = int(l.slowMetric("go_goroutines", ""))
		var err error
		if fds, err = countFDs(pid); err != nil {
			t.Fatal(err)
		}
		return gor <= gor0+margin && fds <= fds0+margin
	})
	gor, fds = stormResources(l, pid)
	t.Logf("go_goroutines %d -> %d, fds %d -> %d", gor0, gor, fds0, fds)
	if gor > gor0+margin || fds > fds0+margin {
		t.Errorf("resource growth: goroutines %d -> %d, fds %d -> %d (margin %d)", gor0, gor, fds0, fds, margin)
	}

	if m := stormPanic.FindString(a.Out.String()); m != "" {
		t.Errorf("the agent's log shows %q", m)
	}
	a.stop()
}

// writeRaw replaces the config file atomically with data.
func (d *stormDriver) writeRaw(data string) {
	d.t.Helper()
	tmp := d.l.cfg + ".storm.tmp"
	if err := os.WriteFile(tmp, []byte(data), 0o644); err != nil {
		d.t.Fatal(err)
	}
	if err := os.Rename(tmp, d.l.cfg); err != nil {
		d.t.Fatal(err)
	}
}

// TestReloadSIGHUPRace replays, step by step, the two interleavings that
// TestReloadStorm runs into at random: a SIGHUP that arrives while a file is
// being written in place, and a file that returns to the bytes the agent's
// watcher reported before a SIGHUP applied something else. SIGHUP goes
// through the watcher (config.Watch): the file is applied once it has held
// still for a poll interval (500ms), never half-written, and what the SIGHUP
// applied is what a later change is compared with.
func TestReloadSIGHUPRace(t *testing.T) {
	l := newLab(t, netenv.Options{})
	cfgA := stormValid(5) // guard on 10.97.0.0/16 + fd00:61::/112, static 10.97.0.1
	cfgA.level = "info"
	cfgB := stormValid(40) // guard on 10.98.0.0/16 + fd00:62::/112, host CIDR 169.254.101.0/24
	bytesA := cfgA.yaml(l.dir, metricsAddr, "A")
	if err := os.WriteFile(l.cfg, []byte(bytesA), 0o644); err != nil {
		t.Fatal(err)
	}
	a := l.startWithConfigLevel(agentBin)
	a.waitReady()
	m := &l.open().Maps
	d := &stormDriver{t: t, l: l, a: a, kinds: map[int]int{}}
	// waitInForce includes 1.5s of quiet: the watcher has reported bytesA.
	if !d.waitInForce(m, cfgA.want(), "start-up") {
		t.FailNow()
	}
	successes := func() int { return l.reloads("success") }

	// 1. SIGHUP while the file is half written in place (an editor or
	// `cat > file` saving): the first lines, up to staleServices, form a
	// valid config on their own. The rest follows 100ms later, well inside
	// the watcher's interval.
	cut := strings.Index(bytesA, "staleServices:")
	f, err := os.OpenFile(l.cfg, os.O_WRONLY|os.O_TRUNC, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteString(bytesA[:cut]); err != nil {
		t.Fatal(err)
	}
	s0 := successes()
	d.hup()
	time.Sleep(100 * time.Millisecond)
	half, err := stormObserve(m)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteString(bytesA[cut:]); err != nil { // the same bytes as before, complete
		t.Fatal(err)
	}
	f.Close()
	if !half.equal(cfgA.want()) {
		t.Errorf("a SIGHUP during an in-place write applied the half-written file (%d of %d bytes):\n  in force %v\n  file had %v",
			cut, len(bytesA), half, cfgA.want())
	}
	// The SIGHUP is served with the complete file (unchanged: re-applied).
	waitFor(t, 10*time.Second, "the SIGHUP served", func() bool { return successes() > s0 })
	if !d.waitInForce(m, cfgA.want(), "1. the complete file after a SIGHUP during its rewrite") {
		t.FailNow()
	}
	if strings.Contains(a.Out.String(), "bpffs changed") {
		t.Errorf("a half-written file was applied at some point (bpffs changed warning):\n%s", a.Out.String())
	}

	// 2. Write B, SIGHUP, wait for B, then put the file back as it was, byte
	// for byte: the bytes the watcher reported before the SIGHUP.
	d.writeRaw(cfgB.yaml(l.dir, metricsAddr, "B"))
	d.hup()
	if !d.waitInForce(m, cfgB.want(), "2. B after its SIGHUP") {
		t.FailNow()
	}
	d.writeRaw(bytesA)
	d.waitInForce(m, cfgA.want(), "2. the file reverted to A (the bytes the watcher last reported) after a SIGHUP applied B")
	if m := stormPanic.FindString(a.Out.String()); m != "" {
		t.Errorf("the agent's log shows %q", m)
	}
}

// ---------------------------------------------------------------------------
// Metrics listener.

// tcpListener is a listening socket from /proc/<pid>/net/tcp{,6}.
type tcpListener struct {
	addr  netip.AddrPort
	inode string
}

// procListeners returns the TCP sockets in LISTEN state owned by pid: the
// kernel's table of pid's netns, filtered by the socket inodes among pid's
// file descriptors.
func procListeners(t *testing.T, pid int) []netip.AddrPort {
	t.Helper()
	owned := map[string]bool{}
	fdDir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(fdDir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		target, err := os.Readlink(filepath.Join(fdDir, e.Name()))
		if err != nil {
			continue // closed meanwhile
		}
		if ino, ok := strings.CutPrefix(target, "socket:["); ok {
			owned[strings.TrimSuffix(ino, "]")] = true
		}
	}
	var out []netip.AddrPort
	for _, file := range []string{"tcp", "tcp6"} {
		ls, err := parseProcNetTCP(fmt.Sprintf("/proc/%d/net/%s", pid, file))
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range ls {
			if owned[l.inode] {
				out = append(out, l.addr)
			}
		}
	}
	return out
}

func parseProcNetTCP(path string) ([]tcpListener, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []tcpListener
	sc := bufio.NewScanner(f)
	sc.Scan() // header
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 10 || fields[3] != "0A" { // TCP_LISTEN
			continue
		}
		hexAddr, hexPort, ok := strings.Cut(fields[1], ":")
		if !ok {
			return nil, fmt.Errorf("%s: bad address %q", path, fields[1])
		}
		raw, err := hex.DecodeString(hexAddr)
		if err != nil || (len(raw) != 4 && len(raw) != 16) {
			return nil, fmt.Errorf("%s: bad address %q", path, fields[1])
		}
		// The kernel prints each 32-bit word in host (little-endian) order.
		for i := 0; i < len(raw); i += 4 {
			raw[i], raw[i+1], raw[i+2], raw[i+3] = raw[i+3], raw[i+2], raw[i+1], raw[i]
		}
		a, _ := netip.AddrFromSlice(raw)
		port, err := strconv.ParseUint(hexPort, 16, 16)
		if err != nil {
			return nil, fmt.Errorf("%s: bad port %q", path, hexPort)
		}
		out = append(out, tcpListener{addr: netip.AddrPortFrom(a.Unmap(), uint16(port)), inode: fields[9]})
	}
	return out, sc.Err()
}

// dialFrom connects from ns to addr and returns the error (nil: connected).
func dialFrom(ns *netenv.NS, addr netip.AddrPort) error {
	return ns.Do(func() error {
		c, err := net.DialTimeout("tcp", addr.String(), 5*time.Second)
		if err == nil {
			c.Close()
		}
		return err
	})
}

// getFrom does an HTTP GET from inside ns.
func getFrom(ns *netenv.NS, addr netip.AddrPort, path string, timeout time.Duration) (int, string, error) {
	return testutil.HTTPGet(testutil.NetnsHTTPClient(ns.Do, timeout), "http://"+addr.String()+path)
}

func TestMetricsLoopbackByDefault(t *testing.T) {
	l := newLab(t, netenv.Options{})
	wire := l.AddWireHost("scraper", l.Uplinks[0].IP4(30), l.Uplinks[0].IP6(30))
	node4, node6 := l.Uplinks[0].Node4.Addr(), l.Uplinks[0].Node6.Addr()
	const defaultPort, openPort = 9775, 9776
	writeCfg := func(listen string) {
		t.Helper()
		body := fmt.Sprintf("bpffs: %s\ngcInterval: 1s\nstaleServices: {cidrs: [10.96.0.0/16]}\nservices: {static: [10.96.0.1], kubernetes: \"false\"}\n", l.dir)
		if listen != "" {
			body += fmt.Sprintf("metrics: {listen: %q}\n", listen)
		}
		tmp := l.cfg + ".tmp"
		if err := os.WriteFile(tmp, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, l.cfg); err != nil {
			t.Fatal(err)
		}
	}
	// refused asserts that nobody answers on the node's own addresses at
	// port, neither from the node itself nor from a host on the wire.
	refused := func(port uint16) {
		t.Helper()
		for _, from := range []*netenv.NS{l.Node, wire.NS} {
			for _, a := range []netip.Addr{node4, node6} {
				ap := netip.AddrPortFrom(a, port)
				if err := dialFrom(from, ap); !errors.Is(err, syscall.ECONNREFUSED) {
					t.Errorf("connect from %s to %s: %v, want connection refused", from, ap, err)
				}
			}
		}
	}
	isLoopback := func(ls []netip.AddrPort) bool {
		return len(ls) > 0 && !slices.ContainsFunc(ls, func(ap netip.AddrPort) bool { return !ap.Addr().IsLoopback() })
	}

	// 1. No metrics.listen: loopback only.
	writeCfg("")
	a := l.start(agentBin)
	a.waitReady() // on 127.0.0.1:9775 inside the node netns
	pid := agentPID(t, a)
	ls := procListeners(t, pid)
	t.Logf("default: the agent listens on %v", ls)
	if !isLoopback(ls) || !slices.Contains(ls, netip.MustParseAddrPort("127.0.0.1:9775")) {
		t.Fatalf("without metrics.listen the agent listens on %v, want 127.0.0.1:%d (loopback only)", ls, defaultPort)
	}
	refused(defaultPort)
	if out, _, err := l.Node.Exec(t.Context(), "ss", "-ltnpH"); err == nil {
		t.Logf("ss -ltnp in the node netns:\n%s", out)
	}
	a.stop()

	// 2. metrics.listen 0.0.0.0: reachable on the node's address from the
	// wire, and the listener is a wildcard (Go makes 0.0.0.0 a dual-stack
	// [::] socket).
	writeCfg(fmt.Sprintf("0.0.0.0:%d", openPort))
	a = l.start(agentBin)
	open4 := netip.AddrPortFrom(node4, openPort)
	waitFor(t, 60*time.Second, "/readyz on "+open4.String()+" from the wire", func() bool {
		if a.Exited() {
			t.Fatalf("underpassd exited: %v\n%s", a.Err(), a.Out.String())
		}
		code, _, err := getFrom(wire.NS, open4, "/readyz", 30*time.Second)
		return err == nil && code == http.StatusOK
	})
	pid = agentPID(t, a)
	ls = procListeners(t, pid)
	t.Logf("metrics.listen 0.0.0.0:%d: the agent listens on %v", openPort, ls)
	if len(ls) != 1 || !ls[0].Addr().IsUnspecified() || ls[0].Port() != openPort {
		t.Fatalf("with metrics.listen 0.0.0.0:%d the agent listens on %v, want one wildcard listener", openPort, ls)
	}
	if code, body, err := getFrom(wire.NS, open4, "/metrics", 30*time.Second); err != nil || code != http.StatusOK || !strings.Contains(body, "underpass_config_reloads_total") {
		t.Fatalf("/metrics from the wire on %s: %d %v", open4, code, err)
	}
	refused(defaultPort) // and nothing left on the default port

	// 3. Removing metrics.listen live moves the server back to loopback.
	writeCfg("")
	waitFor(t, 20*time.Second, "the listener back on loopback", func() bool {
		return isLoopback(procListeners(t, pid))
	})
	ls = procListeners(t, pid)
	t.Logf("metrics.listen removed live: the agent listens on %v", ls)
	if !slices.Contains(ls, netip.MustParseAddrPort("127.0.0.1:9775")) {
		t.Fatalf("after removing metrics.listen the agent listens on %v, want 127.0.0.1:%d", ls, defaultPort)
	}
	if code, _, err := l.slowGet("/readyz"); err != nil || code != http.StatusOK {
		t.Fatalf("/readyz on loopback after the move: %d %v", code, err)
	}
	refused(openPort)
	refused(defaultPort)
	if v := l.slowMetric("underpass_config_reloads_total", `result="success"`); v != 1 {
		t.Fatalf("reloads{success} = %v after one live change, want 1", v)
	}

	// 4. The same port on every address, live: the new socket collides with
	// the agent's own loopback one, so the old closes first. Until December
	// 2026 the move failed (address in use), and nothing retried it.
	writeCfg(fmt.Sprintf("0.0.0.0:%d", defaultPort))
	def4 := netip.AddrPortFrom(node4, defaultPort)
	waitFor(t, 20*time.Second, "/readyz on "+def4.String()+" from the wire", func() bool {
		code, _, err := getFrom(wire.NS, def4, "/readyz", 5*time.Second)
		return err == nil && code == http.StatusOK
	})
	ls = procListeners(t, pid)
	t.Logf("metrics.listen 0.0.0.0:%d live: the agent listens on %v", defaultPort, ls)
	if len(ls) != 1 || !ls[0].Addr().IsUnspecified() || ls[0].Port() != defaultPort {
		t.Fatalf("the agent listens on %v, want one wildcard listener on %d", ls, defaultPort)
	}
	a.stop()
}
