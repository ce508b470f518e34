// Package cni_test drives the real underpass plugin binary through libcni,
// as a container runtime does, inside a netenv lab whose node netns stands
// for the Kubernetes node. The test loads the datapath itself, standing in
// for underpassd.
package cni_test

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"

	"github.com/underpass-cni/underpass/internal/attach"
	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
	"github.com/underpass-cni/underpass/internal/testutil"
	"github.com/underpass-cni/underpass/test/netenv"
)

var (
	pluginDir string // holds the freshly built underpass binary
	fpDir     string // the same built with failpoints (internal/cni/failpoint_on.go)
	refDir    string // the reference plugins, cached across runs
)

func TestMain(m *testing.M) {
	testutil.Main(m, "test/cni", func(tmp string) (err error) {
		// In the kernel-matrix VMs there is no Go toolchain: the binaries
		// come prebuilt (make test-kernels), laid out as below.
		if dir := os.Getenv("UNDERPASS_CNI_BINS"); dir != "" {
			pluginDir, fpDir, refDir = filepath.Join(dir, "release"), filepath.Join(dir, "failpoints"), filepath.Join(dir, "ref")
			return nil
		}
		pluginDir, fpDir = filepath.Join(tmp, "release"), filepath.Join(tmp, "failpoints")
		if err := testutil.BuildPlugin(filepath.Join(pluginDir, "underpass")); err != nil {
			return err
		}
		if err := testutil.BuildPlugin(filepath.Join(fpDir, "underpass"), "underpass_failpoints"); err != nil {
			return err
		}
		refDir, err = testutil.ReferencePlugins()
		return err
	})
}

type harness struct {
	t        *testing.T
	env      *netenv.Env
	dp       *loader.Objects
	bpffs    string // the datapath's pin dir
	dataDir  string // host-local leases
	confDir  string
	cni      *libcni.CNIConfig
	cacheDir string
	svcNAT   *netenv.ServiceNAT // the live VIP -> the node's address, as kube-proxy would

	baseLinks   []string
	baseParents map[int]loader.Parent
	baseAtts    []attach.Attachment
}

type harnessOpts struct {
	netenv netenv.Options
}

// newHarness builds the lab and loads the datapath like underpassd does:
// config, the node's addresses in host_cidrs, the service CIDR and one live
// VIP, which a DNAT rule on the node sends to the node's address (the
// stand-in for kube-proxy).
func newHarness(t *testing.T, o harnessOpts) *harness {
	t.Helper()
	testutil.RequireRoot(t)
	h := &harness{t: t, env: netenv.New(t, o.netenv)}
	h.bpffs = filepath.Join(testutil.MountBPFFS(t), "underpass")
	dp, err := loader.Load(h.bpffs, loader.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dp.Close() })
	h.dp = dp
	m := &dp.Maps
	must(t, datapath.SetConfig(m, datapath.Config{ServicesSynced: true, HostReachable: true}, 1))
	hosts := datapath.HostSet{}
	for _, u := range h.env.Uplinks {
		hosts.Add(netip.PrefixFrom(u.Node4.Addr(), 32), loader.HostLocal)
		hosts.Add(netip.PrefixFrom(u.Node6.Addr(), 128), loader.HostLocal)
	}
	must(t, datapath.SyncHostCIDRs(m, hosts))
	must(t, datapath.SyncServiceCIDRs(m, []netip.Prefix{netenv.SvcCIDR4}))
	must(t, datapath.AddLiveService(m, netenv.LiveVIP4))
	// The service implementation: DNAT of the live VIP to the node's own
	// address, in prerouting and output, as kube-proxy does.
	h.svcNAT = netenv.AddServiceNAT(t, h.env.Node, netenv.LiveVIP4, h.env.Uplinks[0].Node4.Addr())

	h.dataDir, h.confDir, h.cacheDir = t.TempDir(), t.TempDir(), t.TempDir()
	h.cni = libcni.NewCNIConfigWithCacheDir([]string{pluginDir, refDir}, h.cacheDir, nil)
	h.baseline()
	return h
}

// newMainHarness is newHarness with the default lab and one network, name:
// underpass as the main plugin on eth0 (mainConf), CNI 1.1.0.
func newMainHarness(t *testing.T, name string, v6 bool) (*harness, *libcni.NetworkConfigList) {
	t.Helper()
	h := newHarness(t, harnessOpts{})
	return h, h.conflist(name, "1.1.0", h.mainConf(v6))
}

