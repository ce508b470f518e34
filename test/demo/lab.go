//go:build linux

// Package demo holds what `make demo` (test/demo/cmd/demo) and its test
// share: the fixed names of everything the demo creates and the leftover
// scan that both the demo's start-up cleanup and the test use. What it
// shares with `make demo-docker` is in test/demo/kit, used with Names.
//
// Every name is fixed (not per run), so a run after a crash, a kill -9 or a
// power cut finds and removes what the previous one left: namespaces named
// Prefix*, the pin directory BPFFS, the state directory StateDir and any
// process started with a path inside StateDir.
package demo

import (
	"github.com/underpass-cni/underpass/test/demo/kit"
	"github.com/underpass-cni/underpass/test/netenv"
)

// Fixed names of everything the demo creates.
const (
	// Prefix starts the name of every network namespace of the demo.
	Prefix = "underpass-demo-"
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
)

// Names are the demo's names, for test/demo/kit.
var Names = kit.NewNames(Prefix, BPFFS, StateDir, LockFile)

// NS is a named network namespace: test/netenv's, with Name Prefix + a
// short name and Path kit.NetnsDir/Name (for nsenter --net= and CNI_NETNS).
type NS = netenv.NS

// Leftovers describes everything of the demo that exists now: namespaces,
// the pin directory, the state directory, the lock files and processes.
// Empty means clean.
func Leftovers() []string { return Names.Leftovers(nil, nil) }
