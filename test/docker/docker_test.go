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
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/underpass-cni/underpass/internal/adopt"
	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
	"github.com/underpass-cni/underpass/internal/testutil"
	"github.com/underpass-cni/underpass/test/netenv"
)

var agentBin string

func TestMain(m *testing.M) {
	testutil.Main(m, "test/docker", func(tmp string) error {
		if dir := os.Getenv("UNDERPASS_AGENT_BINS"); dir != "" {
			agentBin = filepath.Join(dir, "underpassd")
			return nil
		}
		agentBin = filepath.Join(tmp, "underpassd")
		return testutil.BuildAgent(agentBin)
	})
}

const (
	dockerd     = "/usr/sbin/dockerd"
	dockerCLI   = "/usr/bin/docker" // Debian's, the daemon's version (/usr/local/bin/docker may be newer than the daemon speaks)
	busybox     = "/bin/busybox"
	metricsAddr = "127.0.0.1:9775"
	image       = "underpass-busybox:test"
	network     = "upmv"
	trustKey    = "/etc/docker/key.json"
)

// engine is a dockerd running in the lab's node namespace.
type engine struct {
	t      *testing.T
	l      *netenv.Env
	dir    string // data-root, exec-root, socket, pidfile, log
	socket string
	cmd    *exec.Cmd
	done   chan struct{}
	log    *os.File
}