// failpoints makes the rest of t run the failpoint build of the plugin
// with UNDERPASS_FAILPOINTS=spec (e.g. "add-ipam=error"); hang markers go to
// the returned directory.
func (h *harness) failpoints(t *testing.T, spec string) (markers string) {
	t.Helper()
	markers = t.TempDir()
	t.Setenv("UNDERPASS_FAILPOINTS", spec)
	t.Setenv("UNDERPASS_FAILPOINT_DIR", markers)
	prev := h.cni
	h.cni = libcni.NewCNIConfigWithCacheDir([]string{fpDir, refDir}, h.cacheDir, nil)
	t.Cleanup(func() { h.cni = prev })
	return markers
}

func (h *harness) baseline() {
	h.baseLinks = linkNames(h.t, h.env.Node)
	h.baselineParents()
}

// baselineParents accepts the parent state as it is now: a successful ADD
// registers the parent and attaches its program for good (node state the
// agent shares); only a failed ADD must leave it as it found it.
func (h *harness) baselineParents() {
	var err error
	h.baseParents, err = datapath.Parents(&h.dp.Maps)
	must(h.t, err)
	h.baseAtts, err = attach.List(h.bpffs)
	must(h.t, err)
}

var must = testutil.Must

// conflist writes a conflist to the conf dir and loads it back, as a
// runtime reads /etc/cni/net.d.
func (h *harness) conflist(name, version string, plugins ...map[string]any) *libcni.NetworkConfigList {
	h.t.Helper()
	list := make([]any, len(plugins))
	for i, p := range plugins {
		list[i] = p
	}
	l, err := testutil.WriteConflist(filepath.Join(h.confDir, name+".conflist"), name, version, list...)
	must(h.t, err)
	return l
}

// hostLocal is a dual-stack host-local IPAM section on the lab's eth0
// subnet; v6=false leaves IPv6 out.
func (h *harness) hostLocal(v6 bool) map[string]any {
	return h.env.Uplinks[0].HostLocalIPAM(h.dataDir, v6)
}

// mainConf is underpass as the main plugin on eth0.
func (h *harness) mainConf(v6 bool) map[string]any {
	return map[string]any{"type": "underpass", "master": "eth0", "mode": "macvlan", "macvlanMode": "bridge", "bpffs": h.bpffs, "ipam": h.hostLocal(v6)}
}

// chainedConfs are the reference macvlan plugin followed by underpass.
func (h *harness) chainedConfs(v6 bool) []map[string]any {
	return []map[string]any{
		{"type": "macvlan", "master": "eth0", "mode": "bridge", "ipam": h.hostLocal(v6)},
		{"type": "underpass", "bpffs": h.bpffs},
	}
}

type pod struct {
	name   string
	ns     *netenv.NS
	netns  string // path
	id     string // container id
	ifname string
	res    *current.Result
	ip4    netip.Addr
	ip6    netip.Addr
	mac    net.HardwareAddr
	// What the runtime passes besides: capability arguments (libcni
	// puts them in runtimeConfig for a plugin that declares them) and
	// CNI_ARGS keys.
	capArgs map[string]any
	args    [][2]string
}

func (h *harness) newPod(name string) *pod {
	n := h.env.AddNS(name)
	return &pod{name: name, ns: n, netns: n.Path, id: "ctr-" + name + "-" + strings.Repeat("0", 8), ifname: "eth0"}
}

// addPod is a new pod, name, added to l.
func (h *harness) addPod(l *libcni.NetworkConfigList, name string) *pod {
	h.t.Helper()
	p := h.newPod(name)
	h.add(l, p)
	return p
}

// addFirstPod is addPod, then the parent state the pod leaves taken as the
// baseline (baselineParents): the pod a test starts from.
func (h *harness) addFirstPod(l *libcni.NetworkConfigList, name string) *pod {
	h.t.Helper()
	p := h.addPod(l, name)
	h.baselineParents()
	return p
}

func (p *pod) rt() *libcni.RuntimeConf {
	rt := testutil.PodRuntimeConf(p.id, p.netns, p.ifname, "default", p.name, append([][2]string{{"K8S_POD_UID", "0000"}}, p.args...)...)
	rt.CapabilityArgs = p.capArgs
	return rt
}

