//go:build linux

package demo_test

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/underpass-cni/underpass/internal/testutil"
	"github.com/underpass-cni/underpass/test/demo"
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
	for _, tool := range []string{"make", "nsenter", "go"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("the demo needs %s: %v", tool, err)
		}
	}
	if left := demo.Leftovers(); len(left) > 0 {
		t.Fatalf("a demo is running or left things behind (sudo make demo ... --cleanup, or stop it): %v", left)
	}
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	bin := t.TempDir()
	hostLinks := linkNames(t)
	t.Cleanup(func() {
		// Whatever happened, leave the machine clean for the next test.
		if len(demo.Leftovers()) > 0 {
			out, _ := exec.Command(filepath.Join(bin, "demo", "underpass-demo"), "--bin", bin, "--cleanup").CombinedOutput()
			t.Logf("cleanup after the test:\n%s", out)
		}
	})
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

	t.Run("make demo", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, "make", "--no-print-directory", "demo", "BIN="+bin)
		cmd.Dir = root
		cmd.Env = append(os.Environ(), "DEMO_ONCE=1")
		out, err := cmd.CombinedOutput()
		t.Logf("make demo:\n%s", out)
		if err != nil {
			t.Fatalf("make demo: %v", err)
		}
		checkOutput(t, string(out), wantSteps, wantCleanup)
		assertClean(t)
	})
	demoBin := filepath.Join(bin, "demo", "underpass-demo")
	if _, err := os.Stat(demoBin); err != nil {
		t.Fatalf("make demo did not build %s", demoBin)
	}
	cniPath := hostLocalDir(t, root)

	t.Run("Ctrl-C", func(t *testing.T) {
		d := startDemo(t, demoBin, bin, cniPath)
		d.waitFor(t, "Press Ctrl-C")
		// As the terminal does: the demo's process group (the agent has
		// its own, so the demo stops it in order).
		if err := syscall.Kill(-d.cmd.Process.Pid, syscall.SIGINT); err != nil {
			t.Fatal(err)
		}
		if err := d.wait(t, time.Minute); err != nil {
			t.Fatalf("demo after Ctrl-C: %v\n%s", err, d.out.String())
		}
		checkOutput(t, d.out.String(), wantSteps, wantCleanup)
		assertClean(t)
	})

	t.Run("after kill -9", func(t *testing.T) {
		d := startDemo(t, demoBin, bin, cniPath)
		d.waitFor(t, "Press Ctrl-C")
		if err := d.cmd.Process.Kill(); err != nil {
			t.Fatal(err)
		}
		_ = d.wait(t, time.Minute)
		// A crash leaves the namespaces, pins and state behind (the agent
		// itself goes with its parent: Pdeathsig).
		if left := demo.Leftovers(); len(left) == 0 {
			t.Fatal("kill -9 left nothing behind: the recovery path is not exercised")
		} else {
			t.Logf("left by kill -9: %v", left)
		}

		d = startDemo(t, demoBin, bin, cniPath, "DEMO_ONCE=1")
		if err := d.wait(t, 2*time.Minute); err != nil {
			t.Fatalf("demo after a crash: %v\n%s", err, d.out.String())
		}
		checkOutput(t, d.out.String(), append([]string{
			`── Leftovers of an earlier run`,
			`✓ delete namespaces underpass-demo-node underpass-demo-pod-a underpass-demo-pod-b underpass-demo-wire`,
			`✓ remove pins /sys/fs/bpf/underpass-demo`,
			`✓ nothing left behind`,
		}, wantSteps...), wantCleanup)
		assertClean(t)
	})
}

// checkOutput checks that out has every pattern of each list in order and
// no failed step.
func checkOutput(t *testing.T, out string, lists ...[]string) {
	t.Helper()
	rest := out
	for _, list := range lists {
		for _, p := range list {
			loc := regexp.MustCompile(p).FindStringIndex(rest)
			if loc == nil {
				t.Errorf("the demo's output lacks (in order) %q", p)
				continue
			}
			rest = rest[loc[1]:]
		}
	}
	for l := range strings.SplitSeq(out, "\n") {
		if strings.Contains(l, "✗") {
			t.Errorf("failed step: %s", strings.TrimSpace(l))
		}
	}
	if t.Failed() {
		t.Logf("demo output:\n%s", out)
	}
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

type runningDemo struct {
	cmd  *exec.Cmd
	out  *testutil.SyncBuffer
	done chan error
}

func startDemo(t *testing.T, demoBin, bin, cniPath string, env ...string) *runningDemo {
	t.Helper()
	d := &runningDemo{out: &testutil.SyncBuffer{}, done: make(chan error, 1)}
	d.cmd = exec.Command(demoBin, "--bin", bin, "--cni-path", cniPath)
	d.cmd.Env = slices.DeleteFunc(os.Environ(), func(s string) bool { return strings.HasPrefix(s, "DEMO_ONCE=") })
	d.cmd.Env = append(d.cmd.Env, env...)
	d.cmd.Stdout, d.cmd.Stderr = d.out, d.out
	d.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { d.done <- d.cmd.Wait() }()
	t.Cleanup(func() {
		_ = d.cmd.Process.Kill()
		<-d.done
		d.done <- nil
	})
	return d
}

// waitFor waits until the output contains s (at most a minute).
func (d *runningDemo) waitFor(t *testing.T, s string) {
	t.Helper()
	deadline := time.After(time.Minute)
	for !strings.Contains(d.out.String(), s) {
		select {
		case err := <-d.done:
			d.done <- err
			t.Fatalf("the demo exited (%v) before printing %q:\n%s", err, s, d.out.String())
		case <-deadline:
			t.Fatalf("no %q after a minute:\n%s", s, d.out.String())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func (d *runningDemo) wait(t *testing.T, timeout time.Duration) error {
	t.Helper()
	select {
	case err := <-d.done:
		d.done <- err
		return err
	case <-time.After(timeout):
		t.Fatalf("the demo did not exit within %s:\n%s", timeout, d.out.String())
		return nil
	}
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
