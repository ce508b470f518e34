package soak_test

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
	"github.com/underpass-cni/underpass/internal/testutil"
	"github.com/underpass-cni/underpass/test/netenv"
)

// metricsAddr is the agent's metrics.listen, on the node netns' loopback.
const metricsAddr = "127.0.0.1:9775"

const agentConfig = `bpffs: %s
metrics: {listen: %q}
gcInterval: 1s
hostReachability: true
staleServices:
  cidrs: [10.96.0.0/16]
services:
  static: [10.96.0.10]
  kubernetes: "false"
`

// lab is the node: a netenv with underpassd running in the node netns and a
// CNI network of the plugin in main mode on eth0.
type lab struct {
	t       *testing.T
	env     *netenv.Env
	up      *netenv.Uplink
	bpffs   string // the agent's pin dir
	dataDir string // host-local leases
	cni     *libcni.CNIConfig
	net     *libcni.NetworkConfigList
	ag      *agent
	cfg     string // the agent's config file
	client  *http.Client
	dp      *loader.Datapath // opened like the plugin does, for reading maps
}

var must = testutil.Must

func newLab(t *testing.T) *lab {
	t.Helper()
	testutil.RequireRoot(t)
	env := netenv.New(t, netenv.Options{})
	l := &lab{
		t:       t,
		env:     env,
		up:      env.Uplinks[0],
		bpffs:   filepath.Join(testutil.MountBPFFS(t), "underpass"),
		dataDir: t.TempDir(),
	}
	// Sockets made inside the node netns reach the agent's loopback. The
	// timeout is generous: the figures report how slow scrapes were; a
	// failure means the agent did not answer at all.
	l.client = &http.Client{
		Timeout: 15 * time.Second,
		Transport: &http.Transport{
			DisableKeepAlives: true,
			DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				var c net.Conn
				err := env.Node.Do(func() error {
					var err error
					c, err = (&net.Dialer{}).DialContext(ctx, network, addr)
					return err
				})
				return c, err
			},
		},
	}

	// underpassd leaves its lock file (/run/underpass/underpassd-<hash of
	// the pin dir>.lock) behind by design; this pin dir is the test's own,
	// so the file goes after the agent (cleanups run last to first).
	sum := sha256.Sum256([]byte(filepath.Clean(l.bpffs)))
	lockFile := filepath.Join("/run/underpass", fmt.Sprintf("underpassd-%x.lock", sum[:8]))
	t.Cleanup(func() { os.Remove(lockFile) })

	l.cfg = filepath.Join(t.TempDir(), "underpass.yaml")
	must(t, os.WriteFile(l.cfg, fmt.Appendf(nil, agentConfig, l.bpffs, metricsAddr), 0o644))
	l.ag = startAgent(t, env.Node, l.cfg)
	l.ag.waitReady(l)

	dp, err := loader.Open(l.bpffs)
	must(t, err)
	t.Cleanup(func() { dp.Close() })
	l.dp = dp

	// The service implementation: the node owns the live VIP.
	lo, err := env.Node.Netlink().LinkByName("lo")
	must(t, err)
	must(t, env.Node.Netlink().AddrAdd(lo, &netlink.Addr{IPNet: &net.IPNet{IP: net.ParseIP("10.96.0.10"), Mask: net.CIDRMask(32, 32)}}))

	confDir, cacheDir := t.TempDir(), t.TempDir()
	l.cni = libcni.NewCNIConfigWithCacheDir([]string{pluginDir, refDir}, cacheDir, nil)
	u := l.up
	ipam := map[string]any{
		"type": "host-local", "dataDir": l.dataDir,
		"ranges": []any{
			[]any{map[string]any{"subnet": u.Subnet4.String(), "rangeStart": u.IP4(100).Addr().String(), "rangeEnd": u.IP4(199).Addr().String(), "gateway": u.Gateway4.String()}},
			[]any{map[string]any{"subnet": u.Subnet6.String(), "rangeStart": u.IP6(0x100).Addr().String(), "rangeEnd": u.IP6(0x1ff).Addr().String(), "gateway": u.Gateway6.String()}},
		},
		"routes": []any{map[string]any{"dst": "0.0.0.0/0"}, map[string]any{"dst": "::/0"}},
	}
	conf := map[string]any{"cniVersion": "1.1.0", "name": "soak", "plugins": []any{map[string]any{
		"type": "underpass", "master": u.Name, "mode": "macvlan", "macvlanMode": "bridge", "bpffs": l.bpffs, "ipam": ipam,
	}}}
	b, err := json.MarshalIndent(conf, "", "  ")
	must(t, err)
	path := filepath.Join(confDir, "soak.conflist")
	must(t, os.WriteFile(path, b, 0o644))
	l.net, err = libcni.NetworkConfFromFile(path)
	must(t, err)
	return l
}

