package agent_test

import (
	"context"
	"flag"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"

	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
	"github.com/underpass-cni/underpass/test/netenv"
)

// benchEnabled: the agent benchmarks take minutes and print figures rather
// than assert them; run them with UNDERPASS_BENCH=1 or any -bench flag.
func benchEnabled() bool {
	if os.Getenv("UNDERPASS_BENCH") == "1" {
		return true
	}
	f := flag.Lookup("test.bench")
	return f != nil && f.Value.String() != ""
}

const (
	benchServices  = 10000
	benchBackends  = 10 // ready endpoints in each Service's one slice
	benchEndpoints = 1000
	benchDeletes   = 20
)

// TestBenchAgentScale measures, with a real kube-apiserver holding 10,000
// Services, each with one EndpointSlice of 10 ready endpoints, the agent in
// services.mode host and then ebpf, from an empty pin directory each: the
// initial sync, the time until every frontend is in svc_frontends (ebpf),
// the time from a Service delete to its VIP being stale in the map, and the
// agent's CPU and memory (RSS, Go heap, BPF maps) with them and 1,000
// registered endpoints. In host mode the agent does not watch the slices
// at all.
func TestBenchAgentScale(t *testing.T) {
	if !benchEnabled() {
		t.Skip("benchmark: set UNDERPASS_BENCH=1 or pass -bench")
	}
	l := newLab(t, netenv.Options{})
	c, kubeconfig := startKube(t, l)
	ctr := l.AddMacvlanContainer("ctr", l.Uplinks[0].IP4(10), netip.Prefix{})

	// 10,000 Services and their slices, 32 at a time.
	start := time.Now()
	vips := make([]netip.Addr, benchServices)
	inParallel(t, benchServices, 32, func(i int) (err error) {
		vips[i], err = createBenchService(c.Client, i)
		return err
	})
	report(t, "create %d Services and %d EndpointSlices (%d endpoints) in the apiserver: %s",
		benchServices, benchServices, benchServices*benchBackends, time.Since(start).Round(time.Millisecond))

	var rows []benchRow
	for _, mode := range []string{"host", "ebpf"} {
		rows = append(rows, benchAgentMode(t, l, c.Client, kubeconfig, ctr, mode, vips))
	}
	reportRows(t, rows)
}

// benchRow is what one services.mode measured.
type benchRow struct {
	mode                   string
	ready, frontends       time.Duration // from start; frontends: ebpf only
	live                   float64
	delMed, delP90, delMax time.Duration
	idle                   time.Duration // CPU per 10 s
	rss, hwm               string
	heapInuse, heapAlloc   float64 // bytes, from /metrics; -1: absent
	heapGoal, gcs          float64 // the next GC's heap goal (bytes) and GCs so far
	bpfMaps, svcTables     uint64  // memlock of all the agent's maps; of svc_frontends+svc_slots+svc_backends
	nMaps                  int
}

