package cni_test

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/plugins/pkg/testutils"
	"github.com/vishvananda/netlink"

	"github.com/underpass-cni/underpass/internal/attach"
	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
	"github.com/underpass-cni/underpass/internal/testutil"
	"github.com/underpass-cni/underpass/test/netenv"
)

// DEL after the runtime deleted the netns: the slave and its filters went
// with it, the registration and the lease must still go.
func TestDelAfterNetnsDeleted(t *testing.T) {
	for _, tc := range []struct {
		name string
		keep bool // the runtime unmounted the namespace but the file stays
	}{{"removed", false}, {"unmounted, file kept", true}} {
		t.Run(tc.name, func(t *testing.T) {
			h, l := newMainHarness(t, "up-gone", false)
			n, err := testutils.NewNS()
			must(t, err)
			p := &pod{name: "gone", netns: n.Path(), id: "ctr-gone", ifname: "eth0"}
			h.add(l, p)
			h.baselineParents()
			h.endpointOf(t, p)

			n.Close()
			must(t, testutils.UnmountNS(n))
			if _, err := os.Stat(p.netns); !errors.Is(err, fs.ErrNotExist) {
				t.Fatalf("netns still there: %v", err)
			}
			if tc.keep {
				// Until December 2026 DEL failed on this for ever
				// ("unknown FS magic"): the pod stuck in Terminating.
				must(t, os.WriteFile(p.netns, nil, 0o444))
				t.Cleanup(func() { os.Remove(p.netns) })
			}
			h.del(l, p)
			h.del(l, p) // and again
			h.assertNoLeak(t, nil)
		})
	}
}

// DEL with the link already gone, then with everything gone.
func TestDelIdempotent(t *testing.T) {
	h := newHarness(t, harnessOpts{})
	l := h.conflist("up-idem", "1.0.0", h.mainConf(true))
	p := h.addFirstPod(l, "p")
	eth0, err := p.ns.Netlink().LinkByName("eth0")
	must(t, err)
	must(t, p.ns.Netlink().LinkDel(eth0))
	h.del(l, p)
	h.del(l, p)
	h.assertNoLeak(t, nil, p.ns)
}

// DEL after underpassd removed the datapath: the plugin has nothing to
// unregister, but the lease and the link must still go.
func TestDelWithoutDatapath(t *testing.T) {
	h, l := newMainHarness(t, "up-nodp", true)
	p := h.addPod(l, "p")
	must(t, loader.Unload(h.bpffs))
	h.del(l, p)
	if got := linkNames(t, p.ns); len(got) != 1 {
		t.Fatalf("links left in the pod: %v", got)
	}
	h.assertLeases(t, 0)
	// STATUS and ADD now say what to do.
	wantCNIError(t, h.status(l), types.ErrPluginNotAvailable, "underpass datapath not loaded in "+h.bpffs+": start underpassd")
	q := h.newPod("q")
	_, err := h.tryAdd(l, q)
	wantCNIError(t, err, types.ErrTryAgainLater, "underpass datapath not loaded in "+h.bpffs+": start underpassd")
	h.assertLeases(t, 0)
	if got := linkNames(t, q.ns); len(got) != 1 {
		t.Fatalf("failed ADD left links in the pod: %v", got)
	}
}

func (h *harness) assertLeases(t *testing.T, want int) {
	t.Helper()
	if n := h.leaseCount(); n != want {
		t.Fatalf("%d leases, want %d", n, want)
	}
}

func (h *harness) leaseCount() int {
	var leases []string
	_ = filepath.WalkDir(h.dataDir, func(path string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			if _, perr := netip.ParseAddr(strings.ReplaceAll(d.Name(), "_", ":")); perr == nil {
				leases = append(leases, d.Name())
			}
		}
		return nil
	})
	return len(leases)
}

