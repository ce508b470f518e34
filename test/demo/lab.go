//go:build linux

// Package demo holds what `make demo` (test/demo/cmd/demo) and its test
// share: the fixed names of everything the demo creates, its network
// namespaces (test/netenv's NS under those names), probes, and the leftover
// scan that both the demo's start-up cleanup and the test use.
//
// Every name is fixed (not per run), so a run after a crash, a kill -9 or a
// power cut finds and removes what the previous one left: namespaces named
// Prefix*, the pin directory BPFFS, the state directory StateDir and any
// process started with a path inside StateDir.
package demo

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"

	"github.com/vishvananda/netns"

	"github.com/underpass-cni/underpass/test/netenv"
)

// Fixed names of everything the demo creates.
const (
	// Prefix starts the name of every network namespace of the demo.
	Prefix = "underpass-demo-"
	// NetnsDir is where named namespaces live (as with `ip netns add`).
	NetnsDir = "/run/netns"
	// BPFFS is the demo agent's pin directory (config key bpffs), next to
	// but apart from a real install's /sys/fs/bpf/underpass.
	BPFFS = "/sys/fs/bpf/underpass-demo"
	// StateDir holds the agent config and log, the CNI conflist, host-local
	// leases, the CNI cache and the pid file. Every process the demo starts
	// has a path inside it on its command line, which is how leftovers are
	// found.
	StateDir = "/run/underpass-demo"
	// LockFile is held (flock) by a running demo; it holds its pid.
	LockFile = "/run/underpass-demo.lock"
	// MetricsAddr is the agent's metrics.listen inside the node netns.
	MetricsAddr = "127.0.0.1:9775"
	// AgentLockDir is where underpassd keeps its per-pin-directory lock
	// files (internal/agent.LockDir); the demo removes its agent's one.
	AgentLockDir = "/run/underpass"
)

// NS is a named network namespace: test/netenv's, with Name Prefix + a
// short name and Path NetnsDir/Name (for nsenter --net= and CNI_NETNS).
type NS = netenv.NS

// CreateNS creates the named namespace Prefix+short with lo up. The new
// namespace is entered on a throw-away locked thread that is never unlocked:
// Go ends such a thread with its goroutine, so no thread of the program is
// ever left in the wrong namespace.
func CreateNS(short string) (*NS, error) {
	name := Prefix + short
	if err := os.MkdirAll(NetnsDir, 0o755); err != nil {
		return nil, err
	}
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with the goroutine
		h, err := netns.NewNamed(name)
		if err == nil {
			h.Close()
		}
		errc <- err
	}()
	if err := <-errc; err != nil {
		if !errors.Is(err, os.ErrExist) {
			_ = DeleteNS(name)
		}
		return nil, fmt.Errorf("create netns %s: %w", name, err)
	}
	n, err := netenv.OpenNS(name, filepath.Join(NetnsDir, name))
	if err != nil {
		_ = DeleteNS(name)
		return nil, err
	}
	if err := n.SetUp("lo"); err != nil {
		n.Close()
		_ = DeleteNS(name)
		return nil, fmt.Errorf("set lo up in %s: %w", name, err)
	}
	return n, nil
}

// DeleteNS removes a named namespace of the demo (name with or without
// Prefix). The kernel destroys it, and every interface in it, once nothing
// else holds it.
func DeleteNS(name string) error {
	if !strings.HasPrefix(name, Prefix) {
		name = Prefix + name
	}
	return netenv.DeleteNSPath(filepath.Join(NetnsDir, name))
}

// Namespaces lists the demo's namespaces (full names).
func Namespaces() ([]string, error) {
	entries, err := os.ReadDir(NetnsDir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), Prefix) {
			out = append(out, e.Name())
		}
	}
	return out, nil
}

// Processes returns the pids of processes (other than the caller) whose
// command line names a path inside StateDir: the demo's agent and anything
// else it started.
func Processes() []int {
	entries, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		if bytes.Contains(b, []byte(StateDir+"/")) {
			out = append(out, pid)
		}
	}
	return out
}

// AgentLockFile is the lock file underpassd keeps for the demo's pin
// directory: internal/agent names it after a hash of the directory
// (underpassd-<first 8 bytes of sha256, hex>.lock) and leaves it in place
// when it exits (flock, not the file, is the lock).
func AgentLockFile() string {
	sum := sha256.Sum256([]byte(filepath.Clean(BPFFS)))
	return filepath.Join(AgentLockDir, fmt.Sprintf("underpassd-%x.lock", sum[:8]))
}

// Leftovers describes everything of the demo that exists now: namespaces,
// the pin directory, the state directory and processes. Empty means clean.
func Leftovers() []string {
	var out []string
	names, err := Namespaces()
	if err != nil {
		out = append(out, fmt.Sprintf("cannot list %s: %v", NetnsDir, err))
	}
	for _, n := range names {
		out = append(out, "netns "+n)
	}
	for _, p := range []string{BPFFS, StateDir, LockFile, AgentLockFile()} {
		if _, err := os.Lstat(p); err == nil {
			out = append(out, p)
		}
	}
	for _, pid := range Processes() {
		cmd, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		out = append(out, fmt.Sprintf("process %d: %s", pid, strings.TrimSpace(string(bytes.ReplaceAll(cmd, []byte{0}, []byte{' '})))))
	}
	return out
}
