// Command underpass is the CNI plugin (type "underpass"); all of it lives in
// package internal/cni.
package main

import (
	"runtime"
	"runtime/debug"

	"github.com/containernetworking/cni/pkg/skel"

	"github.com/underpass-cni/underpass/internal/cni"
)

// The plugin switches network namespaces per thread: keep main on the main
// thread (which stays in the host netns) so that nothing host-side runs on
// a thread another goroutine moved.
//
// A plugin call needs ~13 ms of CPU but, when a node starts a hundred pods
// at once, waits ~400 ms for a CPU (BenchmarkPodStart, the debug log's
// runqueue_wait): every extra thread the Go runtime wakes (a second P, the
// garbage collector's workers) must be scheduled on a saturated machine
// too. One P, and no collection below 64 MiB (a call allocates a few).
func init() {
	runtime.LockOSThread()
	runtime.GOMAXPROCS(1)
	debug.SetGCPercent(-1)
	debug.SetMemoryLimit(64 << 20)
}

func main() {
	skel.PluginMainFuncs(cni.Funcs(), cni.SupportedVersions, "underpass: eBPF datapath companion for macvlan/ipvlan")
}
