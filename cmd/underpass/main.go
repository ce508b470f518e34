// Command underpass is the CNI plugin (type "underpass"); all of it lives in
// package cni.
package main

import (
	"runtime"

	"github.com/containernetworking/cni/pkg/skel"

	"github.com/underpass-cni/underpass/internal/cni"
)

// The plugin switches network namespaces per thread: keep main on the main
// thread (which stays in the host netns) so that nothing host-side runs on
// a thread another goroutine moved.
func init() { runtime.LockOSThread() }

func main() {
	skel.PluginMainFuncs(cni.Funcs(), cni.SupportedVersions, "underpass: eBPF datapath companion for macvlan/ipvlan")
}
