//go:build linux

package main

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
	"time"

	"github.com/underpass-cni/underpass/internal/testutil"
	dd "github.com/underpass-cni/underpass/test/demo/docker"
	"github.com/underpass-cni/underpass/test/demo/kit"
	"github.com/underpass-cni/underpass/test/netenv"
)

// demoRun is one run of the Docker demo.
type demoRun struct {
	kit.Narrator // its output and the steps so far

	bin   string
	start time.Time
	wait  bool

	wire, node *netenv.NS

	dockerd     *exec.Cmd
	dockerdDone chan struct{}
	dockerLog   *os.File

	agent *kit.Agent

	containers map[string]container
}

// container is a running container as docker inspect reports it.
type container struct {
	name, id, ip, mac, sandbox string
}

func (d *demoRun) main() int {
	fmt.Fprintf(d.Out, "underpass Docker demo: Docker macvlan containers on a node built from network namespaces\n")
	fmt.Fprintf(d.Out, "  binaries %s, state %s, pins %s\n", d.bin, dd.StateDir, dd.BPFFS)
	return d.RunScene(leftoversButLock, d.cleanup, d.play)
}

// play is the scene, its summary, and with DEMO_WAIT=1 the wait for
// Ctrl-C.
func (d *demoRun) play(ctx context.Context) int {
	ok := d.scene(ctx)
	if ctx.Err() != nil {
		fmt.Fprintf(d.Out, "\nInterrupted.\n")
		return 1
	}
	d.summary(ok)
	if !ok || d.Failed > 0 {
		d.showLog("underpassd", agentLogPath, 30)
		d.showLog("dockerd", dockerLogPath, 20)
		return 1
	}
	if d.wait {
		fmt.Fprintf(d.Out, "\nThe node stays up (DEMO_WAIT=1): try the commands above. Press Ctrl-C to stop the demo and clean up.\n")
		<-ctx.Done()
	}
	return 0
}

func (d *demoRun) summary(complete bool) {
	fmt.Fprintf(d.Out, "\n── Summary\n")
	fmt.Fprintf(d.Out, "  Without underpass the node could not reach its own Docker macvlan container (nor it the node).\n")
	fmt.Fprintf(d.Out, "  With underpassd following dockerd (adopt.docker) every container was served at docker run,\n")
	fmt.Fprintf(d.Out, "  named after the container in the registry, underpassctl and /metrics, and unregistered at docker rm:\n")
	fmt.Fprintf(d.Out, "  no CNI, no command per container.\n")
	switch {
	case d.Failed == 0 && complete:
		fmt.Fprintf(d.Out, "\nAll %d steps passed in %s.\n", d.Steps, time.Since(d.start).Round(100*time.Millisecond))
	case d.Failed == 0:
		fmt.Fprintf(d.Out, "\nThe demo stopped after %d steps.\n", d.Steps)
	default:
		fmt.Fprintf(d.Out, "\n%d of %d steps FAILED.\n", d.Failed, d.Steps)
	}
}

