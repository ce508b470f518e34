// Package engines holds what the tests of real container engines
// (test/docker, test/podman) share: the agent binary their TestMain
// provides, the tools they require, running an engine's CLI and reading
// its inspect, the busybox-static image they import (nothing is pulled),
// a container as its engine reports it, the host paths a rootful engine
// leaves behind, and the checks that the agent adopted a container under
// its name, serves it in /metrics, unregistered it, and that nothing was
// left mounted. Each engine's own daemon, flags, configuration and test
// bodies stay in its test package.
package engines

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
	"testing"
	"time"

	"github.com/underpass-cni/underpass/internal/adopt"
	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
	"github.com/underpass-cni/underpass/internal/testutil"
	"github.com/underpass-cni/underpass/test/netenv"
)

const (
	// Busybox is busybox-static's binary, the whole of the tests' image.
	Busybox = "/bin/busybox"
	// MetricsAddr is where the agent under test serves /metrics, in the
	// lab's node namespace.
	MetricsAddr = "127.0.0.1:9775"
)

// AgentBin is the underpassd the tests run: the one in
// $UNDERPASS_AGENT_BINS when set, else one built into tmp. For a TestMain's
// setup.
func AgentBin(tmp string) (string, error) {
	if dir := os.Getenv("UNDERPASS_AGENT_BINS"); dir != "" {
		return filepath.Join(dir, "underpassd"), nil
	}
	bin := filepath.Join(tmp, "underpassd")
	return bin, testutil.BuildAgent(bin)
}

// Tool is a file a test needs and the Debian package it comes from.
type Tool struct{ Path, Package string }

// RequireTools fails the test (named after its engine, "Docker") unless
// every tool and busybox-static are installed.
func RequireTools(t *testing.T, engine string, tools ...Tool) {
	t.Helper()
	for _, tool := range append(tools, Tool{Busybox, "busybox-static"}) {
		if _, err := os.Stat(tool.Path); err != nil {
			t.Fatalf("the %s test needs %s from %s (make deps installs it): %v", engine, tool.Path, tool.Package, err)
		}
	}
}

// CLI runs an engine's command line tool, each run within 60s.
type CLI struct {
	T    *testing.T
	Name string // what errors call the tool: "docker"
	// Command is the tool's command for args, bound to ctx, with the
	// engine's own flags, environment and namespace.
	Command func(ctx context.Context, args ...string) *exec.Cmd
}

// Run runs the tool with args and is its trimmed output; an error says
// what the tool wrote on stderr.
func (c CLI) Run(args ...string) (string, error) { return c.RunIn(nil, args...) }

// RunIn is Run with stdin.
func (c CLI) RunIn(stdin io.Reader, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := c.Command(ctx, args...)
	cmd.Stdin = stdin
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("%s %s: %w: %s", c.Name, strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	return strings.TrimSpace(out.String()), nil
}

// Must is Run's output; an error fails the test.
func (c CLI) Must(args ...string) string {
	c.T.Helper()
	out, err := c.Run(args...)
	if err != nil {
		c.T.Fatal(err)
	}
	return out
}

// ImportBusybox imports busyboxImage as image.
func (c CLI) ImportBusybox(image string) {
	c.T.Helper()
	if _, err := c.RunIn(busyboxImage(c.T), "import", "-", image); err != nil {
		c.T.Fatal(err)
	}
}

// Inspect is the running container name as the engine's inspect reports
// it, with its addresses and MAC on network.
func (c CLI) Inspect(name, network string) Container {
	c.T.Helper()
	nw := `(index .NetworkSettings.Networks "` + network + `")`
	out := c.Must("inspect", "--format", `{{.Id}}|{{.NetworkSettings.SandboxKey}}|{{`+nw+`.IPAddress}}|{{`+nw+
		`.MacAddress}}|{{`+nw+`.GlobalIPv6Address}}`, name)
	f := strings.Split(out, "|")
	if len(f) != 5 {
		c.T.Fatalf("%s inspect %s: %q", c.Name, name, out)
	}
	ip, err := netip.ParseAddr(f[2])
	Must(c.T, err)
	ct := Container{Name: name, ID: f[0], SandboxKey: f[1], IP: ip, MAC: f[3]}
	if f[4] != "" {
		ct.IP6, err = netip.ParseAddr(f[4])
		Must(c.T, err)
	}
	return ct
}

// RangeOf is the /28 at the n-th address of u's IPv4 subnet, for an
// engine's network to allocate from, checked clear of the node's address
// and the gateway.
func RangeOf(t *testing.T, u *netenv.Uplink, n int) netip.Prefix {
	t.Helper()
	r := netip.PrefixFrom(netenv.NthAddr(u.Subnet4, n).Addr(), 28)
	if r.Contains(u.Node4.Addr()) || r.Contains(u.Gateway4) {
		t.Fatalf("range %s holds the node %s or the gateway %s", r, u.Node4, u.Gateway4)
	}
	return r
}

// busyboxImage is a tarball of busybox-static, /bin/busybox and the
// applets the tests run, for the engine to import as an image.
func busyboxImage(t *testing.T) *bytes.Buffer {
	t.Helper()
	bb, err := os.ReadFile(Busybox)
	Must(t, err)
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	Must(t, tw.WriteHeader(&tar.Header{Name: "bin/", Typeflag: tar.TypeDir, Mode: 0o755}))
	Must(t, tw.WriteHeader(&tar.Header{Name: "bin/busybox", Typeflag: tar.TypeReg, Mode: 0o755, Size: int64(len(bb))}))
	_, err = tw.Write(bb)
	Must(t, err)
	for _, applet := range []string{"sh", "sleep", "ip", "ping"} {
		Must(t, tw.WriteHeader(&tar.Header{Name: "bin/" + applet, Typeflag: tar.TypeSymlink, Linkname: "busybox", Mode: 0o777}))
	}
	Must(t, tw.Close())
	return &buf
}

// Container is a running container as its engine's inspect reports it.
type Container struct {
	Name       string
	ID         string
	IP         netip.Addr
	IP6        netip.Addr // its global IPv6 address, on a dual-stack network
	MAC        string
	SandboxKey string // its network namespace's pin
}

// Must fails the test on err.
func Must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// ReadFile is path's content; an error fails the test but lets it go on.
func ReadFile(t *testing.T, path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		t.Error(err)
	}
	return string(b)
}