// inNode runs fn with the node netns as the thread's netns: plugins exec'd
// from fn start there, as they would on the node.
func (h *harness) inNode(fn func() error) error {
	return h.env.Node.Do(fn)
}

func (h *harness) tryAdd(l *libcni.NetworkConfigList, p *pod) (*current.Result, error) {
	r, err := testutil.CNIAdd(context.Background(), h.inNode, h.cni, l, p.rt())
	if err != nil {
		return nil, err
	}
	p.res = r
	p.setAddrs(r)
	return r, nil
}

// setAddrs records the addresses and MAC an ADD result gives p; what the
// result lacks keeps its earlier value.
func (p *pod) setAddrs(r *current.Result) {
	ip4, ip6, mac := testutil.ResultAddrs(r, p.ifname)
	if ip4.IsValid() {
		p.ip4 = ip4
	}
	if ip6.IsValid() {
		p.ip6 = ip6
	}
	if mac != nil {
		p.mac = mac
	}
}

func (h *harness) add(l *libcni.NetworkConfigList, p *pod) *current.Result {
	h.t.Helper()
	r, err := h.tryAdd(l, p)
	if err != nil {
		h.t.Fatalf("ADD %s: %v", p.name, err)
	}
	return r
}

func (h *harness) tryDel(l *libcni.NetworkConfigList, p *pod) error {
	return h.inNode(func() error { return h.cni.DelNetworkList(context.Background(), l, p.rt()) })
}

func (h *harness) del(l *libcni.NetworkConfigList, p *pod) {
	h.t.Helper()
	if err := h.tryDel(l, p); err != nil {
		h.t.Fatalf("DEL %s: %v", p.name, err)
	}
}

func (h *harness) check(l *libcni.NetworkConfigList, p *pod) error {
	return h.inNode(func() error { return h.cni.CheckNetworkList(context.Background(), l, p.rt()) })
}

func (h *harness) status(l *libcni.NetworkConfigList) error {
	return h.inNode(func() error { return h.cni.GetStatusNetworkList(context.Background(), l) })
}

func (h *harness) gc(l *libcni.NetworkConfigList, valid ...*pod) error {
	args := &libcni.GCArgs{}
	for _, p := range valid {
		args.ValidAttachments = append(args.ValidAttachments, types.GCAttachment{ContainerID: p.id, IfName: p.ifname})
	}
	return h.inNode(func() error { return h.cni.GCNetworkList(context.Background(), l, args) })
}

// wantCNIError checks that err is a CNI error with code whose message
// contains every part.
func wantCNIError(t *testing.T, err error, code uint, parts ...string) {
	t.Helper()
	if err == nil {
		t.Fatalf("no error, want code %d", code)
	}
	var te *types.Error
	if !errors.As(err, &te) {
		t.Fatalf("error %q is not a CNI error (want code %d)", err, code)
	}
	if te.Code != code {
		t.Fatalf("code %d (%q), want %d", te.Code, te.Msg, code)
	}
	for _, p := range parts {
		if !strings.Contains(te.Msg, p) {
			t.Fatalf("message %q does not say %q", te.Msg, p)
		}
	}
}

func linkNames(tb testing.TB, n *netenv.NS) []string {
	tb.Helper()
	links, err := n.Netlink().LinkList()
	must(tb, err)
	var out []string
	for _, l := range links {
		out = append(out, l.Attrs().Name)
	}
	slices.Sort(out)
	return out
}

