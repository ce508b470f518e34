//go:build linux

// Command demo-docker is `make demo-docker`: on a Linux box with Debian's
// docker.io and busybox-static (as root; no image is pulled, the host's
// Docker is never touched) it builds a node out of network namespaces,
// starts its own dockerd in the node netns (its own data-root, exec-root
// and socket, no iptables, no bridge) and shows what the real underpassd,
// following the engine (adopt.docker), does for containers on a Docker
// macvlan network:
//
//	underpass-dockerdemo-wire  bridge br0 = the switch and the gateway 192.0.2.1
//	      │ veth
//	underpass-dockerdemo-node  eth0 192.0.2.2 (the parent NIC), dockerd, underpassd
//	      │ macvlan (docker network create -d macvlan, --ip-range 192.0.2.64/28)
//	web-1, web-2  (docker run)
//
// The baseline first (no agent: the node cannot reach its macvlan
// container), then with the agent: adoption under the containers' names,
// host <-> container both ways, underpassctl endpoints and stats, the
// /metrics series per container, and docker rm unregistering. It always
// cleans up (containers, the agent, dockerd, the datapath, mounts,
// namespaces, the state directory), also on Ctrl-C or a failure; a run
// after a crash removes the leftovers first. The exit status is non-zero
// when a step failed. DEMO_WAIT=1 keeps the node up until Ctrl-C.
package main

import (
	"errors"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	dd "github.com/underpass-cni/underpass/test/demo/docker"
	"github.com/underpass-cni/underpass/test/demo/kit"
)

var (
	subnet   = netip.MustParsePrefix("192.0.2.0/24")
	gateway  = netip.MustParseAddr("192.0.2.1")
	nodeAddr = netip.MustParseAddr("192.0.2.2")
	ipRange  = netip.MustParsePrefix("192.0.2.64/28") // Docker's: clear of the node and the gateway
)

const (
	dockerd   = "/usr/sbin/dockerd"
	dockerCLI = "/usr/bin/docker" // Debian's, the daemon's version
	busybox   = "/bin/busybox"
	image     = "underpass-busybox:demo"
	network   = "upmv"
)

var (
	configPath    = filepath.Join(dd.StateDir, "underpass.yaml")
	uninstallPath = filepath.Join(dd.StateDir, "uninstall.yaml")
	agentLogPath  = filepath.Join(dd.StateDir, "underpassd.log")
	dockerDir     = filepath.Join(dd.StateDir, "docker")
	dockerSock    = filepath.Join(dockerDir, "docker.sock")
	dockerLogPath = filepath.Join(dd.StateDir, "dockerd.log")
)

const usage = `demo-docker: the underpass Docker demo (make demo-docker). Run as root on Linux.

Builds a node in network namespaces (prefix %s), starts its own dockerd
and underpassd from --bin in it, and shows Docker macvlan containers
reachable from the node once the agent follows the engine. Removes
everything at the end (also what a crashed run left). DEMO_WAIT=1 keeps
the node up until Ctrl-C.

Flags:
`

func main() {
	fs := flag.NewFlagSet("demo-docker", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), usage, dd.Prefix)
		fs.PrintDefaults()
	}
	bin := fs.String("bin", "bin", "`dir`ectory with underpassd and underpassctl (make build)")
	cleanupOnly := fs.Bool("cleanup", false, "only remove what a previous run left behind, then exit")
	if err := fs.Parse(os.Args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return
		}
		os.Exit(2)
	}
	if err := run(*bin, *cleanupOnly); err != nil {
		if !errors.Is(err, kit.ErrReported) {
			fmt.Fprintln(os.Stderr, "demo-docker:", err)
		}
		os.Exit(1)
	}
}

func run(bin string, cleanupOnly bool) error {
	absBin, err := filepath.Abs(bin)
	if err != nil {
		return err
	}
	d := &demoRun{Narrator: kit.Narrator{Out: os.Stdout}, bin: absBin, start: time.Now(), wait: os.Getenv("DEMO_WAIT") == "1"}
	return dd.Names.Run("Docker demo", "run as root (network namespaces, eBPF, dockerd): sudo make demo-docker", cleanupOnly, d.cleanup, d.main)
}
