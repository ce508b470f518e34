//go:build linux

package docker_test

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/underpass-cni/underpass/internal/testutil"
	dd "github.com/underpass-cni/underpass/test/demo/docker"
)

// The lines a working Docker demo prints, in order.
var wantSteps = []string{
	`✓ underpass-dockerdemo-node: eth0 192\.0\.2\.2/24 is the parent NIC`,
	`✓ dockerd \S+ \(pid \d+\) answers on /run/underpass-dockerdemo/docker/docker\.sock`,
	`✓ image underpass-busybox:demo imported from busybox-static`,
	`✓ docker network create -d macvlan -o parent=eth0 --subnet 192\.0\.2\.0/24 --gateway 192\.0\.2\.1 --ip-range 192\.0\.2\.64/28 upmv`,
	`── 3\. The baseline`,
	`✓ docker run --network upmv --name web-1: 192\.0\.2\.(6[4-9]|7[0-9])`,
	`✓ ping the node -> web-1 \(192\.0\.2\.\d+\): 0/2 replies, as expected without underpass`,
	`✓ ping web-1 -> the node \(192\.0\.2\.2\): 0/2 replies, as expected without underpass`,
	`✓ underpassd \(pid \d+\) ready after .*, pins in /sys/fs/bpf/underpass-dockerdemo`,
	`✓ web-1 \(running before the agent\) adopted at its start`,
	`✓ docker run --network upmv --name web-2`,
	`✓ web-2 adopted after docker run returned`,
	`✓ ping the node -> web-1 \(192\.0\.2\.\d+\): 3/3 replies`,
	`✓ ping web-1 -> the node \(192\.0\.2\.2\): 3/3 replies`,
	`✓ ping the node -> web-2 \(192\.0\.2\.\d+\): 3/3 replies`,
	`✓ ping web-2 -> the node \(192\.0\.2\.2\): 3/3 replies`,
	`✓ underpassctl --bpffs /sys/fs/bpf/underpass-dockerdemo endpoints lists web-1 and web-2`,
	`✓ underpassctl --bpffs /sys/fs/bpf/underpass-dockerdemo stats`,
	`✓ /metrics: the series with pod="web-1"`,
	`underpass_host_redirects_total\{direction="host_to_endpoint",.*pod="web-1"\} [1-9]`,
	`✓ /metrics: the series with pod="web-2"`,
	`✓ docker rm -f web-2`,
	`✓ web-2 unregistered after docker rm`,
	`✓ underpassctl endpoints: web-1 only`,
	`── Summary`,
	`All \d+ steps passed`,
}

// The lines of a complete cleanup.
var wantCleanup = []string{
	`── Cleanup`,
	`✓ stop underpassd \(pid \d+\)`,
	`✓ stop dockerd \(pid \d+`,
	`✓ underpassd --uninstall`,
	`✓ delete namespaces underpass-dockerdemo-node underpass-dockerdemo-wire`,
	`✓ remove /run/underpass-dockerdemo`,
	`✓ nothing left behind`,
}