// pod is one CNI attachment.
type pod struct {
	name  string
	id    string // container id
	netns string // path
	ns    *netenv.NS
	ip4   netip.Addr
	ip6   netip.Addr
	mac   net.HardwareAddr
}

func (p *pod) rt() *libcni.RuntimeConf {
	return &libcni.RuntimeConf{
		ContainerID: p.id, NetNS: p.netns, IfName: "eth0",
		Args: [][2]string{{"IgnoreUnknown", "1"}, {"K8S_POD_NAMESPACE", "soak"}, {"K8S_POD_NAME", p.name}, {"K8S_POD_UID", p.id}},
	}
}

// add runs ADD as the runtime does, from the node netns (the plugin starts
// there), and records the addresses and MAC.
func (l *lab) add(p *pod) error {
	var res types.Result
	err := l.env.Node.Do(func() error {
		var err error
		res, err = l.cni.AddNetworkList(context.Background(), l.net, p.rt())
		return err
	})
	if err != nil {
		return err
	}
	r, err := current.NewResultFromResult(res)
	if err != nil {
		return err
	}
	for _, ipc := range r.IPs {
		a, _ := netip.AddrFromSlice(ipc.Address.IP)
		if a = a.Unmap(); a.Is4() {
			p.ip4 = a
		} else {
			p.ip6 = a
		}
	}
	for _, intf := range r.Interfaces {
		if intf.Name == "eth0" && intf.Sandbox != "" {
			p.mac, _ = net.ParseMAC(intf.Mac)
		}
	}
	if !p.ip4.IsValid() || !p.ip6.IsValid() || p.mac == nil {
		return fmt.Errorf("ADD result lacks an address or the MAC: %v", r)
	}
	return nil
}

func (l *lab) del(p *pod) error {
	return l.env.Node.Do(func() error { return l.cni.DelNetworkList(context.Background(), l.net, p.rt()) })
}

func (l *lab) check(p *pod) error {
	return l.env.Node.Do(func() error { return l.cni.CheckNetworkList(context.Background(), l.net, p.rt()) })
}

// stablePod creates a lab netns (removed with the lab) and ADDs it.
func (l *lab) stablePod(name string) *pod {
	l.t.Helper()
	n := l.env.AddNS(name)
	p := &pod{name: name, id: "soak-stable-" + name, netns: n.Path, ns: n}
	if err := l.add(p); err != nil {
		l.t.Fatalf("ADD %s: %v", name, err)
	}
	// DEL before the lab goes: the lease and registration are released
	// the way a runtime would.
	l.t.Cleanup(func() {
		if err := l.del(p); err != nil {
			l.t.Errorf("DEL %s: %v", name, err)
		}
	})
	return p
}

