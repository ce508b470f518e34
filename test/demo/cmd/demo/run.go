//go:build linux

package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/containernetworking/cni/libcni"

	"github.com/underpass-cni/underpass/test/demo"
)

// demoRun is one run of the demo.
type demoRun struct {
	bin     string
	cniPath []string
	once    bool
	out     io.Writer
	start   time.Time

	wire, node *demo.NS
	pods       []*pod
	cni        *libcni.CNIConfig
	netconf    *libcni.NetworkConfigList

	agent      *exec.Cmd
	agentDone  chan struct{}
	agentLog   *os.File
	httpClient *http.Client
	listeners  []net.Listener
	leaks      atomic.Int64 // connections the gateway's leak sink accepted

	steps, failed int
}

// Output helpers: a section title, a passed step, a failed step, detail.
func (d *demoRun) section(format string, args ...any) {
	fmt.Fprintf(d.out, "\n── %s\n", fmt.Sprintf(format, args...))
}

func (d *demoRun) ok(format string, args ...any) {
	d.steps++
	fmt.Fprintf(d.out, "  ✓ %s\n", fmt.Sprintf(format, args...))
}

func (d *demoRun) fail(format string, args ...any) {
	d.steps++
	d.failed++
	fmt.Fprintf(d.out, "  ✗ %s\n", fmt.Sprintf(format, args...))
}

func (d *demoRun) check(ok bool, format string, args ...any) bool {
	if ok {
		d.ok(format, args...)
	} else {
		d.fail(format, args...)
	}
	return ok
}

func (d *demoRun) detail(format string, args ...any) {
	for _, l := range strings.Split(strings.TrimRight(fmt.Sprintf(format, args...), "\n"), "\n") {
		fmt.Fprintf(d.out, "      %s\n", l)
	}
}

func (d *demoRun) main() (code int) {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	fmt.Fprintf(d.out, "underpass demo: a node with two macvlan pods, built from network namespaces\n")
	fmt.Fprintf(d.out, "  binaries %s, state %s, pins %s\n", d.bin, demo.StateDir, demo.BPFFS)

	if left := leftoversButLock(); len(left) > 0 {
		d.section("Leftovers of an earlier run")
		if !d.cleanup(false) {
			return 1
		}
	}

	// Always clean up: on success, failure, Ctrl-C and panics in this
	// goroutine. kill -9 is what the leftover scan above is for.
	defer func() {
		if r := recover(); r != nil {
			fmt.Fprintf(d.out, "  ✗ demo crashed: %v\n", r)
			code = 1
		}
		signal.Ignore(os.Interrupt, syscall.SIGTERM) // a second Ctrl-C must not stop the cleanup
		d.section("Cleanup")
		if !d.cleanup(true) && code == 0 {
			code = 1
		}
	}()

	if !d.setup(ctx) {
		if ctx.Err() != nil {
			fmt.Fprintf(d.out, "\nInterrupted.\n")
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
	fmt.Fprintf(d.out, "Demo ready after %s.\n", ready.Round(100*time.Millisecond))
	if d.failed > 0 {
		d.showAgentLog(40)
		return 1
	}
	if d.once || ctx.Err() != nil {
		return 0
	}
	fmt.Fprintf(d.out, "\nThe node stays up: try the commands above. Press Ctrl-C to stop the demo and clean up.\n")
	select {
	case <-ctx.Done():
	case <-d.agentDone:
		fmt.Fprintf(d.out, "  ✗ underpassd exited unexpectedly\n")
		d.showAgentLog(40)
		return 1
	}
	return 0
}

func (d *demoRun) summary() {
	if d.failed == 0 {
		fmt.Fprintf(d.out, "\nAll %d steps passed.\n", d.steps)
	} else {
		fmt.Fprintf(d.out, "\n%d of %d steps FAILED.\n", d.failed, d.steps)
	}
}

// setup builds the lab, starts the agent and creates the pods; false means
// the demo cannot go on.
func (d *demoRun) setup(ctx context.Context) bool {
	for _, b := range []string{"underpass", "underpassd"} {
		if _, err := os.Stat(filepath.Join(d.bin, b)); err != nil {
			d.fail("%s not found in %s: run make build (or make demo)", b, d.bin)
			return false
		}
	}
	for _, dir := range []string{demo.StateDir, confDir, ipamDir, cniCacheDir} {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			d.fail("%v", err)
			return false
		}
	}

	d.section("1. The node: network namespaces")
	if err := d.buildLab(); err != nil {
		d.fail("%v", err)
		return false
	}
	d.ok("%s: bridge br0 is the switch and the gateway %s/%d", d.wire.Name, gateway, subnet.Bits())
	d.ok("%s: eth0 %s/%d is the parent NIC (a veth plugged into br0), default route via %s", d.node.Name, nodeAddr, subnet.Bits(), gateway)
	d.ok("the node answers the live service %s:%d (kube-proxy's job on a real node)", liveVIP, svcPort)
	if ctx.Err() != nil {
		return false
	}

	d.section("2. The agent: underpassd in the node netns")
	if err := d.startAgent(ctx); err != nil {
		d.fail("underpassd: %v", err)
		d.showAgentLog(40)
		return false
	}
	if ctx.Err() != nil {
		return false
	}

	d.section("3. Two pods, created by the underpass CNI plugin (main mode, master eth0, host-local IPAM)")
	if err := d.writeConflist(); err != nil {
		d.fail("%v", err)
		return false
	}
	d.cni = libcni.NewCNIConfigWithCacheDir(d.cniPath, cniCacheDir, nil)
	for _, name := range []string{"pod-a", "pod-b"} {
		p, err := d.addPod(ctx, name)
		if err != nil {
			d.fail("CNI ADD %s: %v", name, err)
			return false
		}
		d.ok("%s: eth0 %s/%d, mac %s (macvlan on eth0, netns %s)", p.name, p.ip, subnet.Bits(), p.mac, p.ns.Name)
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
	fmt.Fprintf(d.out, "\n  underpassd log (last %d lines of %s):\n", len(lines), agentLogPath)
	for _, l := range lines {
		fmt.Fprintf(d.out, "    %s\n", l)
	}
}
