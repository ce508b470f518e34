// Package docker_test runs the real Docker engine (Debian's docker.io) in a
// netenv node namespace, next to the real underpassd following it
// (adopt.docker), and checks that containers on a Docker macvlan network
// are served with no step per container: reachable from the host and
// reaching it within a second of `docker run`, named after the container
// in the registry and in /metrics, unregistered when removed, kept across
// agent and engine restarts.
//
// The engine has its own data-root, exec-root, socket and pidfile under
// the test's temporary directory, and neither iptables nor a bridge: it
// never touches the host's Docker. Its containers come from an image
// imported from busybox-static: nothing is pulled.
package docker_test

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/underpass-cni/underpass/internal/loader"
	"github.com/underpass-cni/underpass/internal/testutil"
	"github.com/underpass-cni/underpass/test/engines"
	"github.com/underpass-cni/underpass/test/netenv"
)

var agentBin string

func TestMain(m *testing.M) {
	testutil.Main(m, "test/docker", func(tmp string) error {
		var err error
		agentBin, err = engines.AgentBin(tmp)
		return err
	})
}

const (
	dockerd   = "/usr/sbin/dockerd"
	dockerCLI = "/usr/bin/docker" // Debian's, the daemon's version (/usr/local/bin/docker may be newer than the daemon speaks)
	image     = "underpass-busybox:test"
	network   = "upmv"
	trustKey  = "/etc/docker/key.json"
)

// engine is a dockerd running in the lab's node namespace.
type engine struct {
	t      *testing.T
	l      *netenv.Env
	dir    string // data-root, exec-root, socket, pidfile, log
	socket string
	cli    engines.CLI // the Debian docker CLI against this engine
	cmd    *exec.Cmd
	done   chan struct{}
	log    *os.File
}

func startEngine(t *testing.T, l *netenv.Env, dir string) *engine {
	t.Helper()
	e := &engine{t: t, l: l, dir: dir, socket: filepath.Join(dir, "docker.sock")}
	e.cli = engines.CLI{T: t, Name: "docker", Command: func(ctx context.Context, args ...string) *exec.Cmd {
		return exec.CommandContext(ctx, dockerCLI, append([]string{"-H", "unix://" + e.socket}, args...)...)
	}}
	e.start()
	return e
}

func (e *engine) start() {
	e.t.Helper()
	var err error
	if e.log, err = os.OpenFile(filepath.Join(e.dir, "dockerd.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644); err != nil {
		e.t.Fatal(err)
	}
	e.cmd = e.l.Node.Command(context.Background(), dockerd,
		"--data-root", filepath.Join(e.dir, "data"), "--exec-root", filepath.Join(e.dir, "exec"),
		"-H", "unix://"+e.socket, "--pidfile", filepath.Join(e.dir, "docker.pid"),
		"--iptables=false", "--ip6tables=false", "--bridge=none", "--ip-forward=false", "--ip-masq=false",
		"--storage-driver=overlay2", "--shutdown-timeout=3", "--userland-proxy=false")
	e.cmd.Stdout, e.cmd.Stderr = e.log, e.log
	if err := e.cmd.Start(); err != nil {
		e.t.Fatalf("start dockerd: %v", err)
	}
	e.done = make(chan struct{})
	go func(cmd *exec.Cmd, done chan struct{}) { _ = cmd.Wait(); close(done) }(e.cmd, e.done)
	testutil.WaitForEvery(e.t, 30*time.Second, 50*time.Millisecond, "dockerd answering on "+e.socket, func() bool {
		select {
		case <-e.done:
			e.t.Fatalf("dockerd exited:\n%s", e.logTail())
		default:
		}
		_, err := e.docker("version", "--format", "{{.Server.Version}}")
		return err == nil
	})
}

// stop stops dockerd (SIGTERM: it stops its containers and unmounts) and
// waits for it.
func (e *engine) stop() {
	e.t.Helper()
	if e.cmd == nil {
		return
	}
	_ = e.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-e.done:
	case <-time.After(30 * time.Second):
		_ = e.cmd.Process.Kill()
		<-e.done
		e.t.Errorf("dockerd did not stop within 30s of SIGTERM")
	}
	e.cmd = nil
	e.log.Close()
}

func (e *engine) logTail() string {
	b, _ := os.ReadFile(filepath.Join(e.dir, "dockerd.log"))
	return testutil.TailLines(string(b), 40)
}

// docker runs the Debian docker CLI against this engine.
func (e *engine) docker(args ...string) (string, error) { return e.cli.Run(args...) }

func (e *engine) must(args ...string) string {
	e.t.Helper()
	return e.cli.Must(args...)
}

// inspect is the running container name as the engine reports it.
func (e *engine) inspect(name string) engines.Container {
	e.t.Helper()
	return e.cli.Inspect(name, network)
}

