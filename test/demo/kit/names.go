//go:build linux

// Package kit is what `make demo` (test/demo/cmd/demo) and `make
// demo-docker` (test/demo/docker/cmd/demo-docker) share, parameterised by
// each demo's Names: the narrated step runner (Narrator, RunScene), the
// lab of a wire and a node namespace (BuildLab), starting, stopping and
// uninstalling underpassd (StartAgent, StopProcess, UninstallAgent), the
// scan for what a run left behind and the cleanup primitives (Leftovers,
// Report, DeleteNamespaces, RemovePins), the probes (Ping, Dial, Serve),
// and the harness their tests use to run a demo through make and check its
// output (Make, Start, CheckOutput).
//
// It is ordinary code, not a test: the demos are commands.
package kit

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/vishvananda/netns"

	"github.com/underpass-cni/underpass/internal/testutil"
	"github.com/underpass-cni/underpass/test/netenv"
)

const (
	// NetnsDir is where named namespaces live (as with `ip netns add`).
	NetnsDir = "/run/netns"
	// AgentLockDir is where underpassd keeps its per-pin-directory lock
	// files (internal/agent.LockDir); a demo removes its agent's one.
	AgentLockDir = "/run/underpass"
)

// NewNames are a demo's Names, in NetnsDir and AgentLockDir.
func NewNames(prefix, bpffs, stateDir, lockFile string) Names {
	return Names{Prefix: prefix, NetnsDir: NetnsDir, BPFFS: bpffs, StateDir: stateDir, LockFile: lockFile, AgentLockDir: AgentLockDir}
}

// Names are the fixed names of everything one demo creates. They are fixed
// (not per run), so a run after a crash, a kill -9 or a power cut finds and
// removes what the previous one left: namespaces named Prefix*, the pin
// directory BPFFS, the state directory StateDir and any process started
// with a path inside StateDir.
type Names struct {
	// Prefix starts the name of every network namespace of the demo.
	Prefix string
	// NetnsDir is where named namespaces live (as with `ip netns add`).
	NetnsDir string
	// BPFFS is the demo agent's pin directory (config key bpffs).
	BPFFS string
	// StateDir holds the demo's state; every process the demo starts has
	// a path inside it on its command line.
	StateDir string
	// LockFile is held (flock) by a running demo; it holds its pid.
	LockFile string
	// AgentLockDir is where underpassd keeps its per-pin-directory lock
	// files (internal/agent.LockDir).
	AgentLockDir string
}

// CreateNS creates the named namespace Prefix+short with lo up. The new
// namespace is entered on a locked thread that goes back to its own before
// it is unlocked (testutil.OnOwnThread: the main thread, which Go cannot
// end, must not stay in it), so no thread of the program is ever left in
// the wrong namespace.
func (n Names) CreateNS(short string) (*netenv.NS, error) {
	name := n.Prefix + short
	if err := os.MkdirAll(n.NetnsDir, 0o755); err != nil {
		return nil, err
	}
	err := testutil.OnOwnThread(func() error {
		h, err := netns.NewNamed(name)
		if err == nil {
			h.Close()
		}
		return err
	})
	if err != nil {
		if !errors.Is(err, os.ErrExist) {
			_ = n.DeleteNS(name)
		}
		return nil, fmt.Errorf("create netns %s: %w", name, err)
	}
	ns, err := netenv.OpenNS(name, filepath.Join(n.NetnsDir, name))
	if err != nil {
		_ = n.DeleteNS(name)
		return nil, err
	}
	if err := ns.SetUp("lo"); err != nil {
		ns.Close()
		_ = n.DeleteNS(name)
		return nil, fmt.Errorf("set lo up in %s: %w", name, err)
	}
	return ns, nil
}

// NSPath is the path of the demo's namespace Prefix+short.
func (n Names) NSPath(short string) string {
	return filepath.Join(n.NetnsDir, n.Prefix+short)
}

// DeleteNS removes a named namespace of the demo (name with or without
// Prefix). The kernel destroys it, and every interface in it, once nothing
// else holds it.
func (n Names) DeleteNS(name string) error {
	if !strings.HasPrefix(name, n.Prefix) {
		name = n.Prefix + name
	}
	return netenv.DeleteNSPath(filepath.Join(n.NetnsDir, name))
}

// Namespaces lists the demo's namespaces (full names).
func (n Names) Namespaces() ([]string, error) {
	entries, err := os.ReadDir(n.NetnsDir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), n.Prefix) {
			out = append(out, e.Name())
		}
	}
	return out, nil
}

// Processes returns the pids of processes (other than the caller) whose
// command line names a path inside StateDir, oldest (lowest pid) first.
func (n Names) Processes() []int {
	var out []int
	for _, pid := range Pids() {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err == nil && bytes.Contains(b, []byte(n.StateDir+"/")) {
			out = append(out, pid)
		}
	}
	return out
}

// Pids are the processes but the caller, in ascending order.
func Pids() []int {
	entries, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range entries {
		if pid, err := strconv.Atoi(e.Name()); err == nil && pid != os.Getpid() {
			out = append(out, pid)
		}
	}
	slices.Sort(out)
	return out
}

// AgentLockFile is the lock file underpassd keeps for the demo's pin
// directory: internal/agent names it after a hash of the directory
// (underpassd-<first 8 bytes of sha256, hex>.lock) and leaves it in place
// when it exits (flock, not the file, is the lock).
func (n Names) AgentLockFile() string {
	sum := sha256.Sum256([]byte(filepath.Clean(n.BPFFS)))
	return filepath.Join(n.AgentLockDir, fmt.Sprintf("underpassd-%x.lock", sum[:8]))
}

// Leftovers describes everything of the demo that exists now: namespaces,
// then more (what only this demo makes, such as mounts), the pin
// directory, the state directory, the lock files, and the processes
// (Processes, then morePids). Empty means clean.
func (n Names) Leftovers(more []string, morePids []int) []string {
	var out []string
	names, err := n.Namespaces()
	if err != nil {
		out = append(out, fmt.Sprintf("cannot list %s: %v", n.NetnsDir, err))
	}
	for _, name := range names {
		out = append(out, "netns "+name)
	}
	out = append(out, more...)
	for _, p := range []string{n.BPFFS, n.StateDir, n.LockFile, n.AgentLockFile()} {
		if Exists(p) {
			out = append(out, p)
		}
	}
	for _, pid := range append(n.Processes(), morePids...) {
		cmd, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		out = append(out, fmt.Sprintf("process %d: %s", pid, strings.TrimSpace(string(bytes.ReplaceAll(cmd, []byte{0}, []byte{' '})))))
	}
	return out
}

// Exists says whether p exists (without following a last symlink).
func Exists(p string) bool {
	_, err := os.Lstat(p)
	return err == nil
}