func TestStatus(t *testing.T) {
	h := newHarness(t, harnessOpts{netenv: netenv.Options{SecondUplink: true}})
	ok := h.conflist("up-status", "1.1.0", h.mainConf(false))
	if err := h.status(ok); err != nil {
		t.Fatalf("STATUS: %v", err)
	}
	chained := h.conflist("up-status-chained", "1.1.0", h.chainedConfs(false)...)
	if err := h.status(chained); err != nil {
		t.Fatalf("STATUS chained: %v", err)
	}
	// libcni sends STATUS no prevResult: the chained entry must not be
	// taken for a main plugin whose master is the default-route NIC (on a
	// node with no default route, that STATUS failed).
	routes, err := h.env.Node.Netlink().RouteList(nil, netlink.FAMILY_ALL)
	must(t, err)
	var defaults []netlink.Route
	for _, r := range routes {
		if isDefault(r) {
			defaults = append(defaults, r)
		}
	}
	if len(defaults) == 0 {
		t.Fatal("the lab node has no default route to take away")
	}
	for _, r := range defaults {
		must(t, h.env.Node.Netlink().RouteDel(&r))
	}
	if err := h.status(chained); err != nil {
		t.Fatalf("STATUS chained on a node with no default route: %v", err)
	}
	for _, r := range defaults {
		must(t, h.env.Node.Netlink().RouteAdd(&r))
	}

	missing := h.mainConf(false)
	missing["master"] = "eth9"
	wantCNIError(t, h.status(h.conflist("up-status-missing", "1.1.0", missing)), types.ErrPluginNotAvailable, `master "eth9" not found`)

	eth1, err := h.env.Node.Netlink().LinkByName("eth1")
	must(t, err)
	must(t, h.env.Node.Netlink().LinkSetDown(eth1))
	down := h.mainConf(false)
	down["master"] = "eth1"
	wantCNIError(t, h.status(h.conflist("up-status-down", "1.1.0", down)), types.ErrPluginNotAvailable, "master eth1 is down: bring it up")

	gone := h.mainConf(false)
	gone["bpffs"] = h.bpffs + "_none"
	wantCNIError(t, h.status(h.conflist("up-status-nodp", "1.1.0", gone)), types.ErrPluginNotAvailable,
		"underpass datapath not loaded in "+h.bpffs+"_none: start underpassd")
}

// CHECK passes on a healthy pod and names what drifted otherwise.
func TestCheckDrift(t *testing.T) {
	h, l := newMainHarness(t, "up-check", true)
	for _, tc := range []struct {
		name  string
		drift func(t *testing.T, p *pod)
		want  string
	}{
		{"registration removed", func(t *testing.T, p *pod) {
			id, _ := h.endpointOf(t, p)
			must(t, datapath.Unregister(&h.dp.Maps, id))
		}, "is not registered"},
		{"programs detached", func(t *testing.T, p *pod) {
			id, _ := h.endpointOf(t, p)
			must(t, attach.DetachEndpoint(attach.EndpointOptions{ID: id, Ifindex: mustIndex(t, p), Netns: p.netns}))
		}, "ingress not attached; egress not attached"},
		{"another endpoint attached", func(t *testing.T, p *pod) {
			id, _ := h.endpointOf(t, p)
			must(t, attach.Endpoint(h.dp.EndpointTarget(id+1, p.netns, mustIndex(t, p))))
		}, "runs endpoint"},
		{"address removed", func(t *testing.T, p *pod) {
			l, err := p.ns.Netlink().LinkByName("eth0")
			must(t, err)
			addrs, err := p.ns.Netlink().AddrList(l, netlink.FAMILY_V4)
			must(t, err)
			must(t, p.ns.Netlink().AddrDel(l, &addrs[0]))
		}, "interface drifted"},
		{"interface down", func(t *testing.T, p *pod) {
			l, err := p.ns.Netlink().LinkByName("eth0")
			must(t, err)
			must(t, p.ns.Netlink().LinkSetDown(l))
		}, "eth0 is down"},
		{"address moved to another endpoint", func(t *testing.T, p *pod) {
			k := datapath.EpIPKey(p.ip4, p.parentIndex(t))
			must(t, h.dp.Maps.EpByIp.Put(&k, &loader.EndpointRef{Id: 77}))
			// Unregister leaves another endpoint's entry alone: the test
			// removes its own forgery.
			t.Cleanup(func() { must(t, h.dp.Maps.EpByIp.Delete(&k)) })
		}, "does not lead to endpoint"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := h.newPod(strings.ReplaceAll(tc.name, " ", "-"))
			h.add(l, p)
			if err := h.check(l, p); err != nil {
				t.Fatalf("CHECK of a healthy pod: %v", err)
			}
			tc.drift(t, p)
			err := h.check(l, p)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("CHECK after %s: %v, want it to say %q", tc.name, err, tc.want)
			}
			t.Logf("CHECK: %v", err)
			h.del(l, p)
		})
	}
	h.baselineParents()
	h.assertNoLeak(t, nil)
}