// assertNoLeak checks that nothing of any pod but live is left: links on
// the node and in the given container netns, host-local leases, datapath
// entries and parent state an ADD added. (Endpoint filters go with the
// links, checked above.)
func (h *harness) assertNoLeak(t *testing.T, live []*pod, nss ...*netenv.NS) {
	t.Helper()
	if got := linkNames(t, h.env.Node); !slices.Equal(got, h.baseLinks) {
		t.Errorf("node links %v, want %v", got, h.baseLinks)
	}
	for _, n := range nss {
		if got := linkNames(t, n); !slices.Equal(got, []string{"lo"}) {
			t.Errorf("links left in %s: %v", n.Name, got)
		}
	}
	liveIPs := map[string]bool{}
	liveIDs := map[string]bool{}
	for _, p := range live {
		liveIDs[p.id] = true
		for _, a := range []netip.Addr{p.ip4, p.ip6} {
			if a.IsValid() {
				liveIPs[a.String()] = true
			}
		}
	}
	var leases []string
	_ = filepath.WalkDir(h.dataDir, func(path string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			if a, perr := netip.ParseAddr(strings.ReplaceAll(d.Name(), "_", ":")); perr == nil && !liveIPs[a.String()] {
				leases = append(leases, d.Name())
			}
		}
		return nil
	})
	if len(leases) > 0 {
		t.Errorf("host-local leases left: %v", leases)
	}

	m := &h.dp.Maps
	eps, err := datapath.Endpoints(m)
	must(t, err)
	for id, ep := range eps {
		if !liveIDs[ep.ContainerID] {
			t.Errorf("endpoint %d (%s/%s) left registered", id, ep.ContainerID, ep.IfName)
		}
	}
	if n := countEntries(t, m.EpByIp); n != len(liveIPs) {
		t.Errorf("ep_by_ip has %d entries, want %d", n, len(liveIPs))
	}
	if n := countEntries(t, m.EpStats); n != len(eps) {
		t.Errorf("ep_stats has %d entries for %d endpoints", n, len(eps))
	}
	if n := countEntries(t, m.EpByMac); n > len(eps) {
		t.Errorf("ep_by_mac has %d entries for %d endpoints", n, len(eps))
	}
	if len(live) == 0 {
		parents, err := datapath.Parents(m)
		must(t, err)
		if len(parents) != len(h.baseParents) {
			t.Errorf("parents %v, want %v", parents, h.baseParents)
		}
		atts, err := attach.List(h.bpffs)
		must(t, err)
		if len(atts) != len(h.baseAtts) {
			t.Errorf("parent attachments %v, want %v", atts, h.baseAtts)
		}
	}
}

func countEntries(tb testing.TB, m interface {
	NextKeyBytes(key any) ([]byte, error)
}) int {
	tb.Helper()
	n := 0
	var key any
	for {
		next, err := m.NextKeyBytes(key)
		must(tb, err)
		if next == nil {
			return n
		}
		n++
		key = next
	}
}

// endpointOf returns the registration of p.
func (h *harness) endpointOf(t *testing.T, p *pod) (uint32, *datapath.Endpoint) {
	t.Helper()
	id, ep, err := datapath.Find(&h.dp.Maps, p.id, p.ifname)
	must(t, err)
	if id == 0 {
		t.Fatalf("pod %s is not registered", p.name)
	}
	return id, ep
}

func (h *harness) stats(t *testing.T, p *pod) loader.EndpointStats {
	t.Helper()
	id, _ := h.endpointOf(t, p)
	s, err := datapath.EndpointStats(&h.dp.Maps, id)
	must(t, err)
	return s
}

// parentIndex is the parent ifindex the pod is registered on (ep_by_ip and
// ep_by_mac are keyed by it).
func (p *pod) parentIndex(t *testing.T) int {
	t.Helper()
	l, err := p.ns.Netlink().LinkByName(p.ifname)
	if err != nil {
		t.Fatal(err)
	}
	return l.Attrs().ParentIndex
}

// pingBothWays pings each of dsts from pod a, then a's addresses from each
// of froms, n requests a time, and reports every run with a lost reply.
func pingBothWays(t *testing.T, a *pod, dsts []netip.Addr, froms []*netenv.NS, n int) {
	t.Helper()
	for _, dst := range dsts {
		if r := netenv.Ping(t, a.ns, dst, n); r.Lost() != 0 {
			t.Errorf("pod a -> %s: %v", dst, r)
		}
	}
	for _, from := range froms {
		for _, dst := range []netip.Addr{a.ip4, a.ip6} {
			if r := netenv.Ping(t, from, dst, n); r.Lost() != 0 {
				t.Errorf("%s -> pod a %s: %v", from.Name, dst, r)
			}
		}
	}
}

// podPair creates pods a and b, ADDs both with l and takes the parent
// state they leave as the baseline (baselineParents).
func (h *harness) podPair(l *libcni.NetworkConfigList) (a, b *pod) {
	h.t.Helper()
	a, b = h.addPod(l, "a"), h.addPod(l, "b")
	h.baselineParents()
	return a, b
}