// TestDemoDocker runs `make demo-docker` as a user would, then the binary
// it built killed (SIGKILL) in the middle of the scene, and once more: that
// run removes the leftovers first and is stopped with Ctrl-C (SIGINT) at
// the same point. After each, nothing of the demo may be left: namespaces, mounts,
// pins, the state directory, lock files or processes (dockerd, containerd,
// shims, underpassd).
func TestDemoDocker(t *testing.T) {
	testutil.RequireRoot(t)
	for _, tool := range []string{"make", "nsenter", "go", "/usr/sbin/dockerd", "/usr/bin/docker", "/bin/busybox"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("the Docker demo needs %s (make deps installs it): %v", tool, err)
		}
	}
	if left := dd.Leftovers(); len(left) > 0 {
		t.Fatalf("a Docker demo is running or left things behind (bin/demo/underpass-demo-docker --cleanup, or stop it): %v", left)
	}
	keyBefore := exists(dd.TrustKey)
	root, err := filepath.Abs("../../..")
	if err != nil {
		t.Fatal(err)
	}
	bin := t.TempDir()
	demoBin := filepath.Join(bin, "demo", "underpass-demo-docker")
	t.Cleanup(func() {
		if len(dd.Leftovers()) > 0 {
			out, _ := exec.Command(demoBin, "--bin", bin, "--cleanup").CombinedOutput()
			t.Logf("cleanup after the test:\n%s", out)
		}
	})
	assertClean := func(t *testing.T) {
		t.Helper()
		if left := dd.Leftovers(); len(left) > 0 {
			t.Errorf("left behind: %v", left)
		}
		if !keyBefore && exists(dd.TrustKey) {
			t.Errorf("%s left behind", dd.TrustKey)
		}
	}

	t.Run("make demo-docker", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
		defer cancel()
		start := time.Now()
		cmd := exec.CommandContext(ctx, "make", "--no-print-directory", "demo-docker", "BIN="+bin)
		cmd.Dir = root
		cmd.Env = append(os.Environ(), "DEMO_WAIT=")
		out, err := cmd.CombinedOutput()
		t.Logf("make demo-docker (%s):\n%s", time.Since(start).Round(100*time.Millisecond), out)
		if err != nil {
			t.Fatalf("make demo-docker: %v", err)
		}
		checkOutput(t, string(out), wantSteps, wantCleanup)
		assertClean(t)
	})
	if _, err := os.Stat(demoBin); err != nil {
		t.Fatalf("make demo-docker did not build %s", demoBin)
	}

	// kill -9 in the middle of the scene leaves things behind (dockerd
	// goes with the demo: Pdeathsig); the next run removes them first, and
	// is itself stopped with Ctrl-C at the same point.
	t.Run("after kill -9, then Ctrl-C", func(t *testing.T) {
		d := startDemo(t, demoBin, bin)
		d.waitFor(t, "── 5.")
		if err := d.cmd.Process.Kill(); err != nil {
			t.Fatal(err)
		}
		_ = d.wait(t)
		if left := dd.Leftovers(); len(left) == 0 {
			t.Fatal("kill -9 left nothing behind: the recovery path is not exercised")
		} else {
			t.Logf("left by kill -9: %v", left)
		}
		// The containers' IDs, to check below that none of their
		// processes or cgroups outlived the recovery.
		ids := dd.ContainerIDs()
		if len(ids) == 0 {
			t.Errorf("no containers in %s after kill -9", dd.ContainersDir)
		}
		t.Cleanup(func() { checkContainersGone(t, ids) })

		d = startDemo(t, demoBin, bin)
		d.waitFor(t, "── 5.")
		// As the terminal does: the demo's process group (dockerd and the
		// agent have their own, so the demo stops them in order).
		if err := syscall.Kill(-d.cmd.Process.Pid, syscall.SIGINT); err != nil {
			t.Fatal(err)
		}
		if err := d.wait(t); err == nil {
			t.Errorf("the demo exited 0 after Ctrl-C, want non-zero (it did not finish)")
		}
		checkOutput(t, d.out.String(), []string{
			`── Leftovers of an earlier run`,
			`✓ delete namespaces underpass-dockerdemo-node underpass-dockerdemo-wire`,
			`✓ remove /run/underpass-dockerdemo`,
			`✓ nothing left behind`,
			`── 5\.`,
			`Interrupted\.`,
		}, wantCleanup)
		assertClean(t)
	})
}

// checkContainersGone fails the test for every process or cgroup of the
// containers ids.
func checkContainersGone(t *testing.T, ids []string) {
	t.Helper()
	procs, _ := filepath.Glob("/proc/[0-9]*/cgroup")
	for _, p := range procs {
		b, _ := os.ReadFile(p)
		for _, id := range ids {
			if strings.Contains(string(b), id) {
				cmd, _ := os.ReadFile(filepath.Join(filepath.Dir(p), "cmdline"))
				t.Errorf("a process of container %.12s outlived the demo: %s %q", id, filepath.Dir(p), cmd)
			}
		}
	}
	for _, id := range ids {
		for _, pat := range []string{"/sys/fs/cgroup/*/docker/" + id, "/sys/fs/cgroup/docker/" + id, "/sys/fs/cgroup/*system.slice/docker-" + id + ".scope", "/sys/fs/cgroup/*/system.slice/docker-" + id + ".scope"} {
			m, _ := filepath.Glob(pat)
			for _, c := range m {
				t.Errorf("cgroup left behind: %s", c)
			}
		}
	}
}

type runningDemo struct {
	cmd  *exec.Cmd
	out  *testutil.SyncBuffer
	done chan error
}

func startDemo(t *testing.T, demoBin, bin string) *runningDemo {
	t.Helper()
	d := &runningDemo{out: &testutil.SyncBuffer{}, done: make(chan error, 1)}
	d.cmd = exec.Command(demoBin, "--bin", bin)
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
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// wait waits (at most a minute) for the demo to exit.
func (d *runningDemo) wait(t *testing.T) error {
	t.Helper()
	select {
	case err := <-d.done:
		d.done <- err
		return err
	case <-time.After(time.Minute):
		t.Fatalf("the demo did not exit within a minute:\n%s", d.out.String())
		return nil
	}
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

func exists(p string) bool {
	_, err := os.Lstat(p)
	return err == nil
}
