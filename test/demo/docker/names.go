//go:build linux

// Package docker holds what `make demo-docker` (test/demo/docker/cmd/demo-docker)
// and its test share: the fixed names of everything the Docker demo
// creates and the scan for what is left of it. The names are apart from
// `make demo`'s (test/demo), so neither demo's clean-up ever touches the
// other's.
//
// Every name is fixed (not per run), so a run after a crash finds and
// removes what the previous one left: namespaces named Prefix*, the pin
// directory BPFFS, the state directory StateDir (dockerd's data-root,
// exec-root and socket, the agent's config and log) with any mount below
// it, and every process started with a path inside StateDir (underpassd,
// dockerd, its containerd and shims).
package docker

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

const (
	// Prefix starts the name of every network namespace of the demo.
	Prefix = "underpass-dockerdemo-"
	// NetnsDir is where named namespaces live (as with `ip netns add`).
	NetnsDir = "/run/netns"
	// BPFFS is the demo agent's pin directory.
	BPFFS = "/sys/fs/bpf/underpass-dockerdemo"
	// StateDir holds dockerd's roots and socket and the agent's config
	// and log.
	StateDir = "/run/underpass-dockerdemo"
	// LockFile is held (flock) by a running Docker demo; it holds its pid.
	LockFile = "/run/underpass-dockerdemo.lock"
	// MetricsAddr is the agent's metrics.listen inside the node netns.
	MetricsAddr = "127.0.0.1:9775"
	// AgentLockDir is where underpassd keeps its per-pin-directory lock
	// files (internal/agent.LockDir).
	AgentLockDir = "/run/underpass"
	// TrustKey is where dockerd 20.10 writes its identity whatever its
	// roots; the demo removes it if it made it (KeyMarker says so).
	TrustKey = "/etc/docker/key.json"
)

// KeyMarker, inside StateDir, says that TrustKey did not exist before the
// demo started dockerd.
var KeyMarker = filepath.Join(StateDir, "remove-key.json")

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
// command line names a path inside StateDir.
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

// Mounts lists the mount points inside StateDir, deepest first.
func Mounts() []string {
	b, _ := os.ReadFile("/proc/self/mounts")
	var out []string
	for line := range strings.SplitSeq(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 1 && (f[1] == StateDir || strings.HasPrefix(f[1], StateDir+"/")) {
			out = append(out, f[1])
		}
	}
	for i, j := 0, len(out)-1; i < j; i, j = i+1, j-1 {
		out[i], out[j] = out[j], out[i]
	}
	return out
}

// AgentLockFile is the lock file underpassd keeps for BPFFS
// (internal/agent: underpassd-<first 8 bytes of sha256, hex>.lock).
func AgentLockFile() string {
	sum := sha256.Sum256([]byte(filepath.Clean(BPFFS)))
	return filepath.Join(AgentLockDir, fmt.Sprintf("underpassd-%x.lock", sum[:8]))
}

// Leftovers describes everything of the demo that exists now: namespaces,
// mounts, the pin and state directories, the lock files and processes.
// Empty means clean.
func Leftovers() []string {
	var out []string
	names, err := Namespaces()
	if err != nil {
		out = append(out, fmt.Sprintf("cannot list %s: %v", NetnsDir, err))
	}
	for _, n := range names {
		out = append(out, "netns "+n)
	}
	for _, m := range Mounts() {
		out = append(out, "mount "+m)
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