// Churn namespaces are created and removed here rather than with
// Env.AddNS, which keeps them until the test ends. They carry the lab's
// prefix, so netenv.CleanupStale removes those a crashed run left, and the
// lab's sysctls (no DAD, rp_filter off).
func createChurnNS(name string) (*netenv.NS, error) {
	path := filepath.Join(netenv.NetnsDir, name)
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_RDONLY, 0o444)
	if err != nil {
		return nil, fmt.Errorf("create netns %s: %w", name, err)
	}
	f.Close()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with the goroutine
		errc <- func() error {
			if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
				return fmt.Errorf("unshare: %w", err)
			}
			for _, kv := range [][2]string{
				{"ipv6/conf/all/accept_dad", "0"}, {"ipv6/conf/default/accept_dad", "0"},
				{"ipv4/conf/all/rp_filter", "0"}, {"ipv4/conf/default/rp_filter", "0"},
			} {
				if err := os.WriteFile("/proc/sys/net/"+kv[0], []byte(kv[1]), 0o644); err != nil {
					return err
				}
			}
			h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
			if err != nil {
				return err
			}
			defer h.Close()
			lo, err := h.LinkByName("lo")
			if err != nil {
				return err
			}
			if err := h.LinkSetUp(lo); err != nil {
				return err
			}
			self := fmt.Sprintf("/proc/%d/task/%d/ns/net", os.Getpid(), unix.Gettid())
			if err := unix.Mount(self, path, "none", unix.MS_BIND, ""); err != nil {
				return fmt.Errorf("bind mount: %w", err)
			}
			return nil
		}()
	}()
	if err := <-errc; err != nil {
		os.Remove(path)
		return nil, fmt.Errorf("create netns %s: %w", name, err)
	}
	return &netenv.NS{Name: name, Path: path}, nil
}

func removeNS(path string) error {
	if err := unix.Unmount(path, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("unmount netns %s: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove netns %s: %w", path, err)
	}
	return nil
}

// agent is the running underpassd. nsenter execs it, so the process is the
// agent itself (its pid, fds and threads are the agent's).
type agent struct {
	cmd  *exec.Cmd
	out  *testutil.SyncBuffer
	done chan struct{}
	err  error
}

func startAgent(t *testing.T, node *netenv.NS, cfg string) *agent {
	t.Helper()
	a := &agent{out: &testutil.SyncBuffer{}, done: make(chan struct{})}
	a.cmd = node.Command(context.Background(), agentBin, "--config", cfg, "--log-level", "debug")
	a.cmd.Stdout, a.cmd.Stderr = a.out, a.out
	if err := a.cmd.Start(); err != nil {
		t.Fatalf("start underpassd: %v", err)
	}
	go func() {
		a.err = a.cmd.Wait()
		close(a.done)
	}()
	t.Cleanup(func() {
		if !a.exited() {
			_ = a.cmd.Process.Signal(syscall.SIGKILL)
			<-a.done
		}
		if t.Failed() {
			t.Logf("underpassd log (last 150 lines):\n%s", tail(a.out.String(), 150))
		}
	})
	return a
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = append([]string{fmt.Sprintf("… %d lines before", len(lines)-n)}, lines[len(lines)-n:]...)
	}
	return strings.Join(lines, "\n")
}

func (a *agent) exited() bool {
	select {
	case <-a.done:
		return true
	default:
		return false
	}
}

func (a *agent) pid() int { return a.cmd.Process.Pid }

// stop sends SIGTERM and expects a clean exit.
func (a *agent) stop(t *testing.T) {
	t.Helper()
	_ = a.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-a.done:
	case <-time.After(10 * time.Second):
		t.Errorf("underpassd did not stop within 10s of SIGTERM")
		return
	}
	if a.err != nil {
		t.Errorf("underpassd exited with %v", a.err)
	}
}

func (a *agent) waitReady(l *lab) {
	l.t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	var last string
	for time.Now().Before(deadline) {
		if a.exited() {
			l.t.Fatalf("underpassd exited (%v) before it was ready:\n%s", a.err, a.out.String())
		}
		code, body, err := l.get("/readyz")
		if err == nil && code == http.StatusOK {
			return
		}
		last = fmt.Sprint(code, " ", strings.TrimSpace(body), " ", err)
		time.Sleep(20 * time.Millisecond)
	}
	l.t.Fatalf("underpassd not ready after 60s (last /readyz: %s)", last)
}

func (l *lab) get(path string) (int, string, error) {
	resp, err := l.client.Get("http://" + metricsAddr + path)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

// metric returns one unlabelled series from a /metrics body, or an error.
func metric(body, name string) (float64, error) {
	sc := bufio.NewScanner(strings.NewReader(body))
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), name+" "); ok {
			return strconv.ParseFloat(strings.TrimSpace(rest), 64)
		}
	}
	return 0, fmt.Errorf("no series %s in /metrics", name)
}