func startEngine(t *testing.T, l *netenv.Env, dir string) *engine {
	t.Helper()
	e := &engine{t: t, l: l, dir: dir, socket: filepath.Join(dir, "docker.sock")}
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
func (e *engine) docker(args ...string) (string, error) {
	return e.dockerIn(nil, args...)
}

func (e *engine) dockerIn(stdin io.Reader, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, dockerCLI, append([]string{"-H", "unix://" + e.socket}, args...)...)
	cmd.Stdin = stdin
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("docker %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	return strings.TrimSpace(out.String()), nil
}

func (e *engine) must(args ...string) string {
	e.t.Helper()
	out, err := e.docker(args...)
	if err != nil {
		e.t.Fatal(err)
	}
	return out
}

// importBusybox imports an image of busybox-static: /bin/busybox and the
// applets the tests run.
func (e *engine) importBusybox() {
	e.t.Helper()
	bb, err := os.ReadFile(busybox)
	if err != nil {
		e.t.Fatal(err)
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	must(e.t, tw.WriteHeader(&tar.Header{Name: "bin/", Typeflag: tar.TypeDir, Mode: 0o755}))
	must(e.t, tw.WriteHeader(&tar.Header{Name: "bin/busybox", Typeflag: tar.TypeReg, Mode: 0o755, Size: int64(len(bb))}))
	_, err = tw.Write(bb)
	must(e.t, err)
	for _, applet := range []string{"sh", "sleep", "ip", "ping"} {
		must(e.t, tw.WriteHeader(&tar.Header{Name: "bin/" + applet, Typeflag: tar.TypeSymlink, Linkname: "busybox", Mode: 0o777}))
	}
	must(e.t, tw.Close())
	if _, err := e.dockerIn(&buf, "import", "-", image); err != nil {
		e.t.Fatal(err)
	}
}

// container is a running Docker container as the engine reports it.
type container struct {
	name       string
	ip         netip.Addr
	mac        string
	sandboxKey string
}

func (e *engine) inspect(name string) container {
	e.t.Helper()
	out := e.must("inspect", "--format",
		`{{.NetworkSettings.SandboxKey}} {{(index .NetworkSettings.Networks "`+network+`").IPAddress}} {{(index .NetworkSettings.Networks "`+network+`").MacAddress}}`, name)
	f := strings.Fields(out)
	if len(f) != 3 {
		e.t.Fatalf("docker inspect %s: %q", name, out)
	}
	ip, err := netip.ParseAddr(f[1])
	must(e.t, err)
	return container{name: name, sandboxKey: f[0], ip: ip, mac: f[2]}
}

// run starts a container on the macvlan network and returns it, with the
// time `docker run` returned.
func (e *engine) run(name string, more ...string) (container, time.Time) {
	e.t.Helper()
	args := append([]string{"run", "-d", "--name", name, "--network", network, "--stop-timeout", "1"}, more...)
	e.must(append(args, image, "sleep", "1000")...)
	returned := time.Now()
	return e.inspect(name), returned
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func requireTools(t *testing.T) {
	t.Helper()
	for _, tool := range []struct{ path, pkg string }{{dockerd, "docker.io"}, {dockerCLI, "docker.io"}, {busybox, "busybox-static"}} {
		if _, err := os.Stat(tool.path); err != nil {
			t.Fatalf("the Docker test needs %s from %s (make deps installs it): %v", tool.path, tool.pkg, err)
		}
	}
}

// A Docker macvlan network's containers are served by the agent following
// the engine (adopt.docker), with no command per container.
func TestDockerMacvlan(t *testing.T) {
	testutil.RequireRoot(t)
	requireTools(t)
	start := time.Now()
	l := netenv.New(t, netenv.Options{})
	u := l.Uplinks[0]
	pins := filepath.Join(testutil.MountBPFFS(t), "underpass")
	tmp := t.TempDir()
	// Registered before the engine's cleanup, so run after it: the engine
	// is stopped first and must have left no mount behind.
	t.Cleanup(func() {
		for _, line := range strings.Split(readFile(t, "/proc/mounts"), "\n") {
			if f := strings.Fields(line); len(f) > 1 && strings.HasPrefix(f[1], tmp) {
				t.Errorf("left mounted after dockerd stopped: %s", f[1])
				_ = exec.Command("umount", "-l", f[1]).Run()
			}
		}
	})
	// dockerd 20.10 writes its identity key to /etc/docker/key.json
	// whatever its roots (no flag moves it): removed again if this test
	// made it.
	if _, err := os.Stat(trustKey); errors.Is(err, os.ErrNotExist) {
		t.Cleanup(func() { _ = os.Remove(trustKey) })
	}
	dockerDir := filepath.Join(tmp, "d")
	must(t, os.Mkdir(dockerDir, 0o700))
	e := startEngine(t, l, dockerDir)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("dockerd log (tail):\n%s", e.logTail())
		}
		e.stop()
	})
	t.Logf("dockerd up %s after the lab", time.Since(start).Round(time.Millisecond))
	e.importBusybox()

	// Docker's range keeps clear of the host's own address (and of the
	// gateway): the /28 at .64.
	ipRange := netenv.NthAddr(u.Subnet4, 64).Addr()
	ipRange28 := netip.PrefixFrom(ipRange, 28)
	if ipRange28.Contains(u.Node4.Addr()) || ipRange28.Contains(u.Gateway4) {
		t.Fatalf("ip range %s holds the node %s or the gateway %s", ipRange28, u.Node4, u.Gateway4)
	}
	e.must("network", "create", "-d", "macvlan", "-o", "parent="+u.Name, "--subnet", u.Subnet4.Masked().String(),
		"--gateway", u.Gateway4.String(), "--ip-range", ipRange28.String(), network)

	// The baseline: no agent, macvlan does not connect a slave with its parent.
	web1, _ := e.run("web-1", "--restart", "always")
	c1 := openNS(t, web1)
	if r := netenv.Ping(t, l.Node, web1.ip, 2); r.Received != 0 {
		t.Fatalf("host -> Docker macvlan container answered before underpass: %v", r)
	}
	if r := netenv.Ping(t, c1, u.Node4.Addr(), 2); r.Received != 0 {
		t.Fatalf("Docker macvlan container -> host answered before underpass: %v", r)
	}

	cfg := filepath.Join(tmp, "underpass.yaml")
	must(t, os.WriteFile(cfg, []byte(fmt.Sprintf("bpffs: %s\nmetrics: {listen: %q}\ngcInterval: 1s\nadopt: {parents: [%s], docker: %s}\n",
		pins, metricsAddr, u.Name, e.socket)), 0o644))
	client := testutil.NetnsHTTPClient(l.Node.Do, 5*time.Second)
	t.Cleanup(client.CloseIdleConnections)
	get := func(path string) (int, string, error) { return testutil.HTTPGet(client, "http://"+metricsAddr+path) }
	startAgent := func() *testutil.Agent {
		ag := testutil.StartAgent(t, "underpassd", l.Node.Command(context.Background(), agentBin, "--config", cfg, "--log-level", "debug"), 0)
		ag.WaitReady(t, get, 60*time.Second)
		return ag
	}
	ag := startAgent()
	dp, err := loader.Open(pins)
	must(t, err)
	t.Cleanup(func() { dp.Close() })

	// The container that ran before the agent: adopted at its start, named
	// from the engine's list.
	ep1 := waitAdopted(t, dp, web1, 5*time.Second)
	waitFor(t, 5*time.Second, "host -> web-1", func() bool { return netenv.Ping(t, l.Node, web1.ip, 1).Received == 1 })
	netenv.MustPing(t, c1, u.Node4.Addr(), 3)

	// A container started while the agent runs: served within a second of
	// `docker run` returning.
	web2, returned := e.run("web-2")
	adoptedIn := waitAdoptedSince(t, dp, web2, returned, time.Second)
	c2 := openNS(t, web2)
	r := netenv.Ping(t, l.Node, web2.ip, 1)
	hostIn := time.Since(returned)
	back := netenv.Ping(t, c2, u.Node4.Addr(), 1)
	t.Logf("web-2: adopted %s after docker run returned, host -> web-2 answered at %s, web-2 -> host at %s",
		adoptedIn.Round(time.Millisecond), hostIn.Round(time.Millisecond), time.Since(returned).Round(time.Millisecond))
	if r.Received != 1 || back.Received != 1 {
		t.Fatalf("right after its adoption: host -> web-2 %v, web-2 -> host %v", r, back)
	}
	if hostIn > time.Second {
		t.Errorf("host -> web-2 answered %s after docker run returned, want within 1s", hostIn)
	}
	netenv.MustPing(t, l.Node, web2.ip, 3)
	netenv.MustPing(t, c2, u.Node4.Addr(), 3)
	checkMetricsPod(t, get, "web-1", "web-2")

	// Removed: unregistered.
	e.must("stop", "-t", "1", "web-2")
	e.must("rm", "web-2")
	c2.Close()
	waitFor(t, 5*time.Second, "web-2 unregistered after docker rm", func() bool {
		_, found := findAdopted(t, dp, web2.mac)
		return !found
	})

	// The agent restarts: the adoption is kept, same endpoint, same name.
	if !ag.Terminate(10 * time.Second) {
		t.Fatal("underpassd did not stop on SIGTERM")
	}
	ag = startAgent()
	if again := waitAdopted(t, dp, web1, 5*time.Second); again.ID != ep1.ID {
		t.Errorf("after an agent restart web-1 is endpoint %d, was %d", again.ID, ep1.ID)
	}
	netenv.MustPing(t, l.Node, web1.ip, 2)
	netenv.MustPing(t, c1, u.Node4.Addr(), 2)
	c1.Close()

	// The engine restarts: web-1 (restart policy always) comes back in a
	// new namespace, the agent reconnects and serves and names it, and a
	// container started after that too.
	e.stop()
	e.start()
	waitFor(t, 30*time.Second, "web-1 running again after the dockerd restart", func() bool {
		out, err := e.docker("inspect", "--format", "{{.State.Running}}", "web-1")
		return err == nil && out == "true"
	})
	web1 = e.inspect("web-1")
	waitAdopted(t, dp, web1, 5*time.Second)
	c1 = openNS(t, web1)
	waitFor(t, 5*time.Second, "host -> web-1 after the dockerd restart", func() bool { return netenv.Ping(t, l.Node, web1.ip, 1).Received == 1 })
	netenv.MustPing(t, c1, u.Node4.Addr(), 2)
	c1.Close()
	web3, returned := e.run("web-3")
	t.Logf("web-3 (after the dockerd restart): adopted %s after docker run returned", waitAdoptedSince(t, dp, web3, returned, time.Second).Round(time.Millisecond))
	netenv.MustPing(t, l.Node, web3.ip, 2)
	if n := strings.Count(ag.Out.String(), "docker: engine unreachable; retrying"); n != 1 {
		t.Errorf("the agent warned %d times that the engine was unreachable, want once per outage:\n%s", n, testutil.TailLines(ag.Out.String(), 30))
	}
	if !strings.Contains(ag.Out.String(), "docker: engine reachable again") {
		t.Errorf("the agent never logged reconnecting to the engine")
	}
	e.must("rm", "-f", "web-1", "web-3")
	waitFor(t, 5*time.Second, "every adopted endpoint unregistered after docker rm -f", func() bool {
		eps, err := datapath.Endpoints(&dp.Maps)
		must(t, err)
		for _, ep := range eps {
			if ep.Network == adopt.AdoptedNetwork {
				return false
			}
		}
		return true
	})
	t.Logf("whole test body %s", time.Since(start).Round(time.Millisecond))
}