// benchAgentMode runs the agent in mode against the Services of vips
// (recreating the ones it deletes, so that the next mode finds them all)
// with a fresh pin directory and 1,000 endpoints.
func benchAgentMode(t *testing.T, l *lab, cs kubernetes.Interface, kubeconfig string, ctr *netenv.Container, mode string, vips []netip.Addr) benchRow {
	t.Helper()
	ctx := context.Background()
	row := benchRow{mode: mode}
	// 1,000 registered endpoints (that GC keeps: they name a live netns
	// and interface).
	dp, err := loader.Load(l.dir, loader.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		dp.Close()
		// The next mode starts from nothing, as a fresh node would.
		must(t, os.RemoveAll(l.dir))
	}()
	for i := range benchEndpoints {
		mac := net.HardwareAddr{0x02, 0xbe, 0, 0, byte(i >> 8), byte(i)}
		addr := netip.AddrFrom4([4]byte{10, 244, byte(i >> 8), byte(i)})
		_, err := datapath.Register(&dp.Maps, datapath.Endpoint{
			ContainerID: fmt.Sprintf("bench-%d", i), IfName: ctr.IfName, Netns: ctr.Path,
			ParentIfindex: ctr.ParentIndex, ParentName: ctr.Parent, Ifindex: ctr.Index,
			Mode: loader.ModeIPvlanL2, MAC: mac, Addrs: []netip.Prefix{netip.PrefixFrom(addr, 16)},
		})
		if err != nil {
			t.Fatal(err)
		}
	}

	l.gcInterval = "1m" // the default: measure what a node runs
	l.writeConfig(kubeConfigYAML(kubeconfig, false) + "  mode: " + mode + "\n")
	// In ebpf mode, svc_frontends is polled from the agent's start on
	// (every 50 ms, reading the keys only) until every Service is there.
	begin := time.Now()
	allFrontends := make(chan error, 1)
	stopPoll := make(chan struct{})
	defer close(stopPoll)
	if mode == "ebpf" {
		go func() {
			for {
				n, err := benchFrontendsIn(dp, vips)
				if err != nil || n == benchServices {
					row.frontends = time.Since(begin)
					allFrontends <- err
					return
				}
				select {
				case <-stopPoll:
					return
				case <-time.After(50 * time.Millisecond):
				}
			}
		}()
	}
	ag := l.start(agentBin)
	row.ready = ag.waitReady()
	row.live = l.metric("underpass_live_services", "")
	if row.live < benchServices {
		t.Fatalf("%s: %v live services after the initial sync, want at least %d", mode, row.live, benchServices)
	}
	if mode == "ebpf" {
		select {
		case err := <-allFrontends:
			must(t, err)
		case <-time.After(2 * time.Minute):
			t.Fatalf("not every Service's frontend in svc_frontends 2 minutes after the start")
		}
		checkBenchFrontends(t, dp, vips)
	} else if n := countEntries(t, dp.Maps.SvcFrontends); n != 0 {
		t.Fatalf("host mode: %d entries in svc_frontends, want none", n)
	}
	report(t, "%s: start to ready %s, live services %v, all frontends in svc_frontends %s", mode,
		row.ready.Round(time.Millisecond), row.live, row.frontends.Round(time.Millisecond))
	l.waitMetric("underpass_endpoints", "", benchEndpoints)

	// Latency of deletes, one at a time, from the Services this mode has
	// not deleted before.
	var lat []time.Duration
	for i := range benchDeletes {
		name := "svc-" + strconv.Itoa(i)
		k := datapath.IPKey(vips[i])
		begin := time.Now()
		if err := cs.CoreV1().Services("default").Delete(ctx, name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		var v uint32
		for dp.Maps.LiveSvcs.Lookup(&k, &v) == nil {
			if time.Since(begin) > 10*time.Second {
				t.Fatalf("%s: %s still live after 10s", mode, name)
			}
			time.Sleep(200 * time.Microsecond)
		}
		lat = append(lat, time.Since(begin))
	}
	slices.Sort(lat)
	row.delMed, row.delP90, row.delMax = lat[len(lat)/2], lat[len(lat)*9/10], lat[len(lat)-1]
	report(t, "%s: Service delete -> VIP stale in the map (%d deletes): median %s, p90 %s, max %s", mode, benchDeletes,
		row.delMed.Round(10*time.Microsecond), row.delP90.Round(10*time.Microsecond), row.delMax.Round(10*time.Microsecond))
	// Back to 10,000 (their slices are still there: nothing deletes them).
	for i := range benchDeletes {
		vips[i], err = createBenchService(cs, i)
		must(t, err)
	}
	if mode == "ebpf" {
		waitFor(t, 30*time.Second, "the recreated Services' frontends", func() bool {
			n, err := benchFrontendsIn(dp, vips)
			must(t, err)
			return n == benchServices
		})
		checkBenchFrontends(t, dp, vips)
	}

	time.Sleep(2 * time.Second) // let the heap settle after the initial list
	pid := ag.Cmd.Process.Pid
	cpu0 := procCPU(t, pid)
	time.Sleep(10 * time.Second)
	row.idle = procCPU(t, pid) - cpu0
	report(t, "%s: agent CPU while idle with %d Services and %d endpoints: %s per 10s (%.2f%% of a core)", mode,
		benchServices, benchEndpoints, row.idle, float64(row.idle)/float64(10*time.Second)*100)
	row.rss, row.hwm = procMem(t, pid)
	row.heapInuse = l.metric("go_memstats_heap_inuse_bytes", "")
	row.heapAlloc = l.metric("go_memstats_heap_alloc_bytes", "")
	// The allocated heap includes what the initial list left and no GC
	// has collected yet (an idle agent allocates little); the goal is
	// about twice the heap live after the last GC (GOGC 100).
	row.heapGoal = l.metric("go_memstats_next_gc_bytes", "")
	row.gcs = l.metric("go_gc_duration_seconds_count", "")
	maps := bpfMapMemory(t, pid)
	row.nMaps = len(maps)
	for name, b := range maps {
		row.bpfMaps += b
		if name == "svc_frontends" || name == "svc_slots" || name == "svc_backends" {
			row.svcTables += b
		}
	}
	report(t, "%s: agent memory with %d Services and %d endpoints: RSS %s, peak RSS %s, Go heap in use %s (allocated %s, next GC at %s after %v GCs); "+
		"BPF maps (memlock, %d maps) %s, of which svc_frontends+svc_slots+svc_backends %s", mode, benchServices, benchEndpoints,
		row.rss, row.hwm, mib(row.heapInuse), mib(row.heapAlloc), mib(row.heapGoal), row.gcs, row.nMaps, mib(float64(row.bpfMaps)), mib(float64(row.svcTables)))
	ag.stop()
	return row
}

// inParallel runs f(0..n-1) on workers goroutines; a loaded 2-core
// apiserver times out now and then, so each call is tried up to 5 times.
func inParallel(t *testing.T, n, workers int, f func(i int) error) {
	t.Helper()
	var next, failed atomic.Int64
	var firstErr atomic.Value
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for {
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				var err error
				for try := range 5 {
					if err = f(i); err == nil {
						break
					}
					time.Sleep(time.Duration(try+1) * 200 * time.Millisecond)
				}
				if err != nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, err)
				}
			}
		})
	}
	wg.Wait()
	if failed.Load() > 0 {
		t.Fatalf("%d of %d failed, first: %v", failed.Load(), n, firstErr.Load())
	}
}

