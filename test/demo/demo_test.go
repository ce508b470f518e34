//go:build linux

package demo_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/underpass-cni/underpass/internal/testutil"
	"github.com/underpass-cni/underpass/test/demo"
	"github.com/underpass-cni/underpass/test/demo/kit"
)

// The lines a working demo prints, in order.
var wantSteps = []string{
	`✓ underpass-demo-wire: bridge br0 is the switch and the gateway 192\.0\.2\.1/24`,
	`✓ underpass-demo-node: eth0 192\.0\.2\.2/24 is the parent NIC`,
	`✓ the node answers the live service 10\.96\.0\.10:80`,
	`✓ underpassd \(pid \d+\) loaded the datapath, pinned in /sys/fs/bpf/underpass-demo`,
	`✓ pod-a: eth0 192\.0\.2\.(1[0-9][0-9]|200)/24`,
	`✓ pod-b: eth0 192\.0\.2\.(1[0-9][0-9]|200)/24`,
	`✓ ping pod-a -> the node \(192\.0\.2\.2\): 3/3 replies`,
	`✓ ping the node -> pod-a \(192\.0\.2\.\d+\): 3/3 replies`,
	`✓ ping pod-b -> the node \(192\.0\.2\.2\): 3/3 replies`,
	`✓ ping pod-a -> pod-b \(192\.0\.2\.\d+\): 3/3 replies`,
	`✓ ping pod-b -> pod-a \(192\.0\.2\.\d+\): 3/3 replies`,
	`✓ live service 10\.96\.0\.10:80 from pod-a: "hello from the node`,
	`✓ deleted service 10\.96\.0\.99:80 from pod-a: dropped at the node \(connect timed out .*the gateway saw nothing, underpass_stale_service_packets_total\{action="dropped"\} \+[1-9][0-9]*\)`,
	`✓ config changed to staleServices\.action: reject; underpassd reloaded it live`,
	`✓ deleted service 10\.96\.0\.99:80 from pod-a: connection refused after .*underpass_stale_service_packets_total\{action="rejected"\} \+1\)`,
	`✓ underpassctl .*stats`,
	`✓ http://127\.0\.0\.1:9775/metrics \(inside the node netns\) answers 200`,
	`All \d+ steps passed\.`,
	`Demo ready after`,
}

// The lines of a complete cleanup after a run that got as far as the pods.
var wantCleanup = []string{
	`── Cleanup`,
	`✓ CNI DEL pod-a`,
	`✓ CNI DEL pod-b`,
	`✓ stop underpassd \(pid \d+\)`,
	`✓ underpassd --uninstall`,
	`✓ delete namespaces underpass-demo-node underpass-demo-pod-a underpass-demo-pod-b underpass-demo-wire`,
	`✓ remove /run/underpass-demo`,
	`✓ nothing left behind`,
}

// TestDemo runs `make demo` as a user would (DEMO_ONCE=1), then the demo
// binary it built twice more: stopped with Ctrl-C (SIGINT), and killed with
// SIGKILL, after which the next run must clean up the leftovers first. After
// each, nothing of the demo may be left: namespaces, host links, pins, the
// state directory, lock files or processes.
func TestDemo(t *testing.T) {
	testutil.RequireRoot(t)
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	bin := t.TempDir()
	demoBin := filepath.Join(bin, "demo", "underpass-demo")
	kit.Prepare(t, "the demo needs %s", "a demo is running or left things behind (sudo make demo ... --cleanup, or stop it)",
		demo.Leftovers, demoBin, bin, "make", "nsenter", "go")
	hostLinks := linkNames(t)
	assertClean := func(t *testing.T) {
		t.Helper()
		if left := demo.Leftovers(); len(left) > 0 {
			t.Errorf("left behind: %v", left)
		}
		// The demo creates every link inside its namespaces; other tests
		// may add host links meanwhile, so only names the demo uses count.
		for _, l := range linkNames(t) {
			if !slices.Contains(hostLinks, l) && (l == "br0" || l == "node0" || strings.Contains(l, "demo")) {
				t.Errorf("host link %s appeared during the demo", l)
			}
		}
	}

	kit.MakeDemo(t, root, "demo", bin, demoBin, func(t *testing.T, out string) {
		kit.CheckOutput(t, out, wantSteps, wantCleanup)
		assertClean(t)
	}, "DEMO_ONCE=1")
	cniPath := hostLocalDir(t, root)

	t.Run("Ctrl-C", func(t *testing.T) {
		d := startDemo(t, demoBin, bin, cniPath)
		d.WaitFor(t, "Press Ctrl-C")
		// As the terminal does: the demo's process group (the agent has
		// its own, so the demo stops it in order).
		d.Interrupt(t)
		if err := d.Wait(t, time.Minute); err != nil {
			t.Fatalf("demo after Ctrl-C: %v\n%s", err, d.Out.String())
		}
		kit.CheckOutput(t, d.Out.String(), wantSteps, wantCleanup)
		assertClean(t)
	})

	t.Run("after kill -9", func(t *testing.T) {
		d := startDemo(t, demoBin, bin, cniPath)
		// A crash leaves the namespaces, pins and state behind (the agent
		// itself goes with its parent: Pdeathsig).
		d.Crash(t, "Press Ctrl-C", demo.Leftovers)

		d = startDemo(t, demoBin, bin, cniPath, "DEMO_ONCE=1")
		if err := d.Wait(t, 2*time.Minute); err != nil {
			t.Fatalf("demo after a crash: %v\n%s", err, d.Out.String())
		}
		kit.CheckOutput(t, d.Out.String(), append([]string{
			`── Leftovers of an earlier run`,
			`✓ delete namespaces underpass-demo-node underpass-demo-pod-a underpass-demo-pod-b underpass-demo-wire`,
			`✓ remove pins /sys/fs/bpf/underpass-demo`,
			`✓ nothing left behind`,
		}, wantSteps...), wantCleanup)
		assertClean(t)
	})
}

// hostLocalDir is where make demo put the host-local plugin.
func hostLocalDir(t *testing.T, root string) string {
	t.Helper()
	cmd := exec.Command("go", "list", "-m", "-f", "{{.Version}}", "github.com/containernetworking/plugins")
	cmd.Dir = root
	v, err := cmd.Output()
	if err != nil {
		t.Fatal(err)
	}
	home, err := os.UserHomeDir()
	if err != nil {
		t.Fatal(err)
	}
	return filepath.Join(home, ".cache", "underpass", "cni-plugins-"+strings.TrimSpace(string(v)))
}

// startDemo runs the demo binary the way make demo does, with env added
// to the test's environment but for DEMO_ONCE.
func startDemo(t *testing.T, demoBin, bin, cniPath string, env ...string) *kit.Running {
	t.Helper()
	e := slices.DeleteFunc(os.Environ(), func(s string) bool { return strings.HasPrefix(s, "DEMO_ONCE=") })
	return kit.Start(t, append(e, env...), demoBin, "--bin", bin, "--cni-path", cniPath)
}

// linkNames lists the host netns's links, sorted.
func linkNames(t *testing.T) []string {
	t.Helper()
	links, err := netlink.LinkList()
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, l := range links {
		out = append(out, l.Attrs().Name)
	}
	slices.Sort(out)
	return out
}
