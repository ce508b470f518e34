package adopt

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/underpass-cni/underpass/internal/attach"
	"github.com/underpass-cni/underpass/internal/testutil"
	"golang.org/x/sys/unix"
)

func TestConmonName(t *testing.T) {
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"/usr/bin/conmon", "--api-version", "1", "-c", "f763a7", "-u", "f763a7", "-r", "/usr/bin/runc", "-n", "web-1", "--exit-dir", "/x"}, "web-1"},
		{[]string{"conmon", "--name", "web-2"}, "web-2"},
		{[]string{"conmon", "--name=web-3", "-n", "other"}, "web-3"},
		{[]string{"conmon", "-c", "id"}, ""},
		{[]string{"conmon", "-n"}, ""},
		{[]string{"conmon", "-n", strings.Repeat("x", 128)}, ""},
	} {
		if got := conmonName(c.args); got != c.want {
			t.Errorf("conmonName(%q) = %q, want %q", c.args, got, c.want)
		}
	}
}

func TestPodmanNameNotConmon(t *testing.T) {
	// This test's own process: its parent is go test, not conmon.
	if n := PodmanName(os.Getpid()); n != "" {
		t.Errorf("PodmanName(own pid) = %q, want none", n)
	}
	if n := PodmanName(0); n != "" {
		t.Errorf("PodmanName(0) = %q", n)
	}
}

// A Podman container's name is found whatever else runs in its namespace:
// a process that entered it (`ip netns exec`, nsenter, a test's ping) is as
// much a process in it as the container's, and may have the lower pid, or
// come first in /proc's name order (10000 before 9999). Taking the first
// one renamed the endpoint to its pin's name, and registering it again
// under that name zeroed its counters (TestPodmanNetavark failed in CI).
func TestNamePodmanAmongOtherProcesses(t *testing.T) {
	testutil.RequireRoot(t)
	// A stand-in conmon: a shell named conmon with conmon's -n argument,
	// whose child runs in a namespace of its own, as a container's first
	// process does.
	dir := t.TempDir()
	conmon := filepath.Join(dir, "conmon")
	testutil.Must(t, os.Symlink("/bin/sh", conmon))
	cmd := exec.Command(conmon, "-c", "unshare -n sleep 600 & wait", "conmon", "-n", "web-9")
	testutil.Must(t, cmd.Start())
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	var container int
	testutil.WaitFor(t, 5*time.Second, "the container's process in a netns of its own", func() bool {
		container = childInOwnNetns(t, cmd.Process.Pid)
		return container > 0
	})
	// Runs before the shell's cleanup: the container's process is ended
	// first, and reaped by the shell's `wait`, which then returns.
	t.Cleanup(func() { unix.Kill(container, unix.SIGKILL); cmd.Wait() })
	// An intruder: a process that entered the container's namespace.
	intruder := exec.Command("nsenter", "-t", strconv.Itoa(container), "-n", "sleep", "600")
	testutil.Must(t, intruder.Start())
	t.Cleanup(func() { intruder.Process.Kill(); intruder.Wait() })
	ns := filepath.Join("/proc", strconv.Itoa(container), "ns", "net")
	testutil.WaitFor(t, 5*time.Second, "the intruder in the container's netns", func() bool {
		id, err := attach.NetnsID(filepath.Join("/proc", strconv.Itoa(intruder.Process.Pid), "ns", "net"))
		want, _ := attach.NetnsID(ns)
		return err == nil && id == want
	})

	id, err := attach.NetnsID(ns)
	testutil.Must(t, err)
	self, err := attach.NetnsID("/proc/self/ns/net")
	testutil.Must(t, err)
	var found *foundNS
	for _, n := range namespaces(nil, self) {
		if n.id == id {
			found = &n
		}
	}
	if found == nil {
		t.Fatal("the scan did not list the container's namespace")
	}
	if !slices.Contains(found.pids, container) || !slices.Contains(found.pids, intruder.Process.Pid) || !slices.IsSorted(found.pids) {
		t.Errorf("the scan lists pids %v in the container's namespace, want %d and %d among them, lowest first", found.pids, container, intruder.Process.Pid)
	}
	for _, pids := range [][]int{{intruder.Process.Pid, container}, {container, intruder.Process.Pid}} {
		if n := Name(&Slave{Netns: ns, Pids: pids}); n != "web-9" {
			t.Errorf("Name with pids %v (intruder %d, container %d) = %q, want web-9", pids, intruder.Process.Pid, container, n)
		}
	}
}

// childInOwnNetns is a child of parent in a network namespace other than
// the caller's, or 0.
func childInOwnNetns(t *testing.T, parent int) int {
	self, err := attach.NetnsID("/proc/self/ns/net")
	testutil.Must(t, err)
	for _, pid := range procPids() {
		stat, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
		if err != nil {
			continue
		}
		f := strings.Fields(string(stat[bytes.LastIndexByte(stat, ')')+1:]))
		if len(f) < 2 || f[1] != strconv.Itoa(parent) {
			continue
		}
		if id, err := attach.NetnsID(filepath.Join("/proc", strconv.Itoa(pid), "ns", "net")); err == nil && id != self {
			return pid
		}
	}
	return 0
}
