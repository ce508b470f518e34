// Package agent_test runs the real underpassd binary in a netenv node
// namespace (nsenter --net, so /sys/fs/bpf stays visible) and checks it from
// the outside: its HTTP endpoints, the pinned maps and real traffic.
package agent_test

import (
	"context"
	"fmt"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"sync"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/underpass-cni/underpass/internal/attach"
	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
	"github.com/underpass-cni/underpass/internal/testutil"
	"github.com/underpass-cni/underpass/test/netenv"
)

var (
	agentBin   string // underpassd
	upgradeBin string // underpassd built with -tags underpass_upgradetest
)

func TestMain(m *testing.M) {
	testutil.Main(m, "test/agent", func(tmp string) error {
		// In the kernel-matrix VMs there is no Go toolchain: both binaries
		// come prebuilt in one directory (make test-kernels).
		if dir := os.Getenv("UNDERPASS_AGENT_BINS"); dir != "" {
			agentBin, upgradeBin = filepath.Join(dir, "underpassd"), filepath.Join(dir, "underpassd-upgrade")
			return nil
		}
		agentBin, upgradeBin = filepath.Join(tmp, "underpassd"), filepath.Join(tmp, "underpassd-upgrade")
		if err := testutil.BuildAgent(agentBin); err != nil {
			return err
		}
		return testutil.BuildAgent(upgradeBin, "underpass_upgradetest")
	})
}

// metricsAddr is where every test's agent listens: each lab has its own
// node netns and so its own loopback.
const metricsAddr = "127.0.0.1:9775"

// lab is a netenv with a pin directory and a config file for the agent.
type lab struct {
	*netenv.Env
	t      testing.TB
	dir    string // bpffs pin dir
	cfg    string // config path
	client *http.Client

	gcInterval string // default 1s, so GC tests are quick

	dpOnce sync.Once
	dp     *loader.Objects
}

func newLab(t testing.TB, opts netenv.Options) *lab {
	t.Helper()
	testutil.RequireRoot(t)
	env := netenv.New(t, opts)
	l := &lab{
		Env: env,
		t:   t,
		dir: filepath.Join(testutil.MountBPFFS(t), "underpass"),
		cfg: filepath.Join(t.TempDir(), "underpass.yaml"),
	}
	// Sockets made inside the node netns reach the agent's loopback.
	l.client = testutil.NetnsHTTPClient(env.Node.Do, 5*time.Second)
	t.Cleanup(func() { l.client.CloseIdleConnections() })
	return l
}

// writeConfig writes the agent config atomically (as a ConfigMap update or
// an editor's rename would), with bpffs and metrics.listen filled in.
func (l *lab) writeConfig(body string) {
	l.t.Helper()
	gc := l.gcInterval
	if gc == "" {
		gc = "1s"
	}
	full := fmt.Sprintf("bpffs: %s\nmetrics: {listen: %q}\ngcInterval: %s\n%s", l.dir, metricsAddr, gc, body)
	tmp := l.cfg + ".tmp"
	if err := os.WriteFile(tmp, []byte(full), 0o644); err != nil {
		l.t.Fatal(err)
	}
	if err := os.Rename(tmp, l.cfg); err != nil {
		l.t.Fatal(err)
	}
}

// agent is one running underpassd.
type agent struct {
	*testutil.Agent
	l *lab
}

// start runs bin in the node netns with the lab's config and debug logs.
// The agent is killed when the test ends (if still running) and its log is
// printed if the test failed.
func (l *lab) start(bin string, args ...string) *agent {
	l.t.Helper()
	return l.startArgs(bin, append([]string{"--config", l.cfg, "--log-level", "debug"}, args...)...)
}

// startArgs is start with exactly args.
func (l *lab) startArgs(bin string, args ...string) *agent {
	l.t.Helper()
	name := fmt.Sprintf("underpassd (%s)", filepath.Base(bin))
	return &agent{Agent: testutil.StartAgent(l.t, name, l.Node.Command(context.Background(), bin, args...), 0), l: l}
}

// stop sends SIGTERM and waits for a clean exit.
func (a *agent) stop() {
	a.l.t.Helper()
	if !a.Terminate(10 * time.Second) {
		a.l.t.Fatalf("underpassd did not stop on SIGTERM")
	}
	if err := a.Err(); err != nil {
		a.l.t.Fatalf("underpassd exited with %v:\n%s", err, a.Out.String())
	}
}

// wait waits for the agent to exit by itself and returns its error.
func (a *agent) wait(timeout time.Duration) error {
	a.l.t.Helper()
	select {
	case <-a.Done():
		return a.Err()
	case <-time.After(timeout):
		a.l.t.Fatalf("underpassd still running after %s", timeout)
		return nil
	}
}