// scene runs the steps; false means it could not go on.
func (d *demoRun) scene(ctx context.Context) bool {
	for _, p := range []string{filepath.Join(d.bin, "underpassd"), filepath.Join(d.bin, "underpassctl")} {
		if _, err := os.Stat(p); err != nil {
			d.Fail("%s not found: run make build (or make demo-docker)", p)
			return false
		}
	}
	for _, tool := range [][2]string{{dockerd, "docker.io"}, {dockerCLI, "docker.io"}, {busybox, "busybox-static"}, {"/usr/bin/nsenter", "util-linux"}} {
		if _, err := os.Stat(tool[0]); err != nil {
			d.Fail("the Docker demo needs %s from Debian's %s (make deps installs it)", tool[0], tool[1])
			return false
		}
	}
	if err := os.MkdirAll(dockerDir, 0o700); err != nil {
		d.Fail("%v", err)
		return false
	}

	if !d.LabSection(dd.Names, labSpec, d.buildLab) {
		return false
	}
	d.OK("%s: eth0 %s/%d is the parent NIC (a veth plugged into br0)", d.node.Name, nodeAddr, subnet.Bits())
	if ctx.Err() != nil {
		return false
	}

	d.Section("2. Docker: its own dockerd in the node netns")
	if err := d.startDockerd(ctx); err != nil {
		d.Fail("dockerd: %v", err)
		return false
	}
	if err := d.importImage(); err != nil {
		d.Fail("docker import: %v", err)
		return false
	}
	d.OK("image %s imported from busybox-static (nothing pulled)", image)
	args := []string{"network", "create", "-d", "macvlan", "-o", "parent=eth0", "--subnet", subnet.String(),
		"--gateway", gateway.String(), "--ip-range", ipRange.String(), network}
	if _, err := d.docker(ctx, args...); err != nil {
		d.Fail("%v", err)
		return false
	}
	d.OK("docker %s", strings.Join(args, " "))
	d.Detail("--ip-range keeps Docker's addresses clear of the node (%s) and the gateway (%s)", nodeAddr, gateway)
	if ctx.Err() != nil {
		return false
	}

	d.Section("3. The baseline: plain macvlan, no agent")
	web1, err := d.run(ctx, "web-1")
	if err != nil {
		d.Fail("%v", err)
		return false
	}
	d.OK("docker run --network %s --name web-1: %s, mac %s", network, web1.ip, web1.mac)
	d.pingExpect(d.node, "the node", web1.ip, "web-1", false)
	if n, err := d.openContainerNS(web1); err == nil {
		d.pingExpect(n, "web-1", nodeAddr.String(), "the node", false)
		n.Close()
	} else {
		d.Fail("%v", err)
	}
	d.Detail("macvlan never delivers between a parent and its own slaves: the node cannot reach its containers")
	if ctx.Err() != nil {
		return false
	}

	d.Section("4. The agent: underpassd in the node netns, following dockerd (adopt.docker)")
	if err := d.startAgent(ctx); err != nil {
		d.Fail("underpassd: %v", err)
		return false
	}
	d.waitAdopted(ctx, "web-1", true, "web-1 (running before the agent) adopted at its start")
	web2, err := d.run(ctx, "web-2")
	if err != nil {
		d.Fail("%v", err)
		return false
	}
	returned := time.Now()
	d.OK("docker run --network %s --name web-2: %s, mac %s", network, web2.ip, web2.mac)
	d.waitAdopted(ctx, "web-2", true, fmt.Sprintf("web-2 adopted after docker run returned (within %%s)"), returned)
	if ctx.Err() != nil {
		return false
	}

	d.Section("5. Node <-> container, through the hairpin on eth0")
	for _, c := range []container{web1, web2} {
		d.pingExpect(d.node, "the node", c.ip, c.name, true)
		if n, err := d.openContainerNS(c); err == nil {
			d.pingExpect(n, c.name, nodeAddr.String(), "the node", true)
			n.Close()
		} else {
			d.Fail("%v", err)
		}
	}
	if n, err := d.openContainerNS(web1); err == nil {
		d.pingExpect(n, "web-1", web2.ip, "web-2", true)
		n.Close()
	}
	if ctx.Err() != nil {
		return false
	}

	d.Section("6. underpassctl (run in the node netns): the endpoints under their container names, and their counters")
	if out, err := d.ctl(ctx, "endpoints"); d.Check(err == nil && strings.Contains(out, "web-1") && strings.Contains(out, "web-2"),
		"underpassctl --bpffs %s endpoints lists web-1 and web-2", dd.BPFFS) {
		d.Detail("%s", out)
	} else {
		d.Detail("%v\n%s", err, out)
	}
	if out, err := d.ctl(ctx, "stats"); d.Check(err == nil && strings.Contains(out, "web-1") && strings.Contains(out, "web-2"),
		"underpassctl --bpffs %s stats", dd.BPFFS) {
		d.Detail("%s", out)
	} else {
		d.Detail("%v\n%s", err, out)
	}
	d.metricsPerContainer("web-1", "web-2")
	if ctx.Err() != nil {
		return false
	}

	d.Section("7. docker rm: the endpoint goes with the container")
	if _, err := d.docker(ctx, "rm", "-f", "web-2"); err != nil {
		d.Fail("%v", err)
	} else {
		removed := time.Now()
		d.OK("docker rm -f web-2")
		d.waitAdopted(ctx, "web-2", false, "web-2 unregistered after docker rm (within %s)", removed)
		if out, err := d.ctl(ctx, "endpoints"); d.Check(err == nil && strings.Contains(out, "web-1") && !strings.Contains(out, "web-2"),
			"underpassctl endpoints: web-1 only") {
			d.Detail("%s", out)
		} else {
			d.Detail("%v\n%s", err, out)
		}
	}

	fmt.Fprintf(d.Out, "\n  Try it yourself (with DEMO_WAIT=1, in another terminal):\n")
	fmt.Fprintf(d.Out, "    sudo %s -H unix://%s ps\n", dockerCLI, dockerSock)
	fmt.Fprintf(d.Out, "    sudo nsenter --net=%s %s --bpffs %s endpoints\n", d.node.Path, filepath.Join(d.bin, "underpassctl"), dd.BPFFS)
	fmt.Fprintf(d.Out, "    sudo nsenter --net=%s curl -s http://%s/metrics | grep 'pod=\"web-1\"'\n", d.node.Path, dd.MetricsAddr)
	return ctx.Err() == nil
}

