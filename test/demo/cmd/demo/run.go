//go:build linux

package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"github.com/containernetworking/cni/libcni"

	"github.com/underpass-cni/underpass/test/demo"
	"github.com/underpass-cni/underpass/test/demo/kit"
)

// demoRun is one run of the demo.
type demoRun struct {
	kit.Narrator // its output and the steps so far

	bin     string
	cniPath []string
	once    bool
	start   time.Time

	wire, node *demo.NS
	pods       []*pod
	cni        *libcni.CNIConfig
	netconf    *libcni.NetworkConfigList

	agent     *kit.Agent
	listeners []net.Listener
	leaks     atomic.Int64 // connections the gateway's leak sink accepted
}

func (d *demoRun) main() int {
	fmt.Fprintf(d.Out, "underpass demo: a node with two macvlan pods, built from network namespaces\n")
	fmt.Fprintf(d.Out, "  binaries %s, state %s, pins %s\n", d.bin, demo.StateDir, demo.BPFFS)
	return d.RunScene(leftoversButLock, d.cleanup, d.scene)
}

// scene is the demo's steps, then (without DEMO_ONCE=1) the wait for
// Ctrl-C.
func (d *demoRun) scene(ctx context.Context) int {
	if !d.setup(ctx) {
		if ctx.Err() != nil {
			fmt.Fprintf(d.Out, "\nInterrupted.\n")
		} else {
			d.summary()
		}
		return 1
	}
	d.connectivity(ctx)
	d.services(ctx)
	d.inspect(ctx)
	ready := time.Since(d.start)
	d.summary()
	fmt.Fprintf(d.Out, "Demo ready after %s.\n", ready.Round(100*time.Millisecond))
	if d.Failed > 0 {
		d.showAgentLog(40)
		return 1
	}
	if d.once || ctx.Err() != nil {
		return 0
	}
	fmt.Fprintf(d.Out, "\nThe node stays up: try the commands above. Press Ctrl-C to stop the demo and clean up.\n")
	select {
	case <-ctx.Done():
	case <-d.agent.Done:
		fmt.Fprintf(d.Out, "  ✗ underpassd exited unexpectedly\n")
		d.showAgentLog(40)
		return 1
	}
	return 0
}

func (d *demoRun) summary() {
	if d.Failed == 0 {
		fmt.Fprintf(d.Out, "\nAll %d steps passed.\n", d.Steps)
	} else {
		fmt.Fprintf(d.Out, "\n%d of %d steps FAILED.\n", d.Failed, d.Steps)
	}
}

// setup builds the lab, starts the agent and creates the pods; false means
// the demo cannot go on.
func (d *demoRun) setup(ctx context.Context) bool {
	for _, b := range []string{"underpass", "underpassd"} {
		if _, err := os.Stat(filepath.Join(d.bin, b)); err != nil {
			d.Fail("%s not found in %s: run make build (or make demo)", b, d.bin)
			return false
		}
	}
	for _, dir := range []string{demo.StateDir, confDir, ipamDir, cniCacheDir} {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			d.Fail("%v", err)
			return false
		}
	}

	if !d.LabSection(demo.Names, labSpec, d.buildLab) {
		return false
	}
	d.OK("%s: eth0 %s/%d is the parent NIC (a veth plugged into br0), default route via %s", d.node.Name, nodeAddr, subnet.Bits(), gateway)
	d.OK("the node answers the live service %s:%d (kube-proxy's job on a real node)", liveVIP, svcPort)
	if ctx.Err() != nil {
		return false
	}

	d.Section("2. The agent: underpassd in the node netns")
	if err := d.startAgent(ctx); err != nil {
		d.Fail("underpassd: %v", err)
		d.showAgentLog(40)
		return false
	}
	if ctx.Err() != nil {
		return false
	}

	d.Section("3. Two pods, created by the underpass CNI plugin (main mode, master eth0, host-local IPAM)")
	if err := d.writeConflist(); err != nil {
		d.Fail("%v", err)
		return false
	}
	d.cni = libcni.NewCNIConfigWithCacheDir(d.cniPath, cniCacheDir, nil)
	for _, name := range []string{"pod-a", "pod-b"} {
		p, err := d.addPod(ctx, name)
		if err != nil {
			d.Fail("CNI ADD %s: %v", name, err)
			return false
		}
		d.OK("%s: eth0 %s/%d, mac %s (macvlan on eth0, netns %s)", p.name, p.ip, subnet.Bits(), p.mac, p.ns.Name)
	}
	return ctx.Err() == nil
}

// showAgentLog prints the tail of the agent's log (it is removed with the
// state directory).
func (d *demoRun) showAgentLog(n int) {
	b, err := os.ReadFile(agentLogPath)
	if err != nil || len(b) == 0 {
		return
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	fmt.Fprintf(d.Out, "\n  underpassd log (last %d lines of %s):\n", len(lines), agentLogPath)
	for _, l := range lines {
		fmt.Fprintf(d.Out, "    %s\n", l)
	}
}
