// Package podman_test runs the real Podman (Debian bookworm's podman 4.3)
// in a netenv node namespace, next to the real underpassd, with both of
// its network backends:
//
//   - netavark (Podman 4's default): a `podman network create -d macvlan`
//     network's containers are adopted by the agent's namespace scan
//     (adopt.parents), with no step per container, and named after the
//     container (read from its conmon's arguments); with the OCI hook
//     (deploy/podman) they are registered before their first process
//     runs, with no agent running;
//   - CNI: a conflist with the reference macvlan plugin and underpass
//     chained after it registers each container itself (named after the
//     container: Podman passes K8S_POD_NAME), and the agent's scan does
//     not adopt it a second time.
//
// Podman has its own root, runroot, tmpdir, network config dir,
// containers.conf and storage.conf under the test's temporary directory.
// What rootful Podman keeps in fixed places whatever its flags
// (netavark's IPAM db /run/containers/networks, libcni's cache
// /var/lib/cni, the image blob-info cache /var/lib/containers/cache) is
// removed again when the test made it. Images are imported from
// busybox-static: nothing is pulled.
package podman_test

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
	"github.com/underpass-cni/underpass/internal/testutil"
	"github.com/underpass-cni/underpass/test/engines"
	"github.com/underpass-cni/underpass/test/netenv"
)

var agentBin, ctlBin, pluginDir string

func TestMain(m *testing.M) {
	testutil.Main(m, "test/podman", func(tmp string) error {
		pluginDir = filepath.Join(tmp, "cni-bin")
		if err := os.Mkdir(pluginDir, 0o755); err != nil {
			return err
		}
		if err := testutil.BuildPlugin(filepath.Join(pluginDir, "underpass")); err != nil {
			return err
		}
		ctlBin = filepath.Join(tmp, "underpassctl")
		if err := testutil.BuildCommand(ctlBin, "underpassctl"); err != nil {
			return err
		}
		var err error
		agentBin, err = engines.AgentBin(tmp)
		return err
	})
}

const (
	podmanBin  = "/usr/bin/podman"
	netavark   = "/usr/lib/podman/netavark"
	cniPlugins = "/usr/lib/cni"
	image      = "localhost/underpass-busybox:test"
)

// podman is the podman CLI with its own roots and configuration, run in
// the lab's node namespace (so a macvlan's parent is the lab's uplink).
type podman struct {
	t   *testing.T
	l   *netenv.Env
	dir string
	env []string
	cli engines.CLI // podman with the flags for its roots, in the node namespace
}

// newPodman writes containers.conf and storage.conf for backend
// (netavark or cni) under dir, with hooksDir as its OCI hooks directory
// ("": none). In containers.conf: cgroupfs (no systemd
// here) and default ulimits within what the test's root may set (without
// CAP_SYS_RESOURCE runc fails to raise nofile/nproc to Podman's
// defaults), file locks and an events file of its own instead of the
// host-wide shm locks and journal.
func newPodman(t *testing.T, l *netenv.Env, dir, backend, hooksDir string) *podman {
	t.Helper()
	p := &podman{t: t, l: l, dir: dir}
	p.cli = engines.CLI{T: t, Name: "podman", Command: func(ctx context.Context, args ...string) *exec.Cmd {
		cmd := l.Node.Command(ctx, podmanBin, append([]string{"--root", filepath.Join(dir, "root"), "--runroot", filepath.Join(dir, "run"),
			"--tmpdir", filepath.Join(dir, "tmp")}, args...)...)
		cmd.Env = p.env
		return cmd
	}}
	hooks := ""
	if hooksDir != "" {
		hooks = fmt.Sprintf("hooks_dir = [%q]", hooksDir)
	}
	conf := fmt.Sprintf(`[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = %[1]q
lock_type = "file"
tmp_dir = %[2]q
volume_path = %[3]q
static_dir = %[4]q
%[9]s
[network]
network_backend = %[5]q
network_config_dir = %[6]q
cni_plugin_dirs = [%[7]q, %[8]q]
`, filepath.Join(dir, "events.log"), filepath.Join(dir, "tmp"), filepath.Join(dir, "volumes"),
		filepath.Join(dir, "root", "libpod"), backend, p.networkDir(), pluginDir, cniPlugins, hooks)
	storage := fmt.Sprintf("[storage]\ndriver = \"overlay\"\nrunroot = %q\ngraphroot = %q\n",
		filepath.Join(dir, "run"), filepath.Join(dir, "root"))
	engines.Must(t, os.MkdirAll(p.networkDir(), 0o755))
	engines.Must(t, os.WriteFile(filepath.Join(dir, "containers.conf"), []byte(conf), 0o644))
	engines.Must(t, os.WriteFile(filepath.Join(dir, "storage.conf"), []byte(storage), 0o644))
	p.env = append(os.Environ(), "CONTAINERS_CONF="+filepath.Join(dir, "containers.conf"),
		"CONTAINERS_STORAGE_CONF="+filepath.Join(dir, "storage.conf"), "CONTAINERS_REGISTRIES_CONF=/dev/null")
	t.Cleanup(func() {
		// Every container and its network torn down (netavark or CNI DEL),
		// then nothing of Podman's may be left mounted.
		if out, err := p.podman("rm", "-a", "-f", "-t", "0"); err != nil {
			t.Errorf("podman rm -a -f: %v %s", err, out)
		}
		engines.CheckNoMounts(t, dir, "podman rm -a")
	})
	if got := p.must("info", "--format", "{{.Host.NetworkBackend}}"); got != backend {
		t.Fatalf("podman info: network backend %q, want %q", got, backend)
	}
	return p
}

