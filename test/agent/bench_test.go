package agent_test

import (
	"context"
	"flag"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
	"github.com/underpass-cni/underpass/test/netenv"
)

// benchEnabled: the agent benchmarks take a minute and print figures rather
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
	benchEndpoints = 1000
	benchDeletes   = 20
)

// TestBenchAgentScale measures, with a real kube-apiserver: the initial sync
// of 10,000 Services, the agent's memory with them and 1,000 endpoints, and
// the time from a Service delete to its VIP being stale in the map.
func TestBenchAgentScale(t *testing.T) {
	if !benchEnabled() {
		t.Skip("benchmark: set UNDERPASS_BENCH=1 or pass -bench")
	}
	l := newLab(t, netenv.Options{})
	c, kubeconfig := startKube(t, l)
	ctr := l.AddMacvlanContainer("ctr", l.Uplinks[0].IP4(10), netip.Prefix{})
	ctx := context.Background()

	// 10,000 Services, created 32 at a time.
	start := time.Now()
	var next atomic.Int64
	var wg sync.WaitGroup
	var failed atomic.Int64
	var firstErr atomic.Value
	for range 32 {
		wg.Go(func() {
			for {
				i := next.Add(1) - 1
				if i >= benchServices {
					return
				}
				// A loaded 2-core apiserver times out now and then: retry.
				var err error
				for try := 0; try < 5; try++ {
					if err = createServiceErr(c.Client, "default", "svc-"+strconv.FormatInt(i, 10)); err == nil || apierrors.IsAlreadyExists(err) {
						err = nil
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
		t.Fatalf("%d service creates failed, first: %v", failed.Load(), firstErr.Load())
	}
	report(t, "create %d Services in the apiserver: %s", benchServices, time.Since(start).Round(time.Millisecond))

	// 1,000 registered endpoints (that GC keeps: they name a live netns
	// and interface).
	dp, err := loader.Load(l.dir, loader.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer dp.Close()
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
	l.writeConfig(kubeConfigYAML(kubeconfig, false))
	ag := l.start(agentBin)
	took := ag.waitReady()
	live := l.metric("underpass_live_services", "")
	report(t, "initial sync of %d Services: start to ready %s (live services %v)", benchServices, took.Round(time.Millisecond), live)
	l.waitMetric("underpass_endpoints", "", benchEndpoints)

	// Latency of deletes, one at a time.
	var lat []time.Duration
	for i := range benchDeletes {
		name := "svc-" + strconv.Itoa(i)
		svc, err := c.Client.CoreV1().Services("default").Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		k := datapath.IPKey(netip.MustParseAddr(svc.Spec.ClusterIP))
		begin := time.Now()
		if err := c.Client.CoreV1().Services("default").Delete(ctx, name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		var v uint32
		for dp.Maps.LiveSvcs.Lookup(&k, &v) == nil {
			if time.Since(begin) > 10*time.Second {
				t.Fatalf("%s still live after 10s", name)
			}
			time.Sleep(200 * time.Microsecond)
		}
		lat = append(lat, time.Since(begin))
	}
	slices.Sort(lat)
	report(t, "Service delete -> VIP stale in the map (%d deletes): median %s, p90 %s, max %s", benchDeletes,
		lat[len(lat)/2].Round(10*time.Microsecond), lat[len(lat)*9/10].Round(10*time.Microsecond), lat[len(lat)-1].Round(10*time.Microsecond))

	time.Sleep(2 * time.Second) // let the heap settle after the initial list
	cpu0 := procCPU(t, ag.Cmd.Process.Pid)
	time.Sleep(10 * time.Second)
	idle := procCPU(t, ag.Cmd.Process.Pid) - cpu0
	report(t, "agent CPU while idle with %d Services and %d endpoints: %s per 10s (%.2f%% of a core)", benchServices, benchEndpoints, idle, float64(idle)/float64(10*time.Second)*100)
	rss, hwm := procMem(t, ag.Cmd.Process.Pid)
	report(t, "agent memory with %d Services and %d endpoints: RSS %s, peak RSS %s", benchServices, benchEndpoints, rss, hwm)
	ag.stop()
}

func createServiceErr(cs kubernetes.Interface, ns, name string) error {
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{{Port: 80}}},
	}
	_, err := cs.CoreV1().Services(ns).Create(context.Background(), svc, metav1.CreateOptions{})
	return err
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
