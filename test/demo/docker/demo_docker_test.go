//go:build linux

package docker_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/underpass-cni/underpass/internal/testutil"
	dd "github.com/underpass-cni/underpass/test/demo/docker"
	"github.com/underpass-cni/underpass/test/demo/kit"
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
	keyBefore := kit.Exists(dd.TrustKey)
	root, err := filepath.Abs("../../..")
	if err != nil {
		t.Fatal(err)
	}
	bin := t.TempDir()
	demoBin := filepath.Join(bin, "demo", "underpass-demo-docker")
	kit.Prepare(t, "the Docker demo needs %s (make deps installs it)",
		"a Docker demo is running or left things behind (bin/demo/underpass-demo-docker --cleanup, or stop it)",
		dd.Leftovers, demoBin, bin, "make", "nsenter", "go", "/usr/sbin/dockerd", "/usr/bin/docker", "/bin/busybox")
	assertClean := func(t *testing.T) {
		t.Helper()
		if left := dd.Leftovers(); len(left) > 0 {
			t.Errorf("left behind: %v", left)
		}
		if !keyBefore && kit.Exists(dd.TrustKey) {
			t.Errorf("%s left behind", dd.TrustKey)
		}
	}

	kit.MakeDemo(t, root, "demo-docker", bin, demoBin, func(t *testing.T, out string) {
		kit.CheckOutput(t, out, wantSteps, wantCleanup)
		assertClean(t)
	}, "DEMO_WAIT=")

	// kill -9 in the middle of the scene leaves things behind (dockerd
	// goes with the demo: Pdeathsig); the next run removes them first, and
	// is itself stopped with Ctrl-C at the same point.
	t.Run("after kill -9, then Ctrl-C", func(t *testing.T) {
		d := kit.Start(t, nil, demoBin, "--bin", bin)
		d.Crash(t, "── 5.", dd.Leftovers)
		// The containers' IDs, to check below that none of their
		// processes or cgroups outlived the recovery.
		ids := dd.ContainerIDs()
		if len(ids) == 0 {
			t.Errorf("no containers in %s after kill -9", dd.ContainersDir)
		}
		t.Cleanup(func() { checkContainersGone(t, ids) })

		d = kit.Start(t, nil, demoBin, "--bin", bin)
		d.WaitFor(t, "── 5.")
		// As the terminal does: the demo's process group (dockerd and the
		// agent have their own, so the demo stops them in order).
		d.Interrupt(t)
		if err := d.Wait(t, time.Minute); err == nil {
			t.Errorf("the demo exited 0 after Ctrl-C, want non-zero (it did not finish)")
		}
		kit.CheckOutput(t, d.Out.String(), []string{
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