func (l *lab) get(path string) (int, string, error) {
	return testutil.HTTPGet(l.client, "http://"+metricsAddr+path)
}

// waitReady waits for /readyz to say ok.
func (a *agent) waitReady() time.Duration {
	a.l.t.Helper()
	return a.WaitReady(a.l.t, a.l.get, 60*time.Second)
}

// metric returns the value of one series from /metrics (labels as written
// in the exposition, e.g. `result="error"`), or -1 if absent.
func (l *lab) metric(name, labels string) float64 {
	l.t.Helper()
	code, body, err := l.get("/metrics")
	if err != nil || code != http.StatusOK {
		l.t.Fatalf("scrape /metrics: %d %v", code, err)
	}
	series := name
	if labels != "" {
		series += "{" + labels + "}"
	}
	v, found, err := testutil.SeriesValue(body, series)
	if !found {
		return -1
	}
	if err != nil {
		l.t.Fatalf("metric %s: %v", series, err)
	}
	return v
}

func (l *lab) waitMetric(name, labels string, want float64) {
	l.t.Helper()
	waitFor(l.t, 15*time.Second, fmt.Sprintf("%s{%s} == %v", name, labels, want), func() bool {
		return l.metric(name, labels) == want
	})
}

// open opens the pinned datapath as the CNI plugin does.
func (l *lab) open() *loader.Objects {
	l.t.Helper()
	dp, err := loader.Open(l.dir)
	if err != nil {
		l.t.Fatal(err)
	}
	l.t.Cleanup(func() { dp.Close() })
	return dp
}

// register registers a container's endpoint the way the CNI plugin does.
func (l *lab) register(dp *loader.Objects, c *netenv.Container, id string) uint32 {
	l.t.Helper()
	var addrs []netip.Prefix
	for _, p := range []netip.Prefix{c.IP4, c.IP6} {
		if p.IsValid() {
			addrs = append(addrs, p)
		}
	}
	epID, err := datapath.Register(&dp.Maps, datapath.Endpoint{
		ContainerID: id, IfName: c.IfName, Netns: c.Path,
		ParentIfindex: c.ParentIndex, ParentName: c.Parent, Ifindex: c.Index,
		Mode: loader.ModeMacvlan, MAC: c.MAC, Addrs: addrs,
		PodName: id, PodNamespace: "test",
	})
	if err != nil {
		l.t.Fatal(err)
	}
	return epID
}

// parentLink returns the pinned tcx link of the parent program on ifindex.
func (l *lab) parentLink(ifindex int) (*link.Info, bool) {
	for _, att := range mustAttachments(l.t, l.dir) {
		if att.Role == attach.RoleParent && att.Ifindex == ifindex {
			lk, err := link.LoadPinnedLink(att.Pin, nil)
			if err != nil {
				return nil, false
			}
			defer lk.Close()
			info, err := lk.Info()
			if err != nil {
				return nil, false
			}
			return info, true
		}
	}
	return nil, false
}

func (l *lab) waitParentAttached(ifindex int) *link.Info {
	l.t.Helper()
	var info *link.Info
	waitFor(l.t, 10*time.Second, fmt.Sprintf("parent program on ifindex %d", ifindex), func() bool {
		var ok bool
		info, ok = l.parentLink(ifindex)
		return ok
	})
	return info
}

func mustAttachments(t testing.TB, dir string) []attach.Attachment {
	t.Helper()
	atts, err := attach.List(dir)
	if err != nil {
		t.Fatal(err)
	}
	return atts
}

// tcxPrograms lists the program IDs attached to ifindex's tcx egress in ns.
func tcxPrograms(t *testing.T, ns *netenv.NS, ifindex int) []uint32 {
	t.Helper()
	var ids []uint32
	err := ns.Do(func() error {
		res, err := link.QueryPrograms(link.QueryOptions{Target: ifindex, Attach: ebpf.AttachTCXEgress})
		if err != nil {
			return err
		}
		for _, p := range res.Programs {
			ids = append(ids, uint32(p.ID))
		}
		return nil
	})
	if err != nil {
		t.Fatalf("query tcx programs: %v", err)
	}
	return ids
}

var logKey = regexp.MustCompile(`level=ERROR msg="config rejected[^\n]*`)

// rejections returns the agent's "config rejected" log lines.
func (a *agent) rejections() []string {
	return logKey.FindAllString(a.Out.String(), -1)
}

// openOnce is open, shared by the helpers that poll the maps.
func (l *lab) openOnce() *loader.Objects {
	l.dpOnce.Do(func() { l.dp = l.open() })
	return l.dp
}

var must = testutil.Must

var waitFor = testutil.WaitFor