// CheckNoMounts fails the test for every mount left below dir (after
// saying what should have removed them: "dockerd stopped"), and unmounts
// it lazily.
func CheckNoMounts(t *testing.T, dir, after string) {
	for _, line := range strings.Split(ReadFile(t, "/proc/mounts"), "\n") {
		if f := strings.Fields(line); len(f) > 1 && strings.HasPrefix(f[1], dir) {
			t.Errorf("left mounted after %s: %s", after, f[1])
			_ = exec.Command("umount", "-l", f[1]).Run()
		}
	}
}

// LeftBehind removes, when the test ends, the fixed host paths a rootful
// engine writes whatever its roots, if they did not exist before.
func LeftBehind(t *testing.T, paths ...string) {
	for _, p := range paths {
		if _, err := os.Stat(p); errors.Is(err, os.ErrNotExist) {
			t.Cleanup(func() { _ = os.RemoveAll(p) })
		}
	}
}

// OpenNS opens c's network namespace, closed when the test ends.
func OpenNS(t *testing.T, c Container) *netenv.NS {
	t.Helper()
	n, err := netenv.OpenNS(c.Name, c.SandboxKey)
	Must(t, err)
	t.Cleanup(n.Close)
	return n
}

// WaitFor waits up to timeout for cond, checked every 20ms, or fails the
// test saying what it waited for.
func WaitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	testutil.WaitForEvery(t, timeout, 20*time.Millisecond, what, cond)
}

func find(t *testing.T, dp *loader.Objects, match func(datapath.Endpoint) bool) (datapath.Endpoint, bool) {
	t.Helper()
	eps, err := datapath.Endpoints(&dp.Maps)
	Must(t, err)
	for _, ep := range eps {
		if match(ep) {
			return ep, true
		}
	}
	return datapath.Endpoint{}, false
}

// FindMAC is the first endpoint registered with mac, on any network.
func FindMAC(t *testing.T, dp *loader.Objects, mac string) (datapath.Endpoint, bool) {
	t.Helper()
	return find(t, dp, func(ep datapath.Endpoint) bool { return ep.MAC.String() == mac })
}

// FindAdopted is the endpoint the agent adopted with mac.
func FindAdopted(t *testing.T, dp *loader.Objects, mac string) (datapath.Endpoint, bool) {
	t.Helper()
	return find(t, dp, func(ep datapath.Endpoint) bool { return ep.Network == adopt.AdoptedNetwork && ep.MAC.String() == mac })
}

// WaitAdopted waits for c's slave to be adopted under c's name: the
// endpoint registered with its MAC is the agent's adoption, named after
// the container.
func WaitAdopted(t *testing.T, dp *loader.Objects, c Container, timeout time.Duration) datapath.Endpoint {
	t.Helper()
	var ep datapath.Endpoint
	var found bool
	if !testutil.Poll(timeout, 10*time.Millisecond, func() bool {
		ep, found = FindMAC(t, dp, c.MAC)
		return found && ep.Network == adopt.AdoptedNetwork && ep.PodName == c.Name
	}) {
		t.Fatalf("%s (%s) not adopted under its name within %s: found %v, network %q, named %q", c.Name, c.MAC, timeout, found, ep.Network, ep.PodName)
	}
	return ep
}

