//go:build linux

// Command demo is `make demo`: on a bare Linux box (as root, no Kubernetes,
// no containers) it builds a node out of network namespaces, runs the real
// underpassd in it, creates two pods with the real underpass CNI plugin and
// shows, step by step, what underpass fixes for macvlan pods:
//
//	underpass-demo-wire  bridge br0 = the switch and the gateway 192.0.2.1
//	      │ veth
//	underpass-demo-node  eth0 192.0.2.2 (the parent NIC), underpassd,
//	      │ macvlan        the live service 10.96.0.10 answered by the node
//	underpass-demo-pod-a, underpass-demo-pod-b  (host-local .100-.200)
//
// It then waits for Ctrl-C (DEMO_ONCE=1: exits at once) and always cleans up:
// pods (CNI DEL), the agent, the pinned datapath, the namespaces and its
// state directory. A run after a crash removes the leftovers first. The exit
// status is non-zero when a step failed.
package main

import (
	"errors"
	"flag"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	"github.com/underpass-cni/underpass/test/demo"
	"github.com/underpass-cni/underpass/test/demo/kit"
	"github.com/underpass-cni/underpass/test/netenv"
)

// The demo's addresses.
var (
	subnet    = netip.MustParsePrefix("192.0.2.0/24")
	gateway   = netip.MustParseAddr("192.0.2.1")
	nodeAddr  = netip.MustParseAddr("192.0.2.2")
	gatewayMA = net.HardwareAddr{0x02, 'u', 'p', 'd', 'e', 1}

	// The Services are the test labs' (test/netenv).
	svcCIDR  = netenv.SvcCIDR4
	liveVIP  = netenv.LiveVIP4
	staleVIP = netenv.StaleVIP4
)

const svcPort = 80

var (
	configPath    = filepath.Join(demo.StateDir, "underpass.yaml")
	uninstallPath = filepath.Join(demo.StateDir, "uninstall.yaml")
	agentLogPath  = filepath.Join(demo.StateDir, "underpassd.log")
	confDir       = filepath.Join(demo.StateDir, "net.d")
	ipamDir       = filepath.Join(demo.StateDir, "ipam")
	cniCacheDir   = filepath.Join(demo.StateDir, "cni-cache")
)

const usage = `demo: the underpass demo (make demo). Run as root on Linux.

Builds a node in network namespaces (prefix %s), runs underpassd and the
underpass CNI plugin from --bin in it, creates two macvlan pods and shows
host<->pod, pod<->pod, a live and a deleted service, underpassctl stats and
the metrics. Waits for Ctrl-C, then removes everything (also what a crashed
run left). DEMO_ONCE=1 exits right after the steps.

Flags:
`

// options are the command line's.
type options struct {
	bin         string // --bin
	cniPath     string // --cni-path
	cleanupOnly bool   // --cleanup
}

func main() {
	fs := flag.NewFlagSet("demo", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), usage, demo.Prefix)
		fs.PrintDefaults()
	}
	var o options
	fs.StringVar(&o.bin, "bin", "bin", "`dir`ectory with underpass, underpassd and underpassctl (make build)")
	fs.StringVar(&o.cniPath, "cni-path", "", "more `dirs` (colon-separated) searched for CNI plugins: the host-local IPAM plugin")
	fs.BoolVar(&o.cleanupOnly, "cleanup", false, "only remove what a previous run left behind, then exit")
	if err := fs.Parse(os.Args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return
		}
		os.Exit(2)
	}
	if err := run(o); err != nil {
		if !errors.Is(err, kit.ErrReported) {
			fmt.Fprintln(os.Stderr, "demo:", err)
		}
		os.Exit(1)
	}
}

// run is the demo, or with --cleanup only its cleanup, under the lock that
// keeps it to one at a time.
func run(o options) error {
	absBin, err := filepath.Abs(o.bin)
	if err != nil {
		return err
	}
	d := &demoRun{
		Narrator: kit.Narrator{Out: os.Stdout},
		bin:      absBin,
		once:     os.Getenv("DEMO_ONCE") == "1",
		start:    time.Now(),
	}
	d.cniPath = []string{absBin}
	for _, p := range filepath.SplitList(o.cniPath) {
		if p != "" {
			d.cniPath = append(d.cniPath, p)
		}
	}
	return demo.Names.Run("demo", "run as root (network namespaces, eBPF): sudo make demo", o.cleanupOnly, d.cleanup, d.main)
}