func (l *lab) scrape(name string) (float64, error) {
	code, body, err := l.get("/metrics")
	if err != nil {
		return 0, err
	}
	if code != http.StatusOK {
		return 0, fmt.Errorf("/metrics: %d %s", code, strings.TrimSpace(body))
	}
	return metric(body, name)
}

// fds counts the agent's open fds, and among them the network namespaces.
func fds(pid int) (all, netns int, err error) {
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return 0, 0, err
	}
	for _, e := range ents {
		all++
		if target, err := os.Readlink(filepath.Join(dir, e.Name())); err == nil && strings.HasPrefix(target, "net:[") {
			netns++
		}
	}
	return all, netns, nil
}

// state is what the leak checks compare against the baseline.
type state struct {
	nodeLinks   []string
	netns       []string // the lab's namespaces
	leases      []string
	endpoints   map[uint32]string // id -> container id
	epByIP      map[netip.Addr]uint32
	epByMAC     map[string]uint32
	epStats     []uint32
	parents     []int
	pins        []string // paths under the pin dir
	agentFDs    int
	agentNetns  int
	testNetns   int // network namespace fds of the test process itself
	goroutines  int
	threadCount int
}

func (l *lab) snapshot() state {
	t := l.t
	t.Helper()
	var s state
	links, err := l.env.Node.Netlink().LinkList()
	must(t, err)
	for _, k := range links {
		s.nodeLinks = append(s.nodeLinks, k.Attrs().Name)
	}
	slices.Sort(s.nodeLinks)

	ents, err := os.ReadDir(netenv.NetnsDir)
	must(t, err)
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), l.env.Prefix) {
			s.netns = append(s.netns, strings.TrimPrefix(e.Name(), l.env.Prefix))
		}
	}

	_ = filepath.WalkDir(l.dataDir, func(path string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			if a, perr := netip.ParseAddr(strings.ReplaceAll(d.Name(), "_", ":")); perr == nil {
				s.leases = append(s.leases, a.String())
			}
		}
		return nil
	})
	slices.Sort(s.leases)

	m := &l.dp.Maps
	eps, err := datapath.Endpoints(m)
	must(t, err)
	s.endpoints = map[uint32]string{}
	for id, ep := range eps {
		s.endpoints[id] = ep.ContainerID
	}
	s.epByIP = map[netip.Addr]uint32{}
	var ipk loader.EpIPKey
	var ref loader.EndpointRef
	it := m.EpByIp.Iterate()
	for it.Next(&ipk, &ref) {
		s.epByIP[datapath.AddrOf(loader.IPKey{Addr: ipk.Addr})] = ref.Id
	}
	must(t, it.Err())
	s.epByMAC = map[string]uint32{}
	var mk loader.MACKey
	it = m.EpByMac.Iterate()
	for it.Next(&mk, &ref) {
		s.epByMAC[net.HardwareAddr(mk.Mac[:]).String()] = ref.Id
	}
	must(t, it.Err())
	var id uint32
	var per []loader.EndpointStats
	it = m.EpStats.Iterate()
	for it.Next(&id, &per) {
		s.epStats = append(s.epStats, id)
	}
	must(t, it.Err())
	slices.Sort(s.epStats)
	parents, err := datapath.Parents(m)
	must(t, err)
	for idx := range parents {
		s.parents = append(s.parents, idx)
	}
	slices.Sort(s.parents)

	_ = filepath.WalkDir(l.bpffs, func(path string, d fs.DirEntry, err error) error {
		if err == nil && path != l.bpffs {
			rel, _ := filepath.Rel(l.bpffs, path)
			s.pins = append(s.pins, rel)
		}
		return nil
	})
	slices.Sort(s.pins)

	s.agentFDs, s.agentNetns, err = fds(l.ag.pid())
	must(t, err)
	_, s.testNetns, err = fds(os.Getpid())
	must(t, err)
	if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", l.ag.pid())); err == nil {
		for line := range strings.SplitSeq(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "Threads:"); ok {
				s.threadCount, _ = strconv.Atoi(strings.TrimSpace(v))
			}
		}
	}
	g, err := l.scrape("go_goroutines")
	must(t, err)
	s.goroutines = int(g)
	return s
}
