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
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/underpass-cni/underpass/internal/config"
	"github.com/underpass-cni/underpass/internal/flock"
	"github.com/underpass-cni/underpass/test/demo"
)

// The demo's addresses.
var (
	subnet    = netip.MustParsePrefix("192.0.2.0/24")
	gateway   = netip.MustParseAddr("192.0.2.1")
	nodeAddr  = netip.MustParseAddr("192.0.2.2")
	svcCIDR   = netip.MustParsePrefix("10.96.0.0/16")
	liveVIP   = netip.MustParseAddr("10.96.0.10")
	staleVIP  = netip.MustParseAddr("10.96.0.99")
	gatewayMA = net.HardwareAddr{0x02, 'u', 'p', 'd', 'e', 1}
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

func main() {
	os.Exit(run())
}

func run() int {
	fs := flag.NewFlagSet("demo", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), usage, demo.Prefix)
		fs.PrintDefaults()
	}
	bin := fs.String("bin", "bin", "`dir`ectory with underpass, underpassd and underpassctl (make build)")
	cniPath := fs.String("cni-path", "", "more `dirs` (colon-separated) searched for CNI plugins: the host-local IPAM plugin")
	cleanupOnly := fs.Bool("cleanup", false, "only remove what a previous run left behind, then exit")
	if err := fs.Parse(os.Args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "demo: run as root (network namespaces, eBPF): sudo make demo")
		return 1
	}
	absBin, err := filepath.Abs(*bin)
	if err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		return 1
	}
	d := &demoRun{
		bin:   absBin,
		once:  os.Getenv("DEMO_ONCE") == "1",
		out:   os.Stdout,
		start: time.Now(),
	}
	d.cniPath = []string{absBin}
	for _, p := range filepath.SplitList(*cniPath) {
		if p != "" {
			d.cniPath = append(d.cniPath, p)
		}
	}

	unlock, err := takeLock()
	if err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		return 1
	}
	defer unlock()

	if *cleanupOnly {
		if !d.cleanup(false) {
			return 1
		}
		return 0
	}
	return d.main()
}

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

type pod struct {
	name string
	ns   *demo.NS
	id   string
	ip   netip.Addr
	mac  string
}