// run starts a container on the macvlan network and returns it, with the
// time `docker run` returned.
func (e *engine) run(name string, more ...string) (engines.Container, time.Time) {
	e.t.Helper()
	args := append([]string{"run", "-d", "--name", name, "--network", network, "--stop-timeout", "1"}, more...)
	e.must(append(args, image, "sleep", "1000")...)
	returned := time.Now()
	return e.inspect(name), returned
}

// A Docker macvlan network's containers are served by the agent following
// the engine (adopt.docker), with no command per container.
func TestDockerMacvlan(t *testing.T) {
	testutil.RequireRoot(t)
	engines.RequireTools(t, "Docker", engines.Tool{Path: dockerd, Package: "docker.io"}, engines.Tool{Path: dockerCLI, Package: "docker.io"})
	start := time.Now()
	l := netenv.New(t, netenv.Options{})
	u := l.Uplinks[0]
	pins := filepath.Join(testutil.MountBPFFS(t), "underpass")
	tmp := t.TempDir()
	// Registered before the engine's cleanup, so run after it: the engine
	// is stopped first and must have left no mount behind.
	t.Cleanup(func() { engines.CheckNoMounts(t, tmp, "dockerd stopped") })
	// dockerd 20.10 writes its identity key to /etc/docker/key.json
	// whatever its roots (no flag moves it): removed again if this test
	// made it.
	engines.LeftBehind(t, trustKey)
	dockerDir := filepath.Join(tmp, "d")
	engines.Must(t, os.Mkdir(dockerDir, 0o700))
	e := startEngine(t, l, dockerDir)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("dockerd log (tail):\n%s", e.logTail())
		}
		e.stop()
	})
	t.Logf("dockerd up %s after the lab", time.Since(start).Round(time.Millisecond))
	e.cli.ImportBusybox(image)

	// Docker's range keeps clear of the host's own address (and of the
	// gateway): the /28 at .64, and in the IPv6 subnet (dual stack) the
	// /124 at ::64.
	ipRange28 := engines.RangeOf(t, u, 64)
	ipRange6 := netip.PrefixFrom(netenv.NthAddr(u.Subnet6, 0x64).Addr(), 124)
	if ipRange6.Contains(u.Node6.Addr()) || ipRange6.Contains(u.Gateway6) {
		t.Fatalf("range %s holds the node %s or the gateway %s", ipRange6, u.Node6, u.Gateway6)
	}
	e.must("network", "create", "-d", "macvlan", "-o", "parent="+u.Name, "--subnet", u.Subnet4.Masked().String(),
		"--gateway", u.Gateway4.String(), "--ip-range", ipRange28.String(),
		"--ipv6", "--subnet", u.Subnet6.Masked().String(), "--gateway", u.Gateway6.String(), "--ip-range", ipRange6.String(), network)

	// The baseline: no agent, macvlan does not connect a slave with its parent.
	web1, _ := e.run("web-1", "--restart", "always")
	c1 := engines.OpenNS(t, web1)
	if r := netenv.Ping(t, l.Node, web1.IP, 2); r.Received != 0 {
		t.Fatalf("host -> Docker macvlan container answered before underpass: %v", r)
	}
	if r := netenv.Ping(t, c1, u.Node4.Addr(), 2); r.Received != 0 {
		t.Fatalf("Docker macvlan container -> host answered before underpass: %v", r)
	}
	if !ipRange6.Contains(web1.IP6) {
		t.Fatalf("web-1's IPv6 address %v is not in the network's range %s", web1.IP6, ipRange6)
	}
	if r := netenv.Ping(t, l.Node, web1.IP6, 2); r.Received != 0 {
		t.Fatalf("host -> Docker macvlan container over IPv6 answered before underpass: %v", r)
	}

	cfg := filepath.Join(tmp, "underpass.yaml")
	engines.Must(t, os.WriteFile(cfg, []byte(fmt.Sprintf("bpffs: %s\nmetrics: {listen: %q}\ngcInterval: 1s\nstaleServices: {cidrs: [10.96.0.0/16]}\nadopt: {parents: [%s], docker: %s}\n",
		pins, engines.MetricsAddr, u.Name, e.socket)), 0o644))
	get := engines.MetricsGet(t, l)
	startAgent := func() *testutil.Agent {
		ag := testutil.StartAgent(t, "underpassd", l.Node.Command(context.Background(), agentBin, "--config", cfg, "--log-level", "debug"), 0)
		ag.WaitReady(t, get, 60*time.Second)
		return ag
	}
	ag := startAgent()
	dp, err := loader.Open(pins)
	engines.Must(t, err)
	t.Cleanup(func() { dp.Close() })

	// The container that ran before the agent: adopted at its start, named
	// from the engine's list.
	ep1 := engines.WaitAdopted(t, dp, web1, 5*time.Second)
	engines.WaitFor(t, 5*time.Second, "host -> web-1", func() bool { return netenv.Ping(t, l.Node, web1.IP, 1).Received == 1 })
	netenv.MustPing(t, c1, u.Node4.Addr(), 3)

	// A container started while the agent runs: served within a second of
	// `docker run` returning.
	web2, returned := e.run("web-2")
	adoptedIn := engines.WaitAdoptedSince(t, dp, web2, returned, "docker run returned", 10*time.Second)
	c2 := engines.OpenNS(t, web2)
	r := netenv.Ping(t, l.Node, web2.IP, 1)
	hostIn := time.Since(returned)
	back := netenv.Ping(t, c2, u.Node4.Addr(), 1)
	t.Logf("web-2: adopted %s after docker run returned, host -> web-2 answered at %s, web-2 -> host at %s",
		adoptedIn.Round(time.Millisecond), hostIn.Round(time.Millisecond), time.Since(returned).Round(time.Millisecond))
	if r.Received != 1 || back.Received != 1 {
		t.Fatalf("right after its adoption: host -> web-2 %v, web-2 -> host %v", r, back)
	}
	netenv.MustPing(t, l.Node, web2.IP, 3)
	netenv.MustPing(t, c2, u.Node4.Addr(), 3)
	engines.CheckMetricsPod(t, get, "web-1", "web-2")

	// Dual stack: both addresses registered, host <-> container over IPv6
	// too (the parent's hairpin answers the ND as it does ARP).
	ep2, _ := engines.FindAdopted(t, dp, web2.MAC)
	want := []netip.Addr{web2.IP, web2.IP6}
	for _, a := range want {
		if !slices.ContainsFunc(ep2.Addrs, func(p netip.Prefix) bool { return p.Addr() == a }) {
			t.Errorf("web-2 registered with %v, want %v among them", ep2.Addrs, a)
		}
	}
	engines.WaitFor(t, 5*time.Second, "host -> web-2 over IPv6", func() bool { return netenv.Ping(t, l.Node, web2.IP6, 1).Received == 1 })
	netenv.MustPing(t, l.Node, web2.IP6, 3)
	netenv.MustPing(t, c2, u.Node6.Addr(), 3)

	// Isolated as a pod is: a stale Service address from a container is
	// dropped, a forged source (a raw socket, which Docker's default
	// CAP_NET_RAW allows) is dropped and counted; neither reaches the wire.
	engines.CheckIsolated(t, l, u, dp, c2, ep2)

	// Removed: unregistered.
	e.must("stop", "-t", "1", "web-2")
	e.must("rm", "web-2")
	c2.Close()
	engines.WaitFor(t, 5*time.Second, "web-2 unregistered after docker rm", func() bool {
		_, found := engines.FindAdopted(t, dp, web2.MAC)
		return !found
	})

	// The agent restarts: the adoption is kept, same endpoint, same name.
	if !ag.Terminate(10 * time.Second) {
		t.Fatal("underpassd did not stop on SIGTERM")
	}
	ag = startAgent()
	if again := engines.WaitAdopted(t, dp, web1, 5*time.Second); again.ID != ep1.ID {
		t.Errorf("after an agent restart web-1 is endpoint %d, was %d", again.ID, ep1.ID)
	}
	netenv.MustPing(t, l.Node, web1.IP, 2)
	netenv.MustPing(t, c1, u.Node4.Addr(), 2)
	c1.Close()

	// The engine restarts: web-1 (restart policy always) comes back in a
	// new namespace, the agent reconnects and serves and names it, and a
	// container started after that too.
	e.stop()
	e.start()
	engines.WaitFor(t, 30*time.Second, "web-1 running again after the dockerd restart", func() bool {
		out, err := e.docker("inspect", "--format", "{{.State.Running}}", "web-1")
		return err == nil && out == "true"
	})
	web1 = e.inspect("web-1")
	engines.WaitAdopted(t, dp, web1, 5*time.Second)
	c1 = engines.OpenNS(t, web1)
	engines.WaitFor(t, 5*time.Second, "host -> web-1 after the dockerd restart", func() bool { return netenv.Ping(t, l.Node, web1.IP, 1).Received == 1 })
	netenv.MustPing(t, c1, u.Node4.Addr(), 2)
	c1.Close()
	web3, returned := e.run("web-3")
	t.Logf("web-3 (after the dockerd restart): adopted %s after docker run returned", engines.WaitAdoptedSince(t, dp, web3, returned, "docker run returned", 10*time.Second).Round(time.Millisecond))
	netenv.MustPing(t, l.Node, web3.IP, 2)
	if n := strings.Count(ag.Out.String(), "docker: engine unreachable; retrying"); n != 1 {
		t.Errorf("the agent warned %d times that the engine was unreachable, want once per outage:\n%s", n, testutil.TailLines(ag.Out.String(), 30))
	}
	if !strings.Contains(ag.Out.String(), "docker: engine reachable again") {
		t.Errorf("the agent never logged reconnecting to the engine")
	}
	e.must("rm", "-f", "web-1", "web-3")
	engines.WaitNoneAdopted(t, dp, 5*time.Second, "every adopted endpoint unregistered after docker rm -f")
	t.Logf("whole test body %s", time.Since(start).Round(time.Millisecond))
}