// GC: attachments not in cni.dev/valid-attachments lose their registration
// and programs even when the runtime lost every trace of them (no libcni
// cache, so libcni itself issues no DEL).
func TestGC(t *testing.T) {
	h, l := newMainHarness(t, "up-gc", false)
	a, b, c := h.newPod("a"), h.newPod("b"), h.newPod("c")
	for _, p := range []*pod{a, b, c} {
		h.add(l, p)
	}
	h.baselineParents()
	// The runtime forgot c.
	must(t, os.Remove(filepath.Join(h.cacheDir, "results", fmt.Sprintf("%s-%s-%s", l.Name, c.id, c.ifname))))

	if err := h.gc(l, a, b); err != nil {
		t.Fatalf("GC: %v", err)
	}
	if id, _, _ := datapath.Find(&h.dp.Maps, c.id, c.ifname); id != 0 {
		t.Fatalf("c still registered as %d", id)
	}
	// c's netns still exists: its interface no longer runs its programs.
	if att, err := attach.InspectEndpoint(c.netns, mustIndex(t, c)); err != nil || att != (attach.EndpointFilters{}) {
		t.Fatalf("c's interface after GC: filters %+v, %v; want none", att, err)
	}
	// host-local v1.9.1 has no GC of its own (its GC is a FIXME), so c's
	// lease outlives the delegated GC; DEL of c below releases it.
	if n := h.leaseCount(); n != 2 && n != 3 {
		t.Fatalf("%d leases after GC, want 2 or 3", n)
	}
	h.checkRegistered(t, a)
	h.checkRegistered(t, b)
	netenv.MustPing(t, a.ns, b.ip4, 2)
	netenv.MustPing(t, h.env.Node, a.ip4, 2)

	// c's netns is still there (GC cannot know it): its DEL, when the
	// runtime finds it, succeeds with nothing registered.
	h.del(l, c)
	h.del(l, a)
	h.del(l, b)
	h.assertNoLeak(t, nil, a.ns, b.ns, c.ns)
}