func (p *pod) rt() *libcni.RuntimeConf {
	return &libcni.RuntimeConf{
		ContainerID: p.id,
		NetNS:       p.ns.Path,
		IfName:      "eth0",
		Args: [][2]string{{"IgnoreUnknown", "1"}, {"K8S_POD_NAMESPACE", "demo"},
			{"K8S_POD_NAME", p.name}, {"K8S_POD_INFRA_CONTAINER_ID", p.id}},
	}
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

// buildLab creates the wire and node namespaces and the leak sink.
func (d *demoRun) buildLab() error {
	var err error
	if d.wire, err = demo.CreateNS("wire"); err != nil {
		return err
	}
	if d.node, err = demo.CreateNS("node"); err != nil {
		return err
	}
	for _, n := range []*demo.NS{d.wire, d.node} {
		// rp_filter is inherited from the host and differs between
		// machines; IPv6 stays out of the way (the demo is IPv4).
		if err := n.Sysctl("net.ipv4.conf.all.rp_filter", "0", "net.ipv4.conf.default.rp_filter", "0",
			"net.ipv6.conf.all.accept_dad", "0", "net.ipv6.conf.default.accept_dad", "0"); err != nil {
			return err
		}
	}

	wire := d.wire.Netlink()
	off := false
	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "br0", HardwareAddr: gatewayMA}, MulticastSnooping: &off}
	if err := wire.LinkAdd(br); err != nil {
		return fmt.Errorf("create br0 in %s: %w", d.wire.Name, err)
	}
	nodeFD, err := netns.GetFromPath(d.node.Path)
	if err != nil {
		return err
	}
	defer nodeFD.Close()
	// The node's end is created straight inside the node netns: nothing
	// ever appears in the host's netns.
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "node0"}, PeerName: "eth0", PeerNamespace: netlink.NsFd(int(nodeFD))}
	if err := wire.LinkAdd(veth); err != nil {
		return fmt.Errorf("create veth node0 <-> %s/eth0: %w", d.node.Name, err)
	}
	port, err := wire.LinkByName("node0")
	if err != nil {
		return err
	}
	if err := wire.LinkSetMaster(port, br); err != nil {
		return fmt.Errorf("plug node0 into br0: %w", err)
	}
	for _, name := range []string{"br0", "node0"} {
		l, err := wire.LinkByName(name)
		if err == nil {
			err = wire.LinkSetUp(l)
		}
		if err != nil {
			return fmt.Errorf("set %s up: %w", name, err)
		}
	}
	if err := d.wire.AddAddr("br0", netip.PrefixFrom(gateway, subnet.Bits())); err != nil {
		return err
	}
	eth0, err := d.node.Netlink().LinkByName("eth0")
	if err == nil {
		err = d.node.Netlink().LinkSetUp(eth0)
	}
	if err != nil {
		return fmt.Errorf("set eth0 up in %s: %w", d.node.Name, err)
	}
	if err := d.node.AddAddr("eth0", netip.PrefixFrom(nodeAddr, subnet.Bits())); err != nil {
		return err
	}
	if err := d.node.AddDefaultRoute(gateway); err != nil {
		return err
	}

	// The live service: the node accepts the VIP through a local route, as
	// kube-proxy's DNAT would, rather than with an address on lo: the agent
	// treats every interface address as a node subnet and rejects a service
	// CIDR that overlaps one.
	if err := d.node.AddLocalRoute(netip.PrefixFrom(liveVIP, 32)); err != nil {
		return err
	}
	ln, err := demo.Serve(d.node, netip.AddrPortFrom(liveVIP, svcPort).String(), "hello from the node (service "+liveVIP.String()+")", nil)
	if err != nil {
		return err
	}
	d.listeners = append(d.listeners, ln)

	// The gateway answers the whole service range: a packet for a service
	// VIP that leaks out of the node gets an answer that says so, instead
	// of silently hammering the network as it does on a real one.
	if err := d.wire.AddLocalRoute(svcCIDR); err != nil {
		return err
	}
	ln, err = demo.Serve(d.wire, fmt.Sprintf("0.0.0.0:%d", svcPort), "hello from the GATEWAY: this packet leaked out of the node", func(local netip.AddrPort) {
		if svcCIDR.Contains(local.Addr()) {
			d.leaks.Add(1)
		}
	})
	if err != nil {
		return err
	}
	d.listeners = append(d.listeners, ln)
	return nil
}

// agentConfig is the demo's /etc/underpass/underpass.yaml.
func agentConfig(action string) string {
	return fmt.Sprintf(`# underpassd config of the demo (see the README, "Agent configuration", for every key)
hostReachability: true
staleServices:
  cidrs: [%s]
  action: %s
services:
  static: [%s]
  kubernetes: "false"
metrics: {listen: %q}
bpffs: %s
`, svcCIDR, action, liveVIP, demo.MetricsAddr, demo.BPFFS)
}

// writeConfig writes the agent config atomically (as a ConfigMap update
// does), after checking it parses.
func writeConfig(path, body string) error {
	if _, err := config.Parse([]byte(body)); err != nil {
		return fmt.Errorf("demo config does not parse: %w", err)
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(body), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// startAgent runs underpassd in the node netns and waits for /readyz.
func (d *demoRun) startAgent(ctx context.Context) error {
	if err := writeConfig(configPath, agentConfig("drop")); err != nil {
		return err
	}
	log, err := os.Create(agentLogPath)
	if err != nil {
		return err
	}
	d.agentLog = log
	cmd := d.node.Command(context.Background(), filepath.Join(d.bin, "underpassd"), "--config", configPath)
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{
		// Its own process group: Ctrl-C in the terminal reaches the demo
		// only, which stops the agent in order.
		Setpgid: true,
		// If the demo dies, so does the agent (leftovers are swept by the
		// next run anyway).
		Pdeathsig: syscall.SIGTERM,
	}
	if err := startFromLockedThread(cmd); err != nil {
		return fmt.Errorf("start: %w", err)
	}
	d.agent = cmd
	d.agentDone = make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(d.agentDone)
	}()

	// HTTP from inside the node netns: the agent listens on the node's
	// loopback, which only sockets created in that netns reach.
	d.httpClient = &http.Client{
		Timeout: 3 * time.Second,
		Transport: &http.Transport{
			DisableKeepAlives: true,
			DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				var c net.Conn
				err := d.node.Do(func() error {
					var err error
					c, err = (&net.Dialer{}).DialContext(ctx, network, addr)
					return err
				})
				return c, err
			},
		},
	}
	begin := time.Now()
	deadline := time.Now().Add(30 * time.Second)
	var last string
	for {
		select {
		case <-d.agentDone:
			return fmt.Errorf("exited during start-up (%s)", d.agent.ProcessState)
		case <-ctx.Done():
			return ctx.Err()
		default:
		}
		code, body, err := d.get("/readyz")
		if err == nil && code == http.StatusOK {
			break
		}
		if err != nil {
			last = err.Error()
		} else {
			last = fmt.Sprintf("%d %s", code, strings.TrimSpace(body))
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not ready after 30s: %s", last)
		}
		time.Sleep(100 * time.Millisecond)
	}
	d.ok("underpassd (pid %d) loaded the datapath, pinned in %s, ready after %s", d.agent.Process.Pid, demo.BPFFS, time.Since(begin).Round(10*time.Millisecond))
	d.detail("config %s: services.static [%s], staleServices.cidrs [%s], action drop", configPath, liveVIP, svcCIDR)
	return nil
}