func (p *podman) networkDir() string { return filepath.Join(p.dir, "networks") }

func (p *podman) podman(args ...string) (string, error) { return p.cli.Run(args...) }

func (p *podman) must(args ...string) string {
	p.t.Helper()
	return p.cli.Must(args...)
}

// run starts a container on network and returns it, with the time
// `podman run` returned.
func (p *podman) run(name, network string) (engines.Container, time.Time) {
	p.t.Helper()
	p.must("run", "-d", "--name", name, "--network", network, image, "sleep", "1000")
	returned := time.Now()
	return p.cli.Inspect(name, network), returned
}

// lab is a netenv lab with the agent's pins, a temporary directory, and
// the agent to start on it.
type lab struct {
	l    *netenv.Env
	u    *netenv.Uplink
	pins string
	tmp  string
	get  func(string) (int, string, error)
}

func newLab(t *testing.T) *lab {
	l := netenv.New(t, netenv.Options{})
	lb := &lab{l: l, u: l.Uplinks[0], pins: filepath.Join(testutil.MountBPFFS(t), "underpass"), tmp: t.TempDir()}
	engines.LeftBehind(t, "/run/containers", "/var/lib/cni", "/var/lib/containers")
	lb.get = engines.MetricsGet(t, l)
	return lb
}

// startAgent starts underpassd adopting the uplink's slaves, with
// 10.96.0.0/16 as stale Service addresses (engines.CheckIsolated), and
// opens its pinned datapath.
func (lb *lab) startAgent(t *testing.T) (*testutil.Agent, *loader.Objects) {
	ag := lb.agent(t)
	dp, err := loader.Open(lb.pins)
	engines.Must(t, err)
	t.Cleanup(func() { dp.Close() })
	return ag, dp
}

// agent starts underpassd (again) and waits until it is ready.
func (lb *lab) agent(t *testing.T) *testutil.Agent {
	cfg := lb.config(t)
	ag := testutil.StartAgent(t, "underpassd", lb.l.Node.Command(context.Background(), agentBin, "--config", cfg, "--log-level", "debug"), 0)
	ag.WaitReady(t, lb.get, 60*time.Second)
	return ag
}

// config writes the agent's config file (the OCI hook reads it too) and
// returns its path.
func (lb *lab) config(t *testing.T) string {
	cfg := filepath.Join(lb.tmp, "underpass.yaml")
	engines.Must(t, os.WriteFile(cfg, []byte(fmt.Sprintf("bpffs: %s\nmetrics: {listen: %q}\ngcInterval: 1s\nstaleServices: {cidrs: [10.96.0.0/16]}\nadopt: {parents: [%s]}\n",
		lb.pins, engines.MetricsAddr, lb.u.Name)), 0o644))
	return cfg
}