// Two networks on one parent (Multus: a main-mode network and a chained
// one): GC of each judges only its own pods. Seen before registrations
// recorded their network: GC of net1 removed every pod of net2, whose
// attachments are not in net1's list.
func TestGCPerNetwork(t *testing.T) {
	h := newHarness(t, harnessOpts{})
	u := h.env.Uplinks[0]
	net1 := h.conflist("up-net1", "1.1.0", h.mainConf(false))
	// net2's range is apart from net1's (.100-.199): one parent, one L2.
	ipam2 := h.hostLocal(false)
	ipam2["ranges"] = []any{[]any{map[string]any{
		"subnet": u.Subnet4.String(), "rangeStart": u.IP4(200).Addr().String(), "rangeEnd": u.IP4(219).Addr().String(),
		"gateway": u.Gateway4.String(),
	}}}
	chained := h.chainedConfs(false)
	chained[0]["ipam"] = ipam2
	net2 := h.conflist("up-net2", "1.1.0", chained...)

	a1, b1 := h.newPod("a1"), h.newPod("b1")
	a2, b2 := h.newPod("a2"), h.newPod("b2")
	h.add(net1, a1)
	h.add(net1, b1)
	h.add(net2, a2)
	h.add(net2, b2)
	h.baselineParents()

	// The runtime forgot b1 and b2; each network's GC lists its own live pod.
	if err := h.gc(net1, a1); err != nil {
		t.Fatalf("GC net1: %v", err)
	}
	for _, p := range []*pod{a1, a2, b2} {
		h.checkRegistered(t, p)
	}
	if id, _, _ := datapath.Find(&h.dp.Maps, b1.id, b1.ifname); id != 0 {
		t.Fatalf("b1 (net1, not valid) still registered as %d after GC of net1", id)
	}
	// net2's pods still have their hairpin: a2 reaches b2 and the node.
	netenv.MustPing(t, a2.ns, b2.ip4, 2)
	netenv.MustPing(t, h.env.Node, a2.ip4, 2)

	// GC of the chained network gets no prevResult from libcni: it is
	// still chained (no lease of the macvlan plugin is touched by it) and
	// still judges only its own pods.
	if err := h.gc(net2, a2); err != nil {
		t.Fatalf("GC net2: %v", err)
	}
	h.checkRegistered(t, a1)
	h.checkRegistered(t, a2)
	if id, _, _ := datapath.Find(&h.dp.Maps, b2.id, b2.ifname); id != 0 {
		t.Fatalf("b2 (net2, not valid) still registered as %d after GC of net2", id)
	}
	netenv.MustPing(t, a1.ns, a2.ip4, 2)
	netenv.MustPing(t, h.env.Node, a1.ip4, 2)

	h.del(net1, a1)
	h.del(net1, b1)
	h.del(net2, a2)
	h.del(net2, b2)
	h.assertNoLeak(t, nil, a1.ns, b1.ns, a2.ns, b2.ns)
}

func isDefault(r netlink.Route) bool {
	if r.Dst == nil {
		return true
	}
	ones, _ := r.Dst.Mask.Size()
	return ones == 0
}

func mustIndex(t *testing.T, p *pod) int {
	t.Helper()
	l, err := p.ns.Netlink().LinkByName(p.ifname)
	must(t, err)
	return l.Attrs().Index
}

// 50 ADDs at once, then 50 DELs at once: no failure, distinct addresses,
// every pod registered and reachable, nothing left.
func TestConcurrentAddDel(t *testing.T) {
	h, l := newMainHarness(t, "up-many", false)
	const n = 50
	pods := make([]*pod, n)
	for i := range pods {
		pods[i] = h.newPod(fmt.Sprintf("p%d", i))
	}
	run := func(verb string, fn func(p *pod) error) {
		t.Helper()
		var wg sync.WaitGroup
		errs := make([]error, n)
		start := time.Now()
		for i, p := range pods {
			wg.Go(func() { errs[i] = fn(p) })
		}
		wg.Wait()
		t.Logf("%d concurrent %s in %v", n, verb, time.Since(start).Round(time.Millisecond))
		if err := errors.Join(errs...); err != nil {
			t.Fatalf("%s: %v", verb, err)
		}
	}
	run("ADDs", func(p *pod) error { _, err := h.tryAdd(l, p); return err })
	h.baselineParents()

	seen := map[netip.Addr]bool{}
	for _, p := range pods {
		if seen[p.ip4] {
			t.Fatalf("address %s handed out twice", p.ip4)
		}
		seen[p.ip4] = true
		h.checkRegistered(t, p)
	}
	eps, err := datapath.Endpoints(&h.dp.Maps)
	must(t, err)
	if len(eps) != n {
		t.Fatalf("%d endpoints registered, want %d", len(eps), n)
	}
	netenv.MustPing(t, pods[0].ns, pods[n-1].ip4, 2)
	netenv.MustPing(t, h.env.Node, pods[n/2].ip4, 2)

	run("DELs", func(p *pod) error { return h.tryDel(l, p) })
	nss := make([]*netenv.NS, n)
	for i, p := range pods {
		nss[i] = p.ns
	}
	h.assertNoLeak(t, nil, nss...)
}

