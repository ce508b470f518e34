package soak_test

import (
	"context"
	"crypto/sha256"
	"fmt"
	"io/fs"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/vishvananda/netlink"

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
	ag      *testutil.Agent
	cfg     string // the agent's config file
	client  *http.Client
	dp      *loader.Objects // opened like the plugin does, for reading maps
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
	l.client = testutil.NetnsHTTPClient(env.Node.Do, 15*time.Second)

	// underpassd leaves its lock file (/run/underpass/underpassd-<hash of
	// the pin dir>.lock) behind by design; this pin dir is the test's own,
	// so the file goes after the agent (cleanups run last to first).
	sum := sha256.Sum256([]byte(filepath.Clean(l.bpffs)))
	lockFile := filepath.Join("/run/underpass", fmt.Sprintf("underpassd-%x.lock", sum[:8]))
	t.Cleanup(func() { os.Remove(lockFile) })

	l.cfg = filepath.Join(t.TempDir(), "underpass.yaml")
	must(t, os.WriteFile(l.cfg, fmt.Appendf(nil, agentConfig, l.bpffs, metricsAddr), 0o644))
	l.ag = l.startAgent()
	l.waitReady()

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
	l.net, err = testutil.WriteConflist(filepath.Join(confDir, "soak.conflist"), "soak", "1.1.0", map[string]any{
		"type": "underpass", "master": l.up.Name, "mode": "macvlan", "macvlanMode": "bridge", "bpffs": l.bpffs,
		"ipam": l.up.HostLocalIPAM(l.dataDir, true),
	})
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
	return testutil.PodRuntimeConf(p.id, p.netns, "eth0", "soak", p.name, [2]string{"K8S_POD_UID", p.id})
}

// add runs ADD as the runtime does, from the node netns (the plugin starts
// there), and records the addresses and MAC.
func (l *lab) add(p *pod) error {
	r, err := testutil.CNIAdd(context.Background(), l.env.Node.Do, l.cni, l.net, p.rt())
	if err != nil {
		return err
	}
	p.ip4, p.ip6, p.mac = testutil.ResultAddrs(r, "eth0")
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

// startAgent runs underpassd in the node netns with the lab's config. It
// is killed when the test ends, and the end of its log is shown if the test
// failed.
func (l *lab) startAgent() *testutil.Agent {
	return testutil.StartAgent(l.t, "underpassd", l.env.Node.Command(context.Background(), agentBin, "--config", l.cfg, "--log-level", "debug"), 150)
}

// stopAgent sends SIGTERM and expects a clean exit.
func stopAgent(t *testing.T, a *testutil.Agent) {
	t.Helper()
	if !a.Terminate(10 * time.Second) {
		t.Errorf("underpassd did not stop within 10s of SIGTERM")
		return
	}
	if err := a.Err(); err != nil {
		t.Errorf("underpassd exited with %v", err)
	}
}

func (l *lab) waitReady() { l.ag.WaitReady(l.t, l.get, 60*time.Second) }

func (l *lab) get(path string) (int, string, error) {
	return testutil.HTTPGet(l.client, "http://"+metricsAddr+path)
}

// metric returns one unlabelled series from a /metrics body, or an error.
func metric(body, name string) (float64, error) {
	v, found, err := testutil.SeriesValue(body, name)
	if !found {
		return 0, fmt.Errorf("no series %s in /metrics", name)
	}
	return v, err
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

	s.agentFDs, s.agentNetns, err = fds(l.ag.Pid())
	must(t, err)
	_, s.testNetns, err = fds(os.Getpid())
	must(t, err)
	if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", l.ag.Pid())); err == nil {
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