// A Podman macvlan network with the netavark backend: its containers are
// adopted by the agent's namespace scan (Podman pins their namespaces in
// /run/netns), named after the container.
func TestPodmanNetavark(t *testing.T) {
	testutil.RequireRoot(t)
	requireTools(t, engines.Tool{Path: netavark, Package: "netavark"})
	start := time.Now()
	lb := newLab(t)
	p := newPodman(t, lb.l, filepath.Join(lb.tmp, "podman"), "netavark", "")
	p.cli.ImportBusybox(image)
	// The network's name is in netavark's IPAM db, which rootful Podman
	// shares host-wide (/run/containers/networks/ipam.db): one of this
	// run's own.
	network := fmt.Sprintf("upmv%d", os.Getpid())
	p.must("network", "create", "-d", "macvlan", "-o", "parent="+lb.u.Name, "--subnet", lb.u.Subnet4.Masked().String(),
		"--gateway", lb.u.Gateway4.String(), "--ip-range", engines.RangeOf(t, lb.u, 64).String(), network)
	t.Logf("podman ready, network created %s after the lab", time.Since(start).Round(time.Millisecond))

	// The baseline: no agent, macvlan does not connect a slave with its parent.
	web1, _ := p.run("web-1", network)
	if !strings.HasPrefix(web1.SandboxKey, "/run/netns/netns-") {
		t.Errorf("web-1's netns is pinned at %s, not /run/netns/netns-<uuid> the agent scans", web1.SandboxKey)
	}
	c1 := engines.OpenNS(t, web1)
	if r := netenv.Ping(t, lb.l.Node, web1.IP, 2); r.Received != 0 {
		t.Fatalf("host -> Podman macvlan container answered before underpass: %v", r)
	}
	if r := netenv.Ping(t, c1, lb.u.Node4.Addr(), 2); r.Received != 0 {
		t.Fatalf("Podman macvlan container -> host answered before underpass: %v", r)
	}

	ag, dp := lb.startAgent(t)
	// The container that ran before the agent: adopted at its start, named
	// after the container.
	ep1 := engines.WaitAdopted(t, dp, web1, 5*time.Second)
	engines.WaitFor(t, 5*time.Second, "host -> web-1", func() bool { return netenv.Ping(t, lb.l.Node, web1.IP, 1).Received == 1 })
	netenv.MustPing(t, c1, lb.u.Node4.Addr(), 3)

	// A container started while the agent runs: found by the next scan
	// (once a second), so served within 2 s of `podman run` returning.
	web2, returned := p.run("web-2", network)
	adoptedIn := engines.WaitAdoptedSince(t, dp, web2, returned, "podman run returned", 10*time.Second)
	c2 := engines.OpenNS(t, web2)
	r := netenv.Ping(t, lb.l.Node, web2.IP, 1)
	hostIn := time.Since(returned)
	back := netenv.Ping(t, c2, lb.u.Node4.Addr(), 1)
	t.Logf("web-2: adopted %s after podman run returned, host -> web-2 answered at %s, web-2 -> host at %s",
		adoptedIn.Round(time.Millisecond), hostIn.Round(time.Millisecond), time.Since(returned).Round(time.Millisecond))
	if r.Received != 1 || back.Received != 1 {
		t.Fatalf("right after its adoption: host -> web-2 %v, web-2 -> host %v", r, back)
	}
	netenv.MustPing(t, lb.l.Node, web2.IP, 3)
	netenv.MustPing(t, c2, lb.u.Node4.Addr(), 3)
	engines.CheckMetricsPod(t, lb.get, podName(web1), podName(web2))

	// Isolated as a pod is: a stale Service address and a forged source
	// from web-2 are dropped and counted, and reach no wire.
	ep2, _ := engines.FindAdopted(t, dp, web2.MAC)
	engines.CheckIsolated(t, lb.l, lb.u, dp, c2, ep2)

	// Removed: unregistered at the next scan.
	c2.Close()
	p.must("rm", "-f", "-t", "0", "web-2")
	removed := time.Now()
	engines.WaitFor(t, 5*time.Second, "web-2 unregistered after podman rm -f", func() bool {
		_, found := engines.FindMAC(t, dp, web2.MAC)
		return !found
	})
	t.Logf("web-2 unregistered %s after podman rm -f returned", time.Since(removed).Round(time.Millisecond))

	// The agent restarts: the adoption is kept, same endpoint, same name.
	if !ag.Terminate(10 * time.Second) {
		t.Fatal("underpassd did not stop on SIGTERM")
	}
	lb.agent(t)
	if again := engines.WaitAdopted(t, dp, web1, 5*time.Second); again.ID != ep1.ID {
		t.Errorf("after an agent restart web-1 is endpoint %d, was %d", again.ID, ep1.ID)
	} else {
		t.Logf("after an agent restart web-1 is still endpoint %d, named %q", again.ID, again.PodName)
	}
	netenv.MustPing(t, lb.l.Node, web1.IP, 2)
	netenv.MustPing(t, c1, lb.u.Node4.Addr(), 2)
	c1.Close()
	p.must("rm", "-f", "-t", "0", "web-1")
	engines.WaitNoneAdopted(t, dp, 5*time.Second, "every adopted endpoint unregistered after podman rm -f")
	p.must("network", "rm", network)
	t.Logf("whole test body %s", time.Since(start).Round(time.Millisecond))
}