func readFile(t *testing.T, path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		t.Error(err)
	}
	return string(b)
}

func openNS(t *testing.T, c container) *netenv.NS {
	t.Helper()
	n, err := netenv.OpenNS(c.name, c.sandboxKey)
	must(t, err)
	t.Cleanup(n.Close)
	return n
}

func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	testutil.WaitForEvery(t, timeout, 20*time.Millisecond, what, cond)
}

func findAdopted(t *testing.T, dp *loader.Objects, mac string) (datapath.Endpoint, bool) {
	t.Helper()
	eps, err := datapath.Endpoints(&dp.Maps)
	must(t, err)
	for _, ep := range eps {
		if ep.Network == adopt.AdoptedNetwork && ep.MAC.String() == mac {
			return ep, true
		}
	}
	return datapath.Endpoint{}, false
}

// waitAdopted waits for c's slave to be adopted under c's name.
func waitAdopted(t *testing.T, dp *loader.Objects, c container, timeout time.Duration) datapath.Endpoint {
	t.Helper()
	var ep datapath.Endpoint
	var found bool
	if !testutil.Poll(timeout, 10*time.Millisecond, func() bool {
		ep, found = findAdopted(t, dp, c.mac)
		return found && ep.PodName == c.name
	}) {
		t.Fatalf("%s (%s) not adopted under its name within %s: found %v, named %q", c.name, c.mac, timeout, found, ep.PodName)
	}
	return ep
}