// createBenchService creates Service svc-i (port http 80 -> 8080) and its
// slice of benchBackends ready endpoints, whose addresses no other
// Service's slice has (10.200.0.0/15, in order), and returns its ClusterIP.
// What already exists is kept, so that it can be retried.
func createBenchService(cs kubernetes.Interface, i int) (netip.Addr, error) {
	ctx := context.Background()
	name := "svc-" + strconv.Itoa(i)
	svc, err := cs.CoreV1().Services("default").Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: name},
		Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "http", Port: 80,
			TargetPort: intstr.FromInt32(8080), Protocol: corev1.ProtocolTCP}}},
	}, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		svc, err = cs.CoreV1().Services("default").Get(ctx, name, metav1.GetOptions{})
	}
	if err != nil {
		return netip.Addr{}, err
	}
	vip, err := netip.ParseAddr(svc.Spec.ClusterIP)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("service %s: cluster IP %q: %w", name, svc.Spec.ClusterIP, err)
	}
	_, err = cs.DiscoveryV1().EndpointSlices("default").Create(ctx, backendSlice(name, benchBackendAddrs(i)...), metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		err = nil
	}
	return vip, err
}

func benchBackendAddrs(i int) []netip.Addr {
	out := make([]netip.Addr, benchBackends)
	for j := range out {
		n := i*benchBackends + j
		out[j] = netip.AddrFrom4([4]byte{10, byte(200 + n>>16), byte(n >> 8), byte(n)})
	}
	return out
}

// checkBenchFrontends: every Service has exactly its frontend, with its 10
// backends on port 8080 and nothing draining.
func checkBenchFrontends(t *testing.T, dp *loader.Objects, vips []netip.Addr) {
	t.Helper()
	fs, err := datapath.Frontends(&dp.Maps)
	must(t, err)
	// Others: the apiserver's own kubernetes Service.
	if len(fs) < benchServices || len(fs) > benchServices+2 {
		t.Fatalf("%d frontends, want %d (and the kubernetes Service's)", len(fs), benchServices)
	}
	byVIP := make(map[netip.Addr]*datapath.Frontend, len(fs))
	for i := range fs {
		byVIP[fs[i].VIP] = &fs[i]
	}
	bad := 0
	for i, vip := range vips {
		f := byVIP[vip]
		var want []netip.AddrPort
		for _, a := range benchBackendAddrs(i) {
			want = append(want, netip.AddrPortFrom(a, 8080))
		}
		if f == nil || f.Port != 80 || f.Proto != datapath.ProtoTCP || !slices.Equal(f.Backends, want) || len(f.Draining) != 0 {
			if bad++; bad <= 5 {
				t.Errorf("svc-%d (%s): frontend %+v, want port 80/TCP with backends %v", i, vip, f, want)
			}
		}
	}
	if bad > 0 {
		t.Fatalf("%d of %d frontends wrong", bad, benchServices)
	}
}

// benchFrontendsIn counts the VIPs of vips that have a frontend in
// svc_frontends (reading the keys only: polled while the agent syncs).
func benchFrontendsIn(dp *loader.Objects, vips []netip.Addr) (int, error) {
	want := make(map[netip.Addr]bool, len(vips))
	for _, v := range vips {
		want[v] = true
	}
	var k loader.SvcKey
	var v []byte
	n := 0
	it := dp.Maps.SvcFrontends.Iterate()
	for it.Next(&k, &v) {
		if want[netip.AddrFrom16(k.Addr).Unmap()] {
			n++
		}
	}
	return n, it.Err()
}

func countEntries(t *testing.T, m *ebpf.Map) int {
	t.Helper()
	var k []byte
	var v []byte
	n := 0
	it := m.Iterate()
	for it.Next(&k, &v) {
		n++
	}
	must(t, it.Err())
	return n
}