// startFromLockedThread starts cmd from a thread that stays alive as long
// as the demo: Pdeathsig fires when the *thread* that forked the child
// exits, and Go ends threads whose goroutine exits while locked (as
// namespace helpers do).
func startFromLockedThread(cmd *exec.Cmd) error {
	starterOnce.Do(func() {
		starter = make(chan startReq)
		go func() {
			runtime.LockOSThread() // for the program's lifetime
			for r := range starter {
				r.err <- r.cmd.Start()
			}
		}()
	})
	r := startReq{cmd: cmd, err: make(chan error, 1)}
	starter <- r
	return <-r.err
}

type startReq struct {
	cmd *exec.Cmd
	err chan error
}

var (
	starterOnce sync.Once
	starter     chan startReq
)

// get fetches path from the agent's HTTP endpoint in the node netns.
func (d *demoRun) get(path string) (int, string, error) {
	resp, err := d.httpClient.Get("http://" + demo.MetricsAddr + path)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

// writeConflist writes the pods' network: underpass as the main plugin.
func (d *demoRun) writeConflist() error {
	conf := map[string]any{
		"cniVersion": "1.1.0",
		"name":       "underpass-demo",
		"plugins": []any{map[string]any{
			"type":        "underpass",
			"master":      "eth0",
			"mode":        "macvlan",
			"macvlanMode": "bridge",
			"bpffs":       demo.BPFFS,
			"ipam": map[string]any{
				"type":    "host-local",
				"dataDir": ipamDir,
				"ranges": []any{[]any{map[string]any{
					"subnet": subnet.String(), "rangeStart": "192.0.2.100", "rangeEnd": "192.0.2.200", "gateway": gateway.String(),
				}}},
				"routes": []any{map[string]any{"dst": "0.0.0.0/0"}},
			},
		}},
	}
	b, err := json.MarshalIndent(conf, "", "  ")
	if err != nil {
		return err
	}
	path := filepath.Join(confDir, "10-underpass-demo.conflist")
	if err := os.WriteFile(path, b, 0o644); err != nil {
		return err
	}
	if d.netconf, err = libcni.ConfListFromFile(path); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	if _, err := invoke.FindInPath("host-local", d.cniPath); err != nil {
		return fmt.Errorf("the host-local IPAM plugin: %w (pass its directory with --cni-path; make demo installs it)", err)
	}
	return nil
}

// addPod creates a pod netns and runs CNI ADD for it from the node netns,
// as the container runtime on a node does.
func (d *demoRun) addPod(ctx context.Context, name string) (*pod, error) {
	n, err := demo.CreateNS(name)
	if err != nil {
		return nil, err
	}
	// A container ID as a runtime makes one (64 hex digits), fixed per name.
	sum := sha256.Sum256([]byte(n.Name))
	p := &pod{name: name, ns: n, id: hex.EncodeToString(sum[:])}
	d.pods = append(d.pods, p)
	if err := n.Sysctl("net.ipv6.conf.all.accept_dad", "0", "net.ipv6.conf.default.accept_dad", "0"); err != nil {
		return nil, err
	}
	var res *current.Result
	err = d.node.Do(func() error {
		r, err := d.cni.AddNetworkList(ctx, d.netconf, p.rt())
		if err != nil {
			return err
		}
		res, err = current.NewResultFromResult(r)
		return err
	})
	if err != nil {
		return nil, err
	}
	for _, ipc := range res.IPs {
		if a, ok := netip.AddrFromSlice(ipc.Address.IP); ok && a.Unmap().Is4() {
			p.ip = a.Unmap()
		}
	}
	for _, i := range res.Interfaces {
		if i.Name == "eth0" && i.Sandbox != "" {
			p.mac = i.Mac
		}
	}
	if !p.ip.IsValid() {
		return nil, fmt.Errorf("the result has no IPv4 address: %v", res)
	}
	return p, nil
}

// connectivity: host <-> pod through the hairpin, pod <-> pod.
func (d *demoRun) connectivity(ctx context.Context) {
	a, b := d.pods[0], d.pods[1]
	d.section("4. Host <-> pod, through the hairpin on eth0 (plain macvlan cannot do this)")
	d.ping(a.ns, a.name, nodeAddr, "the node")
	d.ping(d.node, "the node", a.ip, a.name)
	d.ping(b.ns, b.name, nodeAddr, "the node")
	if ctx.Err() != nil {
		return
	}
	d.section("5. Pod <-> pod (macvlan bridge mode, untouched)")
	d.ping(a.ns, a.name, b.ip, b.name)
	d.ping(b.ns, b.name, a.ip, a.name)
}

func (d *demoRun) ping(from *demo.NS, fromName string, dst netip.Addr, dstName string) {
	r, err := demo.Ping(from, dst, 3, time.Second)
	if err != nil {
		d.fail("ping %s -> %s (%s): %v", fromName, dstName, dst, err)
		return
	}
	d.check(r.Received == r.Sent, "ping %s -> %s (%s): %s", fromName, dstName, dst, r)
}

// services: the live VIP reaches the node, the deleted VIP is dropped, then
// refused once the config says reject.
func (d *demoRun) services(ctx context.Context) {
	a := d.pods[0]
	live := netip.AddrPortFrom(liveVIP, svcPort)
	stale := netip.AddrPortFrom(staleVIP, svcPort)

	d.section("6. Services: steered to the node by map; deleted ones stopped at the node")
	r := demo.Dial(a.ns, live, 3*time.Second)
	switch {
	case r.Err != nil:
		d.fail("live service %s from %s: %v", live, a.name, r.Err)
	case strings.Contains(r.Greeting, "GATEWAY"):
		d.fail("live service %s from %s leaked to the gateway: %q", live, a.name, r.Greeting)
	default:
		d.ok("live service %s from %s: %q (connected in %s)", live, a.name, r.Greeting, roundDur(r.Took))
	}
	if ctx.Err() != nil {
		return
	}

	before := d.metrics()
	leaks := d.leaks.Load()
	r = demo.Dial(a.ns, stale, time.Second)
	after := d.metrics()
	dropped := after.sum("underpass_stale_service_packets_total", "action", "dropped") - before.sum("underpass_stale_service_packets_total", "action", "dropped")
	counter := ""
	if after.has("underpass_stale_service_packets_total") {
		counter = fmt.Sprintf(`, underpass_stale_service_packets_total{action="dropped"} +%g`, dropped)
	}
	switch {
	case d.leaks.Load() != leaks || r.Err == nil:
		d.fail("deleted service %s from %s: it reached the gateway (%q, %v)", stale, a.name, r.Greeting, r.Err)
	case !r.TimedOut():
		d.fail("deleted service %s from %s: want a silent drop (timeout), got %v", stale, a.name, r.Err)
	case counter != "" && dropped < 1:
		d.fail("deleted service %s from %s: timed out, but the drop counter did not move%s", stale, a.name, counter)
	default:
		d.ok("deleted service %s from %s: dropped at the node (connect timed out after %s, the gateway saw nothing%s)", stale, a.name, roundDur(r.Took), counter)
	}
	if ctx.Err() != nil {
		return
	}

	// Reject mode: the client fails in milliseconds instead of retrying.
	reloads := d.metrics().sum("underpass_config_reloads_total", "result", "success")
	if err := writeConfig(configPath, agentConfig("reject")); err != nil {
		d.fail("switch to staleServices.action reject: %v", err)
		return
	}
	begin := time.Now()
	reloaded := false
	for time.Since(begin) < 15*time.Second && ctx.Err() == nil {
		if d.metrics().sum("underpass_config_reloads_total", "result", "success") > reloads {
			reloaded = true
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if !d.check(reloaded, "config changed to staleServices.action: reject; underpassd reloaded it live after %s", time.Since(begin).Round(10*time.Millisecond)) {
		return
	}
	before = d.metrics()
	r = demo.Dial(a.ns, stale, 3*time.Second)
	after = d.metrics()
	rejected := after.sum("underpass_stale_service_packets_total", "action", "rejected") - before.sum("underpass_stale_service_packets_total", "action", "rejected")
	counter = ""
	if after.has("underpass_stale_service_packets_total") {
		counter = fmt.Sprintf(`, underpass_stale_service_packets_total{action="rejected"} +%g`, rejected)
	}
	switch {
	case d.leaks.Load() != leaks || r.Err == nil:
		d.fail("deleted service %s from %s: it reached the gateway (%q, %v)", stale, a.name, r.Greeting, r.Err)
	case !r.Refused():
		d.fail("deleted service %s from %s: want connection refused, got %v", stale, a.name, r.Err)
	default:
		d.ok("deleted service %s from %s: connection refused after %s (a RST from the datapath%s)", stale, a.name, roundDur(r.Took), counter)
	}
}

// inspect shows underpassctl stats and the metrics.
func (d *demoRun) inspect(ctx context.Context) {
	d.section("7. underpassctl stats (run in the node netns)")
	ctl := filepath.Join(d.bin, "underpassctl")
	if _, err := os.Stat(ctl); err != nil {
		d.fail("underpassctl not found in %s: run make build", d.bin)
	} else {
		args := []string{"--bpffs", demo.BPFFS, "stats"}
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		out, err := d.node.Command(cctx, ctl, args...).CombinedOutput()
		cancel()
		if d.check(err == nil, "underpassctl %s", strings.Join(args, " ")) {
			d.detail("%s", out)
		} else {
			d.detail("%v\n%s", err, out)
		}
	}

	d.section("8. Metrics")
	code, body, err := d.get("/metrics")
	switch {
	case err != nil:
		d.fail("http://%s/metrics (inside the node netns): %v", demo.MetricsAddr, err)
		return
	case code != http.StatusOK:
		d.fail("http://%s/metrics (inside the node netns) answers %d", demo.MetricsAddr, code)
		return
	}
	d.ok("http://%s/metrics (inside the node netns) answers 200", demo.MetricsAddr)
	// The non-zero underpass series: what the steps above did.
	var lines []string
	all := 0
	for l := range strings.SplitSeq(body, "\n") {
		if !strings.HasPrefix(l, "underpass_") {
			continue
		}
		all++
		if f := strings.Fields(l); len(f) > 0 && f[len(f)-1] != "0" {
			lines = append(lines, l)
		}
	}
	if len(lines) > 20 {
		lines = append(lines[:20], fmt.Sprintf("… %d more", len(lines)-20))
	}
	lines = append(lines, fmt.Sprintf("(%d underpass_* series in all; the zero ones are not shown)", all))
	d.detail("%s", strings.Join(lines, "\n"))
	fmt.Fprintf(d.out, "\n  Try it yourself (in another terminal, while the demo runs):\n")
	fmt.Fprintf(d.out, "    sudo nsenter --net=%s curl -s http://%s/metrics | grep ^underpass_\n", d.node.Path, demo.MetricsAddr)
	fmt.Fprintf(d.out, "    sudo nsenter --net=%s %s --bpffs %s endpoints\n", d.node.Path, ctl, demo.BPFFS)
	fmt.Fprintf(d.out, "    sudo nsenter --net=%s ping -c1 %s        # pod-a -> node, through the hairpin\n", d.pods[0].ns.Path, nodeAddr)
	fmt.Fprintf(d.out, "    sudo bpftool map dump pinned %s/<map>    # the pinned maps, with BTF\n", demo.BPFFS)
}

func roundDur(t time.Duration) time.Duration {
	switch {
	case t < time.Millisecond:
		return t.Round(time.Microsecond)
	case t < time.Second:
		return t.Round(100 * time.Microsecond)
	}
	return t.Round(10 * time.Millisecond)
}

// samples is a scraped /metrics page.
type samples []sample

type sample struct {
	name   string
	labels map[string]string
	value  float64
}

// metrics scrapes the agent; an error gives no samples.
func (d *demoRun) metrics() samples {
	code, body, err := d.get("/metrics")
	if err != nil || code != http.StatusOK {
		return nil
	}
	return parseMetrics(body)
}

// parseMetrics reads the Prometheus text format (enough of it for the
// demo: no escaped quotes or commas inside label values).
func parseMetrics(body string) samples {
	var out samples
	sc := bufio.NewScanner(strings.NewReader(body))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		l := strings.TrimSpace(sc.Text())
		if l == "" || l[0] == '#' {
			continue
		}
		s := sample{labels: map[string]string{}}
		rest := l
		if i := strings.IndexByte(l, '{'); i >= 0 {
			j := strings.LastIndexByte(l, '}')
			if j < i {
				continue
			}
			s.name = l[:i]
			for kv := range strings.SplitSeq(l[i+1:j], ",") {
				k, v, ok := strings.Cut(kv, "=")
				if ok {
					s.labels[strings.TrimSpace(k)] = strings.Trim(strings.TrimSpace(v), `"`)
				}
			}
			rest = strings.TrimSpace(l[j+1:])
		} else {
			f := strings.Fields(l)
			if len(f) < 2 {
				continue
			}
			s.name, rest = f[0], f[1]
		}
		f := strings.Fields(rest)
		if len(f) == 0 {
			continue
		}
		v, err := strconv.ParseFloat(f[0], 64)
		if err != nil {
			continue
		}
		s.value = v
		out = append(out, s)
	}
	return out
}

// sum adds the samples of name whose label k is v (k == "": all).
func (s samples) sum(name, k, v string) float64 {
	var t float64
	for _, x := range s {
		if x.name == name && (k == "" || x.labels[k] == v) {
			t += x.value
		}
	}
	return t
}

func (s samples) has(name string) bool {
	for _, x := range s {
		if x.name == name {
			return true
		}
	}
	return false
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

// cleanup removes everything the demo creates; graceful (the end of this
// run) also deletes the pods through CNI DEL and uninstalls the datapath
// with underpassd --uninstall first, as an operator would. It reports each
// step and returns false if anything is left.
func (d *demoRun) cleanup(graceful bool) bool {
	ok := true
	note := func(err error, format string, args ...any) {
		if err != nil {
			ok = false
			fmt.Fprintf(d.out, "  ✗ %s: %v\n", fmt.Sprintf(format, args...), err)
		} else {
			fmt.Fprintf(d.out, "  ✓ %s\n", fmt.Sprintf(format, args...))
		}
	}
	for _, l := range d.listeners {
		l.Close()
	}
	d.listeners = nil

	if graceful && d.cni != nil && d.netconf != nil && d.node != nil {
		for _, p := range d.pods {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			err := d.node.Do(func() error { return d.cni.DelNetworkList(ctx, d.netconf, p.rt()) })
			cancel()
			note(err, "CNI DEL %s", p.name)
		}
	}

	// Processes: this run's agent, and any process a crashed run left
	// (found by the state directory on its command line).
	var pids []int
	if d.agent != nil && d.agent.Process != nil {
		select {
		case <-d.agentDone:
		default:
			pids = append(pids, d.agent.Process.Pid)
		}
	}
	for _, pid := range demo.Processes() {
		if len(pids) == 0 || pid != pids[0] {
			pids = append(pids, pid)
		}
	}
	for _, pid := range pids {
		name := procName(pid)
		note(stopProcess(pid, d.agentDone), "stop %s (pid %d)", name, pid)
	}
	if d.agentLog != nil {
		d.agentLog.Close()
	}

	// Detach the programs with the agent's own uninstall, from inside the
	// node netns, while the interfaces still exist. The config it reads
	// names the demo's pin directory only, so it can never touch a real
	// install's /sys/fs/bpf/underpass.
	nodePath := filepath.Join(demo.NetnsDir, demo.Prefix+"node")
	agentBin := filepath.Join(d.bin, "underpassd")
	if graceful && exists(demo.BPFFS) && exists(nodePath) && exists(agentBin) {
		err := os.MkdirAll(demo.StateDir, 0o755)
		if err == nil {
			err = os.WriteFile(uninstallPath, []byte("bpffs: "+demo.BPFFS+"\n"), 0o644)
		}
		var out []byte
		if err == nil {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			out, err = exec.CommandContext(ctx, "nsenter", "--net="+nodePath, "--", agentBin, "--uninstall", "--config", uninstallPath).CombinedOutput()
			cancel()
		}
		note(err, "underpassd --uninstall (detach the programs, remove %s)", demo.BPFFS)
		if err != nil || os.Getenv("DEMO_VERBOSE") == "1" {
			d.detail("%s", out)
		}
	}

	// Namespaces (pods first): deleting them deletes every link the demo
	// made, the macvlans and the veth pair included.
	for _, p := range d.pods {
		p.ns.Close()
	}
	for _, n := range []*demo.NS{d.node, d.wire} {
		if n != nil {
			n.Close()
		}
	}
	names, err := demo.Namespaces()
	if err != nil {
		note(err, "list namespaces")
	}
	var nsErrs []error
	for _, n := range names {
		nsErrs = append(nsErrs, demo.DeleteNS(n))
	}
	if len(names) > 0 {
		note(errors.Join(nsErrs...), "delete namespaces %s", strings.Join(names, " "))
	}

	// What --uninstall did not remove (or a crashed run left).
	if exists(demo.BPFFS) {
		note(os.RemoveAll(demo.BPFFS), "remove pins %s", demo.BPFFS)
	}
	if l := demo.AgentLockFile(); exists(l) {
		note(os.Remove(l), "remove the agent's lock file %s", l)
	}
	if exists(demo.StateDir) {
		note(os.RemoveAll(demo.StateDir), "remove %s (config, conflist, leases, log)", demo.StateDir)
	}

	if left := leftoversButLock(); len(left) > 0 {
		note(fmt.Errorf("%s", strings.Join(left, "; ")), "nothing left behind")
	} else {
		note(nil, "nothing left behind")
	}
	return ok
}

// leftoversButLock is demo.Leftovers without the lock file this run holds.
func leftoversButLock() []string {
	var out []string
	for _, l := range demo.Leftovers() {
		if l != demo.LockFile {
			out = append(out, l)
		}
	}
	return out
}

func exists(p string) bool {
	_, err := os.Lstat(p)
	return err == nil
}

// stopProcess sends SIGTERM, waits up to 5 s, then SIGKILL. done, if not
// nil, is closed when the process was reaped (our own child).
func stopProcess(pid int, done <-chan struct{}) error {
	gone := func() bool {
		if done != nil {
			select {
			case <-done:
				return true
			default:
			}
		}
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			return true
		}
		// A zombie of someone else's is dead, just not reaped yet.
		if i := bytes.LastIndexByte(b, ')'); i > 0 && i+2 < len(b) && b[i+2] == 'Z' {
			return true
		}
		return false
	}
	if gone() {
		return nil
	}
	_ = unix.Kill(pid, unix.SIGTERM)
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if gone() {
			return nil
		}
	}
	_ = unix.Kill(pid, unix.SIGKILL)
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if gone() {
			return nil
		}
	}
	return fmt.Errorf("still running after SIGKILL")
}

func procName(pid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
	if err != nil {
		return "process"
	}
	return strings.TrimSpace(string(b))
}

// takeLock makes sure one demo runs at a time; the lock file holds the pid.
func takeLock() (func(), error) {
	unlock, err := flock.PidFile(demo.LockFile, 0o644)
	if errors.Is(err, flock.ErrHeld) {
		return nil, fmt.Errorf("another demo (pid %s) is running: stop it with Ctrl-C first", flock.Holder(demo.LockFile))
	}
	return unlock, err
}