// waitAdoptedSince waits until c is adopted and named, at most within of
// since, and says how long after since it was.
func waitAdoptedSince(t *testing.T, dp *loader.Objects, c container, since time.Time, within time.Duration) time.Duration {
	t.Helper()
	waitAdopted(t, dp, c, within+5*time.Second) // a slow engine fails the bound below, not the wait
	took := time.Since(since)
	if took > within {
		t.Errorf("%s adopted %s after docker run returned, want within %s", c.name, took.Round(time.Millisecond), within)
	}
	return took
}

// checkMetricsPod checks that /metrics labels the endpoints' series with
// the containers' names.
func checkMetricsPod(t *testing.T, get func(string) (int, string, error), names ...string) {
	t.Helper()
	code, body, err := get("/metrics")
	if err != nil || code != http.StatusOK {
		t.Fatalf("scrape /metrics: %d %v", code, err)
	}
	for _, n := range names {
		if !strings.Contains(body, `pod="`+n+`"`) {
			var lines []string
			for _, line := range strings.Split(body, "\n") {
				if strings.HasPrefix(line, "underpass_endpoint_packets_total") {
					lines = append(lines, line)
				}
			}
			t.Errorf("no /metrics series with pod=%q; underpass_endpoint_packets_total:\n%s", n, strings.Join(lines, "\n"))
		}
	}
}
