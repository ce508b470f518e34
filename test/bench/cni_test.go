package bench

// CNI ADD/DEL latency, through libcni with the real binaries, as a runtime
// sees it (process start, IPAM and all):
//
//	go test -run '^$' -bench CNILatency -benchtime 1x ./test/bench/
//
// underpass as the main plugin, the reference macvlan plugin alone (no host
// reachability: the floor), underpass chained after it, and macvlan plus a
// ptp veth (the usual way to
// give macvlan pods host reachability: a second interface per pod).
// UNDERPASS_BENCH_RUNS sets the number of runs (default 200). Printed,
// never asserted.

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"testing"
	"text/tabwriter"
	"time"

	"github.com/containernetworking/cni/libcni"

	"github.com/underpass-cni/underpass/internal/loader"
	"github.com/underpass-cni/underpass/internal/testutil"
	"github.com/underpass-cni/underpass/test/netenv"
)

// cniSetup is one way to network a pod: conflists applied in order, each
// with its interface name.
type cniSetup struct {
	name  string
	lists []*libcni.NetworkConfigList
	ifs   []string
	add   []time.Duration
	del   []time.Duration
}

func BenchmarkCNILatency(b *testing.B) {
	testutil.RequireRoot(b)
	runs := 200
	if s := os.Getenv("UNDERPASS_BENCH_RUNS"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			b.Fatalf("UNDERPASS_BENCH_RUNS=%q: want a positive number", s)
		}
		runs = n
	}
	tmp := b.TempDir()
	must(b, testutil.BuildPlugin(filepath.Join(tmp, "underpass")))
	refDir, err := testutil.ReferencePlugins()
	must(b, err)

	env := netenv.New(b, netenv.Options{})
	bpffs := filepath.Join(testutil.MountBPFFS(b), "underpass")
	dp, err := loader.Load(bpffs, loader.Options{})
	must(b, err)
	b.Cleanup(func() { dp.Close() })
	u := env.Uplinks[0]

	confDir := b.TempDir()
	hostLocal := func(subnet, start, end string) map[string]any {
		r := map[string]any{"subnet": subnet}
		if start != "" {
			r["rangeStart"], r["rangeEnd"] = start, end
		}
		return map[string]any{"type": "host-local", "dataDir": b.TempDir(), "ranges": []any{[]any{r}}, "routes": []any{map[string]any{"dst": "0.0.0.0/0"}}}
	}
	wire := func() map[string]any {
		return hostLocal(u.Subnet4.String(), u.IP4(100).Addr().String(), u.IP4(199).Addr().String())
	}
	list := func(name string, plugins ...map[string]any) *libcni.NetworkConfigList {
		raw, err := json.Marshal(map[string]any{"cniVersion": "1.1.0", "name": name, "plugins": plugins})
		must(b, err)
		p := filepath.Join(confDir, name+".conflist")
		must(b, os.WriteFile(p, raw, 0o644))
		l, err := libcni.NetworkConfFromFile(p)
		must(b, err)
		return l
	}
	setups := []*cniSetup{
		{name: "underpass (main mode)", ifs: []string{"eth0"}, lists: []*libcni.NetworkConfigList{
			list("bench-underpass", map[string]any{"type": "underpass", "master": u.Name, "bpffs": bpffs, "ipam": wire()}),
		}},
		{name: "macvlan alone", ifs: []string{"eth0"}, lists: []*libcni.NetworkConfigList{
			list("bench-macvlan", map[string]any{"type": "macvlan", "master": u.Name, "mode": "bridge", "ipam": wire()}),
		}},
		{name: "underpass chained after macvlan", ifs: []string{"eth0"}, lists: []*libcni.NetworkConfigList{
			list("bench-chained", map[string]any{"type": "macvlan", "master": u.Name, "mode": "bridge", "ipam": wire()},
				map[string]any{"type": "underpass", "bpffs": bpffs}),
		}},
		{name: "macvlan + ptp veth", ifs: []string{"eth0", "veth0"}, lists: []*libcni.NetworkConfigList{
			list("bench-mv", map[string]any{"type": "macvlan", "master": u.Name, "mode": "bridge", "ipam": wire()}),
			list("bench-ptp", map[string]any{"type": "ptp", "ipam": hostLocal("10.244.0.0/24", "", "")}),
		}},
	}
	cfg := libcni.NewCNIConfigWithCacheDir([]string{tmp, refDir}, b.TempDir(), nil)
	pod := env.AddNS("bench-pod")

	b.ResetTimer()
	err = env.Node.Do(func() error {
		ctx := context.Background()
		for i := range runs {
			// Interleaved, so drift over the run hits every setup alike.
			for _, s := range setups {
				rts := make([]*libcni.RuntimeConf, len(s.lists))
				start := time.Now()
				for j, l := range s.lists {
					rts[j] = &libcni.RuntimeConf{ContainerID: fmt.Sprintf("bench-%d", i), NetNS: pod.Path, IfName: s.ifs[j],
						Args: [][2]string{{"IgnoreUnknown", "1"}, {"K8S_POD_NAMESPACE", "bench"}, {"K8S_POD_NAME", "pod"}}}
					if _, err := cfg.AddNetworkList(ctx, l, rts[j]); err != nil {
						return fmt.Errorf("%s: ADD: %w", s.name, err)
					}
				}
				s.add = append(s.add, time.Since(start))
				start = time.Now()
				for j := len(s.lists) - 1; j >= 0; j-- {
					if err := cfg.DelNetworkList(ctx, s.lists[j], rts[j]); err != nil {
						return fmt.Errorf("%s: DEL: %w", s.name, err)
					}
				}
				s.del = append(s.del, time.Since(start))
			}
		}
		return nil
	})
	b.StopTimer()
	must(b, err)

	w := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(os.Stdout, "\nCNI latency over %d runs each (libcni -> plugin binaries, host-local IPAM, %d CPUs):\n", runs, cpus())
	fmt.Fprintln(w, "setup\tADD p50\tvs macvlan\tADD p99\tDEL p50\tDEL p99\t")
	floor := median(setups[1].add)
	for _, s := range setups {
		rel := fmt.Sprintf("%+.0f%%", 100*(float64(median(s.add))/float64(floor)-1))
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t\n", s.name, pct(s.add, 50), rel, pct(s.add, 99), pct(s.del, 50), pct(s.del, 99))
	}
	w.Flush()
}

func median(ds []time.Duration) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[len(s)/2]
}

func pct(ds []time.Duration, p int) string {
	s := slices.Clone(ds)
	slices.Sort(s)
	i := (len(s)*p+99)/100 - 1
	i = max(0, min(i, len(s)-1))
	return fmt.Sprintf("%.1f ms", float64(s[i].Microseconds())/1000)
}

func cpus() int {
	n, _ := strconv.Atoi(os.Getenv("GOMAXPROCS"))
	if n > 0 {
		return n
	}
	return runtime.NumCPU()
}