func TestVersion(t *testing.T) {
	h := &harness{t: t, cni: libcni.NewCNIConfigWithCacheDir([]string{pluginDir}, t.TempDir(), nil)}
	info, err := h.cni.GetVersionInfo(context.Background(), "underpass")
	must(t, err)
	got := info.SupportedVersions()
	for _, v := range []string{"0.3.1", "0.4.0", "1.0.0", "1.1.0"} {
		if !slices.Contains(got, v) {
			t.Errorf("VERSION says %v, missing %s", got, v)
		}
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	testutil.WaitFor(t, 10*time.Second, what, cond)
}

// orderIPAM is a stand-in IPAM plugin of a type underpass does not know
// (as dhcp is not one it overlaps): it hands out one address and records,
// at each DEL, whether the interface is still in the pod. The real dhcp
// daemon sends its DHCPRELEASE through that interface, and without it the
// server keeps the lease until it expires.
const orderIPAM = `#!/bin/sh
case "$CNI_COMMAND" in
ADD) printf '{"cniVersion":"1.0.0","ips":[{"address":"%s"}]}' "$ORDER_IPAM_ADDR" ;;
DEL) if nsenter --net="$CNI_NETNS" ip link show "$CNI_IFNAME" >/dev/null 2>&1; then
	echo present >>"$ORDER_IPAM_LOG"
else
	echo absent >>"$ORDER_IPAM_LOG"
fi ;;
VERSION) echo '{"cniVersion":"1.0.0","supportedVersions":["0.3.1","0.4.0","1.0.0","1.1.0"]}' ;;
esac
`

// An IPAM type that may use the interface (dhcp, or any underpass does not
// know) is released while the interface is there, on DEL and on a failed
// ADD's rollback, as the reference plugins do. Until December 2026 both
// deleted the interface first, so dhcp's release never reached the server.
func TestIPAMReleasedBeforeTheInterfaceGoes(t *testing.T) {
	dir := t.TempDir()
	must(t, os.WriteFile(filepath.Join(dir, "order-ipam"), []byte(orderIPAM), 0o755))
	for _, tc := range []struct {
		name       string
		failpoints string // "": a plain ADD then DEL
	}{{"DEL", ""}, {"failed ADD", "add-ipam=error"}} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, harnessOpts{})
			u := h.env.Uplinks[0]
			logPath := filepath.Join(t.TempDir(), "ipam.log")
			t.Setenv("ORDER_IPAM_LOG", logPath)
			t.Setenv("ORDER_IPAM_ADDR", netip.PrefixFrom(u.IP4(77).Addr(), u.Subnet4.Bits()).String())
			conf := h.mainConf(false)
			conf["ipam"] = map[string]any{"type": "order-ipam"}
			l := h.conflist("up-order", "1.1.0", conf)
			bin := pluginDir
			if tc.failpoints != "" {
				h.failpoints(t, tc.failpoints)
				bin = fpDir
			}
			h.cni = libcni.NewCNIConfigWithCacheDir([]string{bin, refDir, dir}, h.cacheDir, nil)
			p := h.newPod("p")
			if _, err := h.tryAdd(l, p); (err != nil) != (tc.failpoints != "") {
				t.Fatalf("ADD: %v", err)
			}
			if tc.failpoints == "" {
				h.baselineParents() // the parent stays registered after the pod's DEL
				h.del(l, p)
			}
			got, err := os.ReadFile(logPath)
			must(t, err)
			if string(got) != "present\n" {
				t.Fatalf("IPAM DELs saw the interface: %q, want once, present", got)
			}
			h.assertNoLeak(t, nil, p.ns)
		})
	}
}