// WaitAdoptedSince waits (at most timeout: a functional bound, not a
// speed check) until c is adopted and named, and returns how long after
// since (what: e.g. "docker run returned") that was, for the test to
// report: wall-clock speed is a figure, never an assertion.
func WaitAdoptedSince(t *testing.T, dp *loader.Objects, c Container, since time.Time, what string, timeout time.Duration) time.Duration {
	t.Helper()
	WaitAdopted(t, dp, c, timeout)
	took := time.Since(since)
	t.Logf("%s adopted %s after %s", c.Name, took.Round(time.Millisecond), what)
	return took
}

// WaitNoneAdopted waits until the agent has no adopted endpoint left.
func WaitNoneAdopted(t *testing.T, dp *loader.Objects, timeout time.Duration, what string) {
	t.Helper()
	WaitFor(t, timeout, what, func() bool {
		_, found := find(t, dp, func(ep datapath.Endpoint) bool { return ep.Network == adopt.AdoptedNetwork })
		return !found
	})
}

// CheckMetricsPod checks that /metrics labels the endpoints' series with
// names (the containers').
func CheckMetricsPod(t *testing.T, get func(string) (int, string, error), names ...string) {
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

// MetricsGet is a GET of path on MetricsAddr in the lab's node namespace,
// its client's connections closed when the test ends.
func MetricsGet(t *testing.T, l *netenv.Env) func(path string) (int, string, error) {
	client := testutil.NetnsHTTPClient(l.Node.Do, 5*time.Second)
	t.Cleanup(client.CloseIdleConnections)
	return func(path string) (int, string, error) { return testutil.HTTPGet(client, "http://"+MetricsAddr+path) }
}

// CheckIsolated checks that the container whose namespace is ns, the
// endpoint ep, is isolated as a pod is, with the agent's staleServices
// holding 10.96.0.0/16: a stale Service address (10.96.0.99) from it is
// dropped and counted (stale_dropped), a forged source (a raw socket in
// its namespace, as a container with CAP_NET_RAW could send) is dropped
// and counted (spoofed_source), and neither reaches u's wire.
func CheckIsolated(t *testing.T, l *netenv.Env, u *netenv.Uplink, dp *loader.Objects, ns *netenv.NS, ep datapath.Endpoint) {
	t.Helper()
	stats := func() loader.EndpointStats {
		t.Helper()
		s, err := datapath.EndpointStats(&dp.Maps, ep.ID)
		Must(t, err)
		return s
	}
	// The gateway resolved first: a ping queued behind an ARP that is
	// slow to come back would be lost before the guard ever saw it.
	netenv.Ping(t, ns, u.Gateway4, 1)
	before := stats()
	stale := netip.MustParseAddr("10.96.0.99")
	toStale := netenv.StartCounter(t, l.Wire, u.Port, netenv.MatchDstIP(stale))
	toGW := netenv.StartCounter(t, l.Wire, u.Port, netenv.MatchDstIP(u.Gateway4))
	if r := netenv.Ping(t, ns, stale, 2); r.Received != 0 {
		t.Errorf("%s -> stale Service address %s answered: %v", ep.PodName, stale, r)
	}
	for range 3 {
		Must(t, netenv.SendForgedUDP4(ns, u.IP4(250).Addr(), u.Gateway4))
	}
	netenv.Barrier(t, l.Node, u.Name, toStale, toGW)
	after := stats()
	if d := after.StaleDropped - before.StaleDropped; d < 2 {
		t.Errorf("%s's stale_dropped moved by %d, want 2", ep.PodName, d)
	}
	if d := after.Drops[loader.DropSpoofedSource] - before.Drops[loader.DropSpoofedSource]; d < 3 {
		t.Errorf("%s's spoofed_source drops moved by %d, want 3", ep.PodName, d)
	}
	if n := toStale.Count() + toGW.Count(); n != 0 {
		t.Errorf("%d stale or forged frames from %s reached the wire", n, ep.PodName)
	}
	t.Logf("%s (endpoint %d): stale_dropped +%d, spoofed_source +%d, %d frames on the wire", ep.PodName, ep.ID,
		after.StaleDropped-before.StaleDropped, after.Drops[loader.DropSpoofedSource]-before.Drops[loader.DropSpoofedSource],
		toStale.Count()+toGW.Count())
}