// Podman's OCI hook (deploy/podman/underpass.json, stage createRuntime):
// `underpassctl oci-hook` registers a netavark container's slave before the
// container's first process runs, so none of its frames leaves unguarded,
// even with no agent running: the agent's scan would serve it only up to a
// second later. The hook fails a container on an adopted parent when it
// cannot register it (no datapath pinned), and leaves every other
// container alone. The agent's scan then keeps what the hook registered
// (the same endpoint) and unregisters it when the container goes.
func TestPodmanOCIHook(t *testing.T) {
	testutil.RequireRoot(t)
	requireTools(t, engines.Tool{Path: netavark, Package: "netavark"})
	lb := newLab(t)
	cfg := lb.config(t)
	// The shipped hook file, pointed at this test's binary and config.
	hooks := filepath.Join(lb.tmp, "hooks.d")
	engines.Must(t, os.MkdirAll(hooks, 0o755))
	hook := engines.ReadFile(t, "../../deploy/podman/underpass.json")
	for _, s := range []string{`"/usr/local/bin/underpassctl"`, `"/etc/underpass/underpass.yaml"`, `"createRuntime"`} {
		if !strings.Contains(hook, s) {
			t.Fatalf("deploy/podman/underpass.json does not hold %s:\n%s", s, hook)
		}
	}
	hook = strings.NewReplacer("/usr/local/bin/underpassctl", ctlBin, "/etc/underpass/underpass.yaml", cfg).Replace(hook)
	engines.Must(t, os.WriteFile(filepath.Join(hooks, "underpass.json"), []byte(hook), 0o644))
	p := newPodman(t, lb.l, filepath.Join(lb.tmp, "podman"), "netavark", hooks)
	p.cli.ImportBusybox(image)
	network := fmt.Sprintf("uphk%d", os.Getpid())
	p.must("network", "create", "-d", "macvlan", "-o", "parent="+lb.u.Name, "--subnet", lb.u.Subnet4.Masked().String(),
		"--gateway", lb.u.Gateway4.String(), "--ip-range", engines.RangeOf(t, lb.u, 64).String(),
		"--ipv6", "--subnet", lb.u.Subnet6.Masked().String(), "--gateway", lb.u.Gateway6.String(),
		"--ip-range", netip.PrefixFrom(netenv.NthAddr(lb.u.Subnet6, 0x64).Addr(), 124).String(), network)

	// Nothing pinned yet: a container with a slave on the adopted parent
	// does not start, and says why; one without (no network) starts.
	_, err := p.podman("run", "-d", "--name", "early", "--network", network, image, "sleep", "1000")
	if err == nil || !strings.Contains(err.Error(), "start underpassd") {
		t.Errorf("podman run on %s with no datapath pinned: %v, want the hook's error naming underpassd", network, err)
	}
	p.must("rm", "-i", "-f", "-t", "0", "early")
	p.must("run", "--rm", "--network", "none", image, "sleep", "0")
	// A config with a typo: which parents are underpass's is unknown, so a
	// container with a macvlan slave is refused, naming the file, and one
	// without is not.
	good := engines.ReadFile(t, cfg)
	engines.Must(t, os.WriteFile(cfg, []byte("adopt: {parents: ["+lb.u.Name+"]\n"), 0o644))
	_, err = p.podman("run", "-d", "--name", "typo", "--network", network, image, "sleep", "1000")
	if err == nil || !strings.Contains(err.Error(), cfg) {
		t.Errorf("podman run on %s with a broken agent config: %v, want the hook's error naming %s", network, err, cfg)
	}
	p.must("rm", "-i", "-f", "-t", "0", "typo")
	p.must("run", "--rm", "--network", "none", image, "sleep", "0")
	engines.Must(t, os.WriteFile(cfg, []byte(good), 0o644))

	// The agent pins the datapath and stops: from here only the hook can
	// register a container.
	if ag := lb.agent(t); !ag.Terminate(10 * time.Second) {
		t.Fatal("underpassd did not stop on SIGTERM")
	}
	dp, err := loader.Open(lb.pins)
	engines.Must(t, err)
	t.Cleanup(func() { dp.Close() })
	before := time.Now()
	web, returned := p.run("hook-1", network)
	ep, found := engines.FindAdopted(t, dp, web.MAC)
	if !found {
		t.Fatalf("hook-1 (%s) not registered when podman run returned, with no agent running", web.MAC)
	}
	if ep.PodName != web.Name || ep.Netns != web.SandboxKey {
		t.Errorf("the hook registered hook-1 as %q in %s, want %q in %s (as the agent's scan names it)",
			ep.PodName, ep.Netns, web.Name, web.SandboxKey)
	}
	t.Logf("the hook registered hook-1 as endpoint %d with %v; podman run took %s (the hook waits for IPv6 DAD)",
		ep.ID, ep.Addrs, returned.Sub(before).Round(time.Millisecond))
	for _, a := range []netip.Addr{web.IP, web.IP6} {
		if !slices.ContainsFunc(ep.Addrs, func(p netip.Prefix) bool { return p.Addr() == a }) {
			t.Errorf("the hook registered hook-1 with %v, want %v among them", ep.Addrs, a)
		}
	}
	c := engines.OpenNS(t, web)
	netenv.MustPing(t, lb.l.Node, web.IP, 3)
	netenv.MustPing(t, c, lb.u.Node4.Addr(), 3)
	netenv.MustPing(t, lb.l.Node, web.IP6, 3)
	netenv.MustPing(t, c, lb.u.Node6.Addr(), 3)
	engines.CheckIsolated(t, lb.l, lb.u, dp, c, ep)

	// The agent again: a few scans later the hook's registration is kept,
	// the same endpoint, never registered again (the id alone would not
	// tell: it is derived from the container id and interface), and podman
	// rm unregisters it at the next scan.
	ag := lb.agent(t)
	time.Sleep(2500 * time.Millisecond)
	if again, found := engines.FindAdopted(t, dp, web.MAC); !found || again.ID != ep.ID || again.PodName != ep.PodName {
		t.Errorf("after 2.5 s of the agent's scans hook-1 is %+v (found %v), was endpoint %d %q", again, found, ep.ID, ep.PodName)
	}
	for _, line := range strings.Split(ag.Out.String(), "\n") {
		if strings.Contains(line, `msg="adopt: registered"`) && strings.Contains(line, "name=hook-1") {
			t.Errorf("the agent registered hook-1 again over the hook's registration: %s", line)
		}
	}
	netenv.MustPing(t, lb.l.Node, web.IP, 2)
	c.Close()
	p.must("rm", "-f", "-t", "0", "hook-1")
	engines.WaitNoneAdopted(t, dp, 5*time.Second, "hook-1 unregistered after podman rm -f")
	p.must("network", "rm", network)
}