// bpfMapMemory is the memlock of each BPF map pid holds an fd of, by map
// name (the kernel's own accounting: for the maps without preallocation,
// what their entries use).
func bpfMapMemory(t *testing.T, pid int) map[string]uint64 {
	t.Helper()
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	must(t, err)
	seen := map[uint64]bool{}
	out := map[string]uint64{}
	for _, e := range ents {
		if target, _ := os.Readlink(filepath.Join(dir, e.Name())); target != "anon_inode:bpf-map" {
			continue
		}
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/fdinfo/%s", pid, e.Name()))
		if err != nil {
			continue // closed meanwhile
		}
		var id, memlock uint64
		for _, line := range strings.Split(string(b), "\n") {
			k, v, _ := strings.Cut(line, ":")
			switch k {
			case "map_id":
				id, _ = strconv.ParseUint(strings.TrimSpace(v), 10, 64)
			case "memlock":
				memlock, _ = strconv.ParseUint(strings.TrimSpace(v), 10, 64)
			}
		}
		if seen[id] {
			continue
		}
		seen[id] = true
		name := fmt.Sprintf("id-%d", id)
		if m, err := ebpf.NewMapFromID(ebpf.MapID(id)); err == nil {
			if info, err := m.Info(); err == nil && info.Name != "" {
				name = info.Name
			}
			m.Close()
		}
		out[name] += memlock
	}
	if len(out) == 0 {
		t.Fatalf("pid %d holds no BPF map", pid)
	}
	return out
}

func mib(b float64) string {
	if b < 0 {
		return "n/a"
	}
	return fmt.Sprintf("%.1f MiB", b/(1<<20))
}

// reportRows prints the modes side by side.
func reportRows(t *testing.T, rows []benchRow) {
	t.Helper()
	d := func(v time.Duration) string {
		if v == 0 {
			return "-"
		}
		return v.Round(time.Millisecond).String()
	}
	lines := []struct {
		what string
		f    func(r benchRow) string
	}{
		{"start -> ready", func(r benchRow) string { return d(r.ready) }},
		{"start -> all frontends in svc_frontends", func(r benchRow) string { return d(r.frontends) }},
		{"live services", func(r benchRow) string { return fmt.Sprint(r.live) }},
		{"delete -> stale, median / p90 / max", func(r benchRow) string {
			return fmt.Sprintf("%s / %s / %s", r.delMed.Round(10*time.Microsecond), r.delP90.Round(10*time.Microsecond), r.delMax.Round(10*time.Microsecond))
		}},
		{"idle CPU per 10 s", func(r benchRow) string { return r.idle.String() }},
		{"RSS", func(r benchRow) string { return r.rss }},
		{"peak RSS (VmHWM)", func(r benchRow) string { return r.hwm }},
		{"Go heap in use", func(r benchRow) string { return mib(r.heapInuse) }},
		{"Go heap allocated", func(r benchRow) string { return mib(r.heapAlloc) }},
		{"Go heap goal of the next GC (GCs so far)", func(r benchRow) string { return fmt.Sprintf("%s (%v)", mib(r.heapGoal), r.gcs) }},
		{"BPF maps, memlock (all)", func(r benchRow) string { return fmt.Sprintf("%s (%d maps)", mib(float64(r.bpfMaps)), r.nMaps) }},
		{"BPF frontend tables, memlock", func(r benchRow) string { return mib(float64(r.svcTables)) }},
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%d Services x %d backends, %d endpoints:\n", benchServices, benchBackends, benchEndpoints)
	fmt.Fprintf(&b, "%-42s", "services.mode")
	for _, r := range rows {
		fmt.Fprintf(&b, " | %-30s", r.mode)
	}
	for _, ln := range lines {
		fmt.Fprintf(&b, "\n%-42s", ln.what)
		for _, r := range rows {
			fmt.Fprintf(&b, " | %-30s", ln.f(r))
		}
	}
	report(t, "%s", b.String())
}

func report(t *testing.T, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...)
	t.Log(msg)
	fmt.Println("BENCH: " + msg)
}

// procMem reads VmRSS and VmHWM of pid.
func procMem(t *testing.T, pid int) (rss, hwm string) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			rss = strings.TrimSpace(v)
		}
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			hwm = strings.TrimSpace(v)
		}
	}
	return rss, hwm
}

// procCPU is the user+system CPU time pid has used.
func procCPU(t *testing.T, pid int) time.Duration {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	// Fields after the command name (which may contain spaces).
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
	utime, _ := strconv.ParseInt(f[11], 10, 64)
	stime, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(utime+stime) * 10 * time.Millisecond // USER_HZ = 100
}