var labSpec = kit.LabSpec{Subnet: subnet, Gateway: gateway, NodeAddr: nodeAddr}

// buildLab creates the wire and node namespaces, the bridge and the veth.
func (d *demoRun) buildLab() error {
	var err error
	d.wire, d.node, err = dd.Names.BuildLab(labSpec)
	return err
}

// startDockerd starts dockerd in the node netns with its own roots and no
// iptables or bridge, and waits until it answers.
func (d *demoRun) startDockerd(ctx context.Context) error {
	if _, err := os.Stat(dd.TrustKey); errors.Is(err, os.ErrNotExist) {
		if err := os.WriteFile(dd.KeyMarker, nil, 0o644); err != nil {
			return err
		}
	}
	log, err := os.Create(dockerLogPath)
	if err != nil {
		return err
	}
	d.dockerLog = log
	cmd := d.node.Command(context.Background(), dockerd,
		"--data-root", filepath.Join(dockerDir, "data"), "--exec-root", filepath.Join(dockerDir, "exec"),
		"-H", "unix://"+dockerSock, "--pidfile", filepath.Join(dockerDir, "docker.pid"),
		"--iptables=false", "--ip6tables=false", "--bridge=none", "--ip-forward=false", "--ip-masq=false",
		"--storage-driver=overlay2", "--shutdown-timeout=3", "--userland-proxy=false")
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
	if err := kit.StartFromLockedThread(cmd); err != nil {
		return err
	}
	d.dockerd = cmd
	d.dockerdDone = make(chan struct{})
	go func() { _ = cmd.Wait(); close(d.dockerdDone) }()
	begin := time.Now()
	for {
		v, err := d.docker(ctx, "version", "--format", "{{.Server.Version}}")
		if err == nil {
			d.OK("dockerd %s (pid %d) answers on %s after %s", v, cmd.Process.Pid, dockerSock, time.Since(begin).Round(10*time.Millisecond))
			d.Detail("--data-root/--exec-root in %s, --iptables=false --ip6tables=false --bridge=none: the host's Docker is not touched", dockerDir)
			return nil
		}
		select {
		case <-d.dockerdDone:
			return fmt.Errorf("exited during start-up (see %s)", dockerLogPath)
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
		if time.Since(begin) > 30*time.Second {
			return fmt.Errorf("no answer on %s within 30s: %v", dockerSock, err)
		}
	}
}

// docker runs the Debian docker CLI against the demo's dockerd.
func (d *demoRun) docker(ctx context.Context, args ...string) (string, error) {
	return d.dockerIn(ctx, nil, args...)
}

func (d *demoRun) dockerIn(ctx context.Context, stdin io.Reader, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, dockerCLI, append([]string{"-H", "unix://" + dockerSock}, args...)...)
	cmd.Stdin = stdin
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("docker %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	return strings.TrimSpace(out.String()), nil
}

// importImage imports busybox-static as the demo's image.
func (d *demoRun) importImage() error {
	bb, err := os.ReadFile(busybox)
	if err != nil {
		return err
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	hdrs := []*tar.Header{
		{Name: "bin/", Typeflag: tar.TypeDir, Mode: 0o755},
		{Name: "bin/busybox", Typeflag: tar.TypeReg, Mode: 0o755, Size: int64(len(bb))},
	}
	for _, h := range hdrs {
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
	}
	if _, err := tw.Write(bb); err != nil {
		return err
	}
	for _, applet := range []string{"sh", "sleep", "ip", "ping"} {
		if err := tw.WriteHeader(&tar.Header{Name: "bin/" + applet, Typeflag: tar.TypeSymlink, Linkname: "busybox", Mode: 0o777}); err != nil {
			return err
		}
	}
	if err := tw.Close(); err != nil {
		return err
	}
	_, err = d.dockerIn(context.Background(), &buf, "import", "-", image)
	return err
}

// run starts a container on the macvlan network and inspects it.
func (d *demoRun) run(ctx context.Context, name string) (container, error) {
	if _, err := d.docker(ctx, "run", "-d", "--name", name, "--network", network, "--stop-timeout", "1", image, "sleep", "1000"); err != nil {
		return container{}, err
	}
	out, err := d.docker(ctx, "inspect", "--format", `{{.Id}} {{.NetworkSettings.SandboxKey}} {{(index .NetworkSettings.Networks "`+network+
		`").IPAddress}} {{(index .NetworkSettings.Networks "`+network+`").MacAddress}}`, name)
	if err != nil {
		return container{}, err
	}
	f := strings.Fields(out)
	if len(f) != 4 {
		return container{}, fmt.Errorf("docker inspect %s: %q", name, out)
	}
	c := container{name: name, id: f[0], sandbox: f[1], ip: f[2], mac: f[3]}
	if d.containers == nil {
		d.containers = map[string]container{}
	}
	d.containers[name] = c
	return c, nil
}

func (d *demoRun) openContainerNS(c container) (*netenv.NS, error) {
	return netenv.OpenNS(c.name, c.sandbox)
}

// pingExpect pings dst from n and checks it is answered (want) or not.
func (d *demoRun) pingExpect(n *netenv.NS, fromName, dst, dstName string, want bool) {
	addr, err := netip.ParseAddr(dst)
	if err != nil {
		d.Fail("ping %s -> %s: %v", fromName, dstName, err)
		return
	}
	count, wait := 3, time.Second
	if !want {
		count, wait = 2, 500*time.Millisecond
	}
	r, err := kit.Ping(n, addr, count, wait)
	switch {
	case err != nil:
		d.Fail("ping %s -> %s (%s): %v", fromName, dstName, dst, err)
	case want:
		d.Check(r.Received == r.Sent, "ping %s -> %s (%s): %s", fromName, dstName, dst, r)
	default:
		d.Check(r.Received == 0, "ping %s -> %s (%s): %s, as expected without underpass", fromName, dstName, dst, r)
	}
}

// ctl runs underpassctl on the demo's pins in the node netns.
func (d *demoRun) ctl(ctx context.Context, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	out, err := d.node.Command(ctx, filepath.Join(d.bin, "underpassctl"), append([]string{"--bpffs", dd.BPFFS}, args...)...).CombinedOutput()
	return strings.TrimRight(string(out), "\n"), err
}

// waitAdopted waits (up to 5 s) until underpassctl endpoints lists name
// (present) or no longer does; format may hold a %s for the time taken
// since since[0].
func (d *demoRun) waitAdopted(ctx context.Context, name string, present bool, format string, since ...time.Time) {
	begin := time.Now()
	if len(since) > 0 {
		begin = since[0]
	}
	var out string
	var err error
	for deadline := time.Now().Add(5 * time.Second); ; {
		out, err = d.ctl(ctx, "endpoints")
		if err == nil && strings.Contains(out, name) == present {
			if strings.Contains(format, "%s") {
				d.OK(format, time.Since(begin).Round(time.Millisecond))
			} else {
				d.OK("%s", format)
			}
			return
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	d.Fail("%s: not so after 5s (underpassctl endpoints: %v)", strings.ReplaceAll(format, " (within %s)", ""), err)
	d.Detail("%s", out)
}

// metricsPerContainer shows the /metrics series labelled with each
// container's name and checks its host redirects counted the pings.
func (d *demoRun) metricsPerContainer(names ...string) {
	code, body, err := d.agent.Get("/metrics")
	if err != nil || code != http.StatusOK {
		d.Fail("http://%s/metrics (inside the node netns): %d %v", dd.MetricsAddr, code, err)
		return
	}
	for _, n := range names {
		var lines []string
		for l := range strings.SplitSeq(body, "\n") {
			if strings.HasPrefix(l, "underpass_") && strings.Contains(l, `pod="`+n+`"`) {
				if f := strings.Fields(l); f[len(f)-1] != "0" {
					lines = append(lines, l)
				}
			}
		}
		redirects := false
		for _, l := range lines {
			if strings.HasPrefix(l, "underpass_host_redirects_total") {
				redirects = true
			}
		}
		if d.Check(redirects, `/metrics: the series with pod=%q (non-zero; host redirects counted)`, n) {
			d.Detail("%s", strings.Join(lines, "\n"))
		}
	}
}

// startAgent writes the config and runs underpassd in the node netns.
func (d *demoRun) startAgent(ctx context.Context) error {
	body := fmt.Sprintf("# underpassd config of the Docker demo\nbpffs: %s\nmetrics: {listen: %q}\ngcInterval: 1s\nadopt: {parents: [eth0], docker: %s}\n",
		dd.BPFFS, dd.MetricsAddr, dockerSock)
	if err := kit.WriteConfig(configPath, body); err != nil {
		return err
	}
	agent, took, err := kit.StartAgent(ctx, d.node, d.bin, configPath, agentLogPath, dd.MetricsAddr)
	d.agent = agent
	if err != nil {
		return err
	}
	d.OK("underpassd (pid %d) ready after %s, pins in %s", d.agent.Pid(), took.Round(10*time.Millisecond), dd.BPFFS)
	d.Detail("config: adopt: {parents: [eth0], docker: %s}", dockerSock)
	return nil
}

// showLog prints the tail of a log in the state directory.
func (d *demoRun) showLog(what, path string, n int) {
	b, err := os.ReadFile(path)
	if err != nil || len(b) == 0 {
		return
	}
	fmt.Fprintf(d.Out, "\n  %s log (last %d lines of %s):\n", what, n, path)
	d.Detail("%s", testutil.TailLines(string(b), n))
}