// A Podman network with the CNI backend, the reference macvlan plugin and
// underpass chained after it: the plugin registers the container, under
// the conflist's network name and the container's name; the agent, though
// adopting the same parent, does not register it a second time; podman rm
// unregisters it through CNI DEL.
func TestPodmanCNI(t *testing.T) {
	testutil.RequireRoot(t)
	requireTools(t, engines.Tool{Path: filepath.Join(cniPlugins, "macvlan"), Package: "containernetworking-plugins"},
		engines.Tool{Path: filepath.Join(cniPlugins, "host-local"), Package: "containernetworking-plugins"})
	start := time.Now()
	lb := newLab(t)
	p := newPodman(t, lb.l, filepath.Join(lb.tmp, "podman"), "cni", "")
	p.cli.ImportBusybox(image)
	network := "upcni"
	r := engines.RangeOf(t, lb.u, 80)
	ipam := filepath.Join(lb.tmp, "ipam")
	conflist := fmt.Sprintf(`{
  "cniVersion": "1.0.0",
  "name": %q,
  "plugins": [
    {"type": "macvlan", "master": %q, "mode": "bridge",
     "ipam": {"type": "host-local", "dataDir": %q,
              "ranges": [[{"subnet": %q, "rangeStart": %q, "rangeEnd": %q, "gateway": %q}]],
              "routes": [{"dst": "0.0.0.0/0"}]}},
    {"type": "underpass", "bpffs": %q}
  ]
}
`, network, lb.u.Name, ipam, lb.u.Subnet4.Masked().String(), r.Addr().String(), netenv.NthAddr(r, 14).Addr().String(),
		lb.u.Gateway4.String(), lb.pins)
	engines.Must(t, os.WriteFile(filepath.Join(p.networkDir(), network+".conflist"), []byte(conflist), 0o644))
	if out := p.must("network", "ls", "--format", "{{.Name}}"); !strings.Contains(out, network) {
		t.Fatalf("podman network ls does not list %s:\n%s", network, out)
	}

	// Without the agent the chained plugin refuses ADD (nothing pinned), so
	// podman run fails, and leaves no address taken.
	_, err := p.podman("run", "-d", "--name", "early", "--network", network, image, "sleep", "1000")
	if err == nil || !strings.Contains(err.Error(), "underpassd") {
		t.Errorf("podman run with no agent: %v, want the plugin's error naming underpassd", err)
	}
	p.must("rm", "-i", "-f", "-t", "0", "early")
	if leases := ipamLeases(t, ipam, network); len(leases) != 0 {
		t.Errorf("host-local leases left by the failed ADD: %v", leases)
	}

	_, dp := lb.startAgent(t)
	web, returned := p.run("web-c", network)
	ep, found := engines.FindMAC(t, dp, web.MAC)
	if !found {
		t.Fatalf("web-c (%s) not registered when podman run returned", web.MAC)
	}
	t.Logf("web-c registered by the plugin: network %q, pod %q/%q, container id %s, interface %s",
		ep.Network, ep.PodNamespace, ep.PodName, ep.ContainerID, ep.IfName)
	if ep.Network != network || ep.PodName != web.Name || ep.ContainerID != web.ID {
		t.Errorf("web-c registered as network %q pod %q container %s, want %q, %q, %s",
			ep.Network, ep.PodName, ep.ContainerID, network, web.Name, web.ID)
	}
	c := engines.OpenNS(t, web)
	netenv.MustPing(t, lb.l.Node, web.IP, 3)
	netenv.MustPing(t, c, lb.u.Node4.Addr(), 3)
	t.Logf("host <-> web-c both ways %s after podman run returned", time.Since(returned).Round(time.Millisecond))
	// The agent adopts the same parent's slaves: a few scans later, still
	// one registration, the plugin's.
	time.Sleep(2500 * time.Millisecond)
	eps, err := datapath.Endpoints(&dp.Maps)
	engines.Must(t, err)
	var regs []string
	for _, e := range eps {
		if e.MAC.String() == web.MAC {
			regs = append(regs, fmt.Sprintf("%s/%s", e.Network, e.PodName))
		}
	}
	if len(regs) != 1 || regs[0] != network+"/"+web.Name {
		t.Errorf("web-c's registrations after 2.5s of the agent's scans: %v, want only %s/%s", regs, network, web.Name)
	}
	engines.CheckMetricsPod(t, lb.get, web.Name)

	// Isolated as a pod is, the plugin's registration (found by MAC): a
	// stale Service address and a forged source from web-c are dropped and
	// counted, and reach no wire.
	ep, _ = engines.FindMAC(t, dp, web.MAC)
	engines.CheckIsolated(t, lb.l, lb.u, dp, c, ep)

	// podman rm: CNI DEL unregisters it before podman returns, and the
	// lease goes.
	c.Close()
	p.must("rm", "-f", "-t", "0", "web-c")
	if _, found := engines.FindMAC(t, dp, web.MAC); found {
		t.Errorf("web-c still registered when podman rm -f returned")
	}
	if leases := ipamLeases(t, ipam, network); len(leases) != 0 {
		t.Errorf("host-local leases left after podman rm: %v", leases)
	}
	t.Logf("whole test body %s", time.Since(start).Round(time.Millisecond))
}

// ipamLeases are host-local's lease files for network (addresses).
func ipamLeases(t *testing.T, dir, network string) []string {
	entries, err := os.ReadDir(filepath.Join(dir, network))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	engines.Must(t, err)
	var out []string
	for _, e := range entries {
		if _, err := netip.ParseAddr(e.Name()); err == nil {
			out = append(out, e.Name())
		}
	}
	return out
}

// requireTools fails the test unless Podman, busybox-static and tools are
// installed.
func requireTools(t *testing.T, tools ...engines.Tool) {
	t.Helper()
	engines.RequireTools(t, "Podman", append(tools, engines.Tool{Path: podmanBin, Package: "podman"})...)
}

// podName is what an adopted Podman container is called: its name, which
// the agent reads from the arguments of its conmon, the parent of the
// container's processes.
func podName(c engines.Container) string { return c.Name }
