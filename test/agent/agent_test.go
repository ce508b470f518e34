package agent_test

import (
	"errors"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/underpass-cni/underpass/internal/attach"
	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
	"github.com/underpass-cni/underpass/test/netenv"
	"github.com/vishvananda/netlink"
)

const baseConfig = `
hostReachability: %s
staleServices:
  cidrs: [10.96.0.0/16]
services:
  static: [10.96.0.1, 10.96.0.10]
  kubernetes: "false"
`

func cfgReach(on bool) string {
	v := "false"
	if on {
		v = "true"
	}
	return strings.Replace(baseConfig, "%s", v, 1)
}

// setup starts a lab with one macvlan container and a wire host, starts the
// agent, registers the container as the CNI plugin would and waits for the
// agent to attach the parent program.
type rig struct {
	*lab
	ag   *agent
	dp   *loader.Objects
	ctr  *netenv.Container
	wire *netenv.Container
	ep   uint32
}

func setup(t *testing.T) *rig {
	t.Helper()
	l := newLab(t, netenv.Options{})
	ctr := l.AddMacvlanContainer("ctr", l.Uplinks[0].IP4(10), l.Uplinks[0].IP6(10))
	wire := l.AddWireHost("peer", l.Uplinks[0].IP4(20), l.Uplinks[0].IP6(20))
	l.writeConfig(cfgReach(true))
	ag := l.start(agentBin)
	ag.waitReady()
	r := &rig{lab: l, ag: ag, ctr: ctr, wire: wire, dp: l.open()}
	r.ep = l.register(r.dp, ctr, "ctr")
	l.waitParentAttached(l.Uplinks[0].Index)
	return r
}

func (r *rig) nodeIP() netip.Addr { return r.Uplinks[0].Node4.Addr() }

// pingAcross pings the container from the node and the node from the
// container, 400 requests each (4 s), and calls replace (which swaps the
// agent) a second into them; it returns both results.
func (r *rig) pingAcross(t *testing.T, replace func()) (ping, pingBack netenv.PingResult) {
	var wg sync.WaitGroup
	wg.Go(func() { ping = netenv.Ping(t, r.Node, r.ctr.IP4.Addr(), 400) })
	wg.Go(func() { pingBack = netenv.Ping(t, r.ctr.NS, r.nodeIP(), 400) })
	time.Sleep(time.Second)
	replace()
	wg.Wait()
	return ping, pingBack
}

func TestStartAndEndpoints(t *testing.T) {
	r := setup(t)
	if code, body, err := r.get("/healthz"); err != nil || code != 200 {
		t.Fatalf("/healthz: %d %q %v", code, body, err)
	}
	// Host <-> container both ways, IPv4 and IPv6, through the hairpin.
	netenv.MustPing(t, r.Node, r.ctr.IP4.Addr(), 10)
	netenv.MustPing(t, r.Node, r.ctr.IP6.Addr(), 10)
	netenv.MustPing(t, r.ctr.NS, r.nodeIP(), 10)
	netenv.MustPing(t, r.ctr.NS, r.Uplinks[0].Node6.Addr(), 10)

	if v := r.metric("underpass_live_services", ""); v != 2 {
		t.Fatalf("underpass_live_services = %v, want 2", v)
	}
	r.waitMetric("underpass_endpoints", "", 1)
	if v := r.metric("underpass_agent_ready", ""); v != 1 {
		t.Fatalf("underpass_agent_ready = %v on a ready agent, want 1", v)
	}
	for _, res := range []string{"success", "error"} {
		if v := r.metric("underpass_config_reloads_total", `result="`+res+`"`); v != 0 {
			t.Fatalf("reloads{%s} = %v before any reload", res, v)
		}
	}
	live, err := datapath.LiveServices(&r.dp.Maps)
	if err != nil {
		t.Fatal(err)
	}
	if !live[netip.MustParseAddr("10.96.0.1")] || !live[netip.MustParseAddr("10.96.0.10")] || len(live) != 2 {
		t.Fatalf("live services %v", live)
	}
	hosts, err := datapath.LPMEntries(r.dp.Maps.HostCidrs)
	if err != nil {
		t.Fatal(err)
	}
	if hosts[netip.PrefixFrom(r.nodeIP(), 32)] != uint32(loader.HostLocal) {
		t.Fatalf("node address not in host_cidrs as LOCAL: %v", hosts)
	}
	// A node address added later is followed through netlink events.
	extra := netip.MustParsePrefix("192.0.2.200/32")
	if _, _, err := r.Node.Exec(t.Context(), "ip", "addr", "add", extra.String(), "dev", "eth0"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "new node address in host_cidrs", func() bool {
		h, _ := datapath.LPMEntries(r.dp.Maps.HostCidrs)
		return h[extra] == uint32(loader.HostLocal)
	})
	// Someone deletes it from the map (bpftool): the heal puts it back.
	// Until December 2026 the heal compared against the agent's own copy
	// and never saw the edit.
	k := datapath.LPMKey(extra)
	must(t, r.dp.Maps.HostCidrs.Delete(&k))
	waitFor(t, 10*time.Second, "the heal to restore the deleted host_cidrs entry", func() bool {
		h, _ := datapath.LPMEntries(r.dp.Maps.HostCidrs)
		return h[extra] == uint32(loader.HostLocal)
	})

	// Static services: a live VIP is steered to the host, a stale one is
	// dropped at the hairpin (and counted), and the list reloads live.
	staleDrops := func() uint64 {
		d, err := datapath.Drops(&r.dp.Maps)
		if err != nil {
			t.Fatal(err)
		}
		return d[loader.DropStaleService].Packets
	}
	d0 := staleDrops()
	netenv.Ping(t, r.ctr.NS, netip.MustParseAddr("10.96.0.10"), 3)
	if staleDrops() != d0 {
		t.Fatal("traffic to a live static service dropped as stale")
	}
	netenv.Ping(t, r.ctr.NS, netip.MustParseAddr("10.96.0.99"), 3)
	if got := staleDrops() - d0; got != 3 {
		t.Fatalf("stale drops %d for 3 pings to a stale VIP", got)
	}
	r.writeConfig(strings.Replace(cfgReach(true), "10.96.0.1, 10.96.0.10", "10.96.0.1", 1))
	r.waitMetric("underpass_live_services", "", 1)
	netenv.Ping(t, r.ctr.NS, netip.MustParseAddr("10.96.0.10"), 3)
	if got := staleDrops() - d0; got != 6 {
		t.Fatalf("10.96.0.10 not stale after its removal from services.static (%d drops)", got)
	}

	r.ag.stop()
	// A clean stop leaves the datapath attached: the hairpin still works.
	netenv.MustPing(t, r.Node, r.ctr.IP4.Addr(), 10)
}

func TestHostReachabilityFlip(t *testing.T) {
	r := setup(t)
	netenv.MustPing(t, r.Node, r.ctr.IP4.Addr(), 5)

	// Host -> container pings every 10 ms for 5 s while the config flips
	// off and on; container <-> wire pings alongside must lose nothing.
	var wg sync.WaitGroup
	var host, toWire, fromWire netenv.PingResult
	wg.Go(func() { host = netenv.Ping(t, r.Node, r.ctr.IP4.Addr(), 500) })
	wg.Go(func() { toWire = netenv.Ping(t, r.ctr.NS, r.wire.IP4.Addr(), 500) })
	wg.Go(func() { fromWire = netenv.Ping(t, r.wire.NS, r.ctr.IP6.Addr(), 500) })

	time.Sleep(500 * time.Millisecond)
	r.writeConfig(cfgReach(false))
	waitFor(t, 5*time.Second, "hostReachability off in the datapath", func() bool {
		c, _, err := datapath.GetConfig(&r.dp.Maps)
		return err == nil && !c.HostReachable
	})
	blockedAt := time.Now()
	time.Sleep(time.Second)
	r.writeConfig(cfgReach(true))
	waitFor(t, 5*time.Second, "hostReachability on in the datapath", func() bool {
		c, _, err := datapath.GetConfig(&r.dp.Maps)
		return err == nil && c.HostReachable
	})
	t.Logf("host unreachable for %s", time.Since(blockedAt).Round(time.Millisecond))
	wg.Wait()

	t.Logf("host->container %v; container->wire %v; wire->container %v", host, toWire, fromWire)
	if host.Lost() == 0 {
		t.Fatal("host pings never stopped while hostReachability was off")
	}
	if host.Received == 0 {
		t.Fatal("host pings never worked")
	}
	if toWire.Lost() != 0 || fromWire.Lost() != 0 {
		t.Fatalf("container <-> wire lost pings: %v / %v", toWire, fromWire)
	}
	// Resumed.
	netenv.MustPing(t, r.Node, r.ctr.IP4.Addr(), 10)
	netenv.MustPing(t, r.ctr.NS, r.nodeIP(), 10)
	drops, err := datapath.Drops(&r.dp.Maps)
	if err != nil {
		t.Fatal(err)
	}
	if drops[loader.DropHostUnreachable].Packets == 0 {
		t.Fatal("no host_unreachable drops counted")
	}
	r.waitMetric("underpass_config_reloads_total", `result="success"`, 2)
}

func TestInvalidConfig(t *testing.T) {
	r := setup(t)
	_, gen0, err := datapath.GetConfig(&r.dp.Maps)
	if err != nil {
		t.Fatal(err)
	}

	// Overlaps the node subnet (192.0.2.0/24): valid YAML, invalid here.
	r.writeConfig("hostReachability: false\nstaleServices: {cidrs: [192.0.2.128/25]}\nservices: {kubernetes: \"false\"}\n")
	r.waitMetric("underpass_config_reloads_total", `result="error"`, 1)
	// A file that does not parse.
	r.writeConfig("hostReachability: false\nstaleServices: {cidrs: [10.96.0.0/33]}\n")
	r.waitMetric("underpass_config_reloads_total", `result="error"`, 2)

	lines := r.ag.rejections()
	if len(lines) != 2 || !strings.Contains(lines[0], "staleServices.cidrs[0]") || !strings.Contains(lines[1], "staleServices.cidrs[0]") {
		t.Fatalf("want two one-line rejections naming staleServices.cidrs[0], got %q", lines)
	}
	c, gen, err := datapath.GetConfig(&r.dp.Maps)
	if err != nil {
		t.Fatal(err)
	}
	if !c.HostReachable || gen != gen0 {
		t.Fatalf("rejected config changed the datapath: %+v generation %d -> %d", c, gen0, gen)
	}
	cidrs, _ := datapath.LPMEntries(r.dp.Maps.SvcCidrs)
	if len(cidrs) != 1 || cidrs[netip.MustParsePrefix("10.96.0.0/16")] == 0 {
		t.Fatalf("service CIDRs changed: %v", cidrs)
	}
	netenv.MustPing(t, r.Node, r.ctr.IP4.Addr(), 5)
	if r.metric("underpass_config_reloads_total", `result="success"`) != 0 {
		t.Fatal("a rejected config counted as success")
	}

	// SIGHUP re-reads the (now valid) file.
	r.writeConfig(cfgReach(true) + "hostCIDRs: [169.254.20.10/32]\n")
	r.waitMetric("underpass_config_reloads_total", `result="success"`, 1)
	hosts, _ := datapath.LPMEntries(r.dp.Maps.HostCidrs)
	if hosts[netip.MustParsePrefix("169.254.20.10/32")] != uint32(loader.HostSteer) {
		t.Fatalf("hostCIDRs not applied: %v", hosts)
	}
	if err := r.ag.Cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	r.waitMetric("underpass_config_reloads_total", `result="success"`, 2)

	// At start-up an invalid config is fatal, with the key in the message.
	r.ag.stop()
	r.writeConfig("staleServices: {cidrs: [192.0.0.0/16]}\nservices: {kubernetes: \"false\"}\n")
	bad := r.start(agentBin)
	if err := bad.wait(10 * time.Second); err == nil {
		t.Fatal("underpassd started with a service CIDR overlapping the node subnet")
	}
	if out := bad.Out.String(); !strings.Contains(out, "staleServices.cidrs[0]") || !strings.Contains(out, "overlaps node subnet") {
		t.Fatalf("start-up error does not name the key:\n%s", out)
	}
}

// TestRestartKill9 kills the agent in the middle of a 100/s ping between the
// host and a container: the pinned datapath keeps forwarding, and the new
// agent adopts it.
func TestRestartKill9(t *testing.T) {
	r := setup(t)
	before := r.waitParentAttached(r.Uplinks[0].Index)
	_, gen0, _ := datapath.GetConfig(&r.dp.Maps)

	var took time.Duration
	ping, pingBack := r.pingAcross(t, func() {
		r.ag.Kill()
		time.Sleep(500 * time.Millisecond) // no agent at all for a while
		took = r.start(agentBin).waitReady()
	})
	t.Logf("restart to ready: %s; %v; %v", took.Round(time.Millisecond), ping, pingBack)
	if ping.Lost() != 0 || pingBack.Lost() != 0 {
		t.Fatalf("lost pings across kill -9 and restart: %v / %v", ping, pingBack)
	}
	after := r.waitParentAttached(r.Uplinks[0].Index)
	if after.ID != before.ID {
		t.Fatalf("parent link replaced (%d -> %d), want it adopted", before.ID, after.ID)
	}
	eps, _ := datapath.Endpoints(&r.dp.Maps)
	if _, ok := eps[r.ep]; !ok || len(eps) != 1 {
		t.Fatalf("endpoints after restart: %v", eps)
	}
	if _, gen, _ := datapath.GetConfig(&r.dp.Maps); gen <= gen0 {
		t.Fatalf("config generation %d after restart, want > %d", gen, gen0)
	}
	r.waitMetric("underpass_live_services", "", 2)
}

// TestUpgrade replaces the agent with one that loads a different program
// build while pings run: the links are updated in place.
func TestUpgrade(t *testing.T) {
	r := setup(t)
	before := r.waitParentAttached(r.Uplinks[0].Index)
	progs0 := tcxPrograms(t, r.Node, r.Uplinks[0].Index)
	// The pod's programs, as the plugin attaches them: its stubs must run
	// the new build's endpoint programs afterwards, without a re-attach.
	must(t, attach.Endpoint(r.dp.EndpointTarget(r.ep, r.ctr.Path, r.ctr.Index)))
	ep0 := epProgIDs(t, r.dp)

	ping, pingBack := r.pingAcross(t, func() {
		r.ag.stop()
		r.start(upgradeBin).waitReady()
	})
	if ping.Lost() != 0 || pingBack.Lost() != 0 {
		t.Fatalf("lost pings across the upgrade: %v / %v", ping, pingBack)
	}
	after := r.waitParentAttached(r.Uplinks[0].Index)
	if after.ID != before.ID {
		t.Fatalf("link replaced (%d -> %d) instead of updated in place", before.ID, after.ID)
	}
	if after.Program == before.Program {
		t.Fatalf("link still runs program %d after the upgrade", before.Program)
	}
	if id := pinnedProgramID(t, filepath.Join(r.dir, "progs", "parent_egress")); ebpf.ProgramID(id) != after.Program {
		t.Fatalf("link runs program %d, pinned parent_egress is %d", after.Program, id)
	}
	progs1 := tcxPrograms(t, r.Node, r.Uplinks[0].Index)
	if len(progs0) != 1 || len(progs1) != 1 {
		t.Fatalf("tcx egress programs on eth0: before %v, after %v; want exactly one", progs0, progs1)
	}
	// The new build traces redirects: proof that it is what runs.
	netenv.MustPing(t, r.Node, r.ctr.IP4.Addr(), 3)
	var traces []loader.Trace
	if err := r.dp.Maps.Trace.Lookup(uint32(0), &traces); err != nil {
		t.Fatal(err)
	}
	if !slices.ContainsFunc(traces, func(tr loader.Trace) bool { return tr.Count > 0 }) {
		t.Fatal("the upgraded program did not record redirects")
	}

	// Every endpoint moved to the new endpoint programs at once.
	ep1 := epProgIDs(t, r.dp)
	for slot, id := range ep1 {
		if id == ep0[slot] {
			t.Fatalf("ep_progs slot %d still holds program %d after the upgrade", slot, id)
		}
	}
	for slot, name := range []string{"ep_ingress_body", "ep_egress_body"} {
		if want := pinnedProgramID(t, filepath.Join(r.dir, "progs", name)); ep1[slot] != want {
			t.Fatalf("ep_progs slot %d holds program %d, pinned %s is %d", slot, ep1[slot], name, want)
		}
	}
	tx0 := r.epTx(t)
	netenv.MustPing(t, r.ctr.NS, r.nodeIP(), 3)
	if tx := r.epTx(t); tx < tx0+3 {
		t.Fatalf("the pod's tx counter moved %d -> %d over 3 pings after the upgrade", tx0, tx)
	}
}

// epProgIDs reads the program ids in the ep_progs slots (ingress, egress).
func epProgIDs(t *testing.T, dp *loader.Objects) [2]uint32 {
	t.Helper()
	var ids [2]uint32
	for slot, s := range []loader.EpProg{loader.EpProgIngress, loader.EpProgEgress} {
		must(t, dp.Maps.EpProgs.Lookup(uint32(s), &ids[slot]))
	}
	return ids
}

func pinnedProgramID(t *testing.T, path string) uint32 {
	t.Helper()
	p, err := ebpf.LoadPinnedProgram(path, nil)
	must(t, err)
	defer p.Close()
	id, err := kernelID(p.Info())
	must(t, err)
	return id
}

// epTx is the rig's endpoint's tx packet counter.
func (r *rig) epTx(t *testing.T) uint64 {
	t.Helper()
	s, err := datapath.EndpointStats(&r.dp.Maps, r.ep)
	must(t, err)
	return s.Tx.Packets
}

func TestEndpointGC(t *testing.T) {
	r := setup(t)
	m := &r.dp.Maps
	// A second container whose netns then disappears, as after a node crash
	// that skipped CNI DEL.
	gone := r.AddMacvlanContainer("gone", r.Uplinks[0].IP4(11), netip.Prefix{})
	goneID := r.register(r.dp, gone, "gone")
	// A registration whose interface is gone from a netns that still exists.
	noIf := *r.wire
	noIf.IP4, noIf.IP6 = r.Uplinks[0].IP4(12), netip.Prefix{}
	noIf.Index = 4242
	noIf.ParentIndex, noIf.Parent = r.Uplinks[0].Index, r.Uplinks[0].Name
	noIf.MAC = append([]byte(nil), r.ctr.MAC...)
	noIf.MAC[5] ^= 0x55
	noIfID := r.register(r.dp, &noIf, "noif")

	if err := syscall.Unmount(gone.Path, syscall.MNT_DETACH); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(gone.Path); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "dead endpoints collected", func() bool {
		eps, _ := datapath.Endpoints(m)
		_, a := eps[goneID]
		_, b := eps[noIfID]
		return !a && !b
	})
	eps, _ := datapath.Endpoints(m)
	if _, ok := eps[r.ep]; !ok {
		t.Fatal("GC removed a live endpoint")
	}
	// Keyed as ep_by_ip is (address, parent): a lookup with a key of the
	// wrong size would fail whatever the map holds.
	var ref loader.EndpointRef
	k := datapath.EpIPKey(r.Uplinks[0].IP4(11).Addr(), r.Uplinks[0].Index)
	if err := m.EpByIp.Lookup(&k, &ref); !errors.Is(err, ebpf.ErrKeyNotExist) {
		t.Fatalf("address of a collected endpoint: lookup says %+v, %v; want no entry", ref, err)
	}
	out := r.ag.Out.String()
	if !strings.Contains(out, `reason="netns gone`) || !strings.Contains(out, `reason="interface gone"`) {
		t.Fatalf("GC did not log its reasons:\n%s", out)
	}
	netenv.MustPing(t, r.Node, r.ctr.IP4.Addr(), 5)
}

// A pod whose interface got another MAC (a pod with NET_ADMIN, or an
// interface replaced in place) is collected. Its filters can neither stay
// as they were (they would vet its frames as whichever endpoint gets the
// id next) nor go (the interface would be unguarded: it used to be, and
// then sent as anyone to its bridged neighbours, whose ingress vets only
// registered senders): they are quarantined, and drop all it sends.
func TestEndpointGCQuarantinesAChangedMAC(t *testing.T) {
	newMAC := net.HardwareAddr{0x02, 0x6e, 0x65, 0x77, 0, 1}
	for _, tc := range []struct {
		name, reason string
		mac          net.HardwareAddr // what it sends from after the change
		change       func(*netlink.Handle, netlink.Link) error
	}{
		{"new MAC", `reason="interface replaced (MAC changed)"`, newMAC,
			func(h *netlink.Handle, l netlink.Link) error { return h.LinkSetHardwareAddr(l, newMAC) }},
		// Renamed, its index under another name: it still runs the
		// endpoint's filters, which must not stay on as a freed id's.
		{"renamed", `reason="interface gone (its index now belongs to eth9)"`, nil,
			func(h *netlink.Handle, l netlink.Link) error {
				if err := h.LinkSetDown(l); err != nil {
					return err
				}
				if err := h.LinkSetName(l, "eth9"); err != nil {
					return err
				}
				return h.LinkSetUp(l)
			}},
	} {
		t.Run(tc.name, func(t *testing.T) { gcQuarantines(t, tc.reason, tc.mac, tc.change) })
	}
}

// gcQuarantines registers a pod, changes its interface with change, and
// checks that the collector quarantines it (logging reason) and that
// nothing it forges from mac (nil: its own) gets out.
func gcQuarantines(t *testing.T, reason string, mac net.HardwareAddr, change func(*netlink.Handle, netlink.Link) error) {
	r := setup(t)
	u := r.Uplinks[0]
	c := r.AddMacvlanContainer("changed", u.IP4(13), netip.Prefix{})
	if mac == nil {
		mac = c.MAC
	}
	id := r.register(r.dp, c, "changed")
	must(t, attach.Endpoint(r.dp.EndpointTarget(id, c.Path, c.Index)))
	if f, err := attach.InspectEndpoint(c.Path, c.Index); err != nil || f == (attach.EndpointFilters{}) {
		t.Fatalf("filters before: %+v, %v", f, err)
	}
	l, err := c.Netlink().LinkByIndex(c.Index)
	must(t, err)
	must(t, change(c.Netlink(), l))
	waitFor(t, 10*time.Second, "endpoint with a changed interface collected", func() bool {
		eps, _ := datapath.Endpoints(&r.dp.Maps)
		_, ok := eps[id]
		return !ok
	})
	if f, err := attach.InspectEndpoint(c.Path, c.Index); err != nil || !f.Quarantined || f.Ingress != 0 || f.Egress != 0 {
		t.Fatalf("filters after GC: %+v, %v; want them quarantined", f, err)
	}
	// The collector logs after it has unregistered: wait for the line.
	waitFor(t, 10*time.Second, "the GC's log line saying why", func() bool {
		return strings.Contains(r.ag.Out.String(), reason)
	})

	// The attack: forged sources at a bridged neighbour
	// and at the wire, and its own address at the node.
	forged := u.IP4(250).Addr()
	atNeighbour := netenv.StartCounter(t, r.ctr.NS, r.ctr.IfName, netenv.MatchSrcIP(forged))
	onWire := netenv.StartCounter(t, r.Wire, u.Port, netenv.MatchSrcIP(forged))
	frames := [][]byte{
		netenv.ForgedFrame4(mac, r.ctr.MAC, forged, r.ctr.IP4.Addr()),
		netenv.ForgedFrame4(mac, u.GatewayMAC, forged, u.Gateway4),
	}
	sent, shot, err := netenv.SendFrames(c.NS, c.Index, frames, func(sent int) bool { return sent < 200 })
	must(t, err)
	if r := netenv.Ping(t, c.NS, u.Node4.Addr(), 2); r.Received != 0 {
		t.Errorf("the quarantined pod reached the node: %v", r)
	}
	netenv.MustPing(t, r.Node, r.ctr.IP4.Addr(), 3) // the neighbour is fine; the barrier's path
	netenv.Barrier(t, r.Node, u.Name, onWire)
	if n := atNeighbour.Count() + onWire.Count(); n != 0 || shot != sent {
		t.Errorf("from the quarantined pod: %d forged frames at the neighbour, %d on the wire, %d of %d refused at once; want 0, 0, all",
			atNeighbour.Count(), onWire.Count(), shot, sent)
	}
	t.Logf("quarantined pod: %d forged frames sent, %d refused at once (ENOBUFS), %d at the neighbour, %d on the wire", sent, shot, atNeighbour.Count(), onWire.Count())
}

func TestUninstall(t *testing.T) {
	l := newLab(t, netenv.Options{SecondUplink: true})
	ctr := l.AddMacvlanContainer("ctr", l.Uplinks[0].IP4(10), l.Uplinks[0].IP6(10))
	l.writeConfig(cfgReach(true) + "uplinks: [eth1]\n")
	ag := l.start(agentBin)
	ag.waitReady()
	dp := l.open()
	id := l.register(dp, ctr, "ctr")
	l.waitParentAttached(l.Uplinks[0].Index)
	if p := tcxPrograms(t, l.Node, l.Uplinks[1].Index); len(p) != 1 {
		t.Fatalf("uplink eth1 has programs %v, want one", p)
	}
	// The endpoint's programs inside the container, as the CNI plugin
	// attaches them.
	if err := attach.Endpoint(dp.EndpointTarget(id, ctr.Path, ctr.Index)); err != nil {
		t.Fatal(err)
	}
	// A slave quarantined by the collector: in no registration.
	q := l.AddMacvlanContainer("quarantined", l.Uplinks[0].IP4(11), netip.Prefix{})
	must(t, attach.QuarantineEndpoint(dp.EndpointTarget(0, q.Path, q.Index)))
	if f, err := attach.InspectEndpoint(q.Path, q.Index); err != nil || !f.Quarantined {
		t.Fatalf("quarantine: %+v %v", f, err)
	}

	out, _, err := l.Node.Exec(t.Context(), agentBin, "--config", l.cfg, "--uninstall")
	if err == nil || !strings.Contains(err.Error(), "is running") {
		t.Fatalf("uninstall with the agent running: %v %s", err, out)
	}
	ag.stop()
	netenv.MustPing(t, l.Node, ctr.IP4.Addr(), 3) // still attached after a stop

	out, _, err = l.Node.Exec(t.Context(), agentBin, "--config", l.cfg, "--uninstall")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("uninstall said:\n%s", out)
	for _, want := range []string{
		"detached parent program from eth0",
		"detached uplink program from eth1",
		"detached XDP program from eth0",
		"detached endpoint programs from eth0 in " + ctr.Path,
		"detached quarantined endpoint filters from eth0 in ", // /run/netns/…, the scan's path
		filepath.Base(q.Path) + "\n",
		"removed " + l.dir,
		"removed nftables table inet underpass",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("uninstall output lacks %q", want)
		}
	}
	if out, _, err := l.Node.Exec(t.Context(), "nft", "list", "table", "inet", "underpass"); err == nil {
		t.Errorf("table inet underpass survived the uninstall:\n%s", out)
	}
	if _, err := os.Stat(l.dir); !os.IsNotExist(err) {
		t.Fatalf("pin dir still there: %v", err)
	}
	for _, u := range l.Uplinks {
		if p := tcxPrograms(t, l.Node, u.Index); len(p) != 0 {
			t.Fatalf("programs left on %s: %v", u.Name, p)
		}
	}
	if att, err := attach.InspectEndpoint(ctr.Path, ctr.Index); err != nil || att != (attach.EndpointFilters{}) {
		t.Fatalf("endpoint programs left in the container: %+v %v", att, err)
	}
	if att, err := attach.InspectEndpoint(q.Path, q.Index); err != nil || att != (attach.EndpointFilters{}) {
		t.Fatalf("quarantined filters left in the container: %+v %v", att, err)
	}
	out, _, err = l.Node.Exec(t.Context(), agentBin, "--config", l.cfg, "--uninstall")
	if err != nil || !strings.Contains(out, "nothing to remove") {
		t.Fatalf("second uninstall: %v %s", err, out)
	}
}

// TestParentEvents takes the parent down and up, then deletes and
// re-creates it (new ifindex): the agent re-attaches and moves the
// endpoints that survived.
func TestParentEvents(t *testing.T) {
	r := setup(t)
	eth0 := r.Uplinks[0]
	nl := r.Node.Netlink()

	link0, err := nl.LinkByIndex(eth0.Index)
	if err != nil {
		t.Fatal(err)
	}
	if err := nl.LinkSetDown(link0); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "parent down logged", func() bool { return strings.Contains(r.ag.Out.String(), `msg="parent is down"`) })
	if err := nl.LinkSetUp(link0); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "parent up logged", func() bool { return strings.Contains(r.ag.Out.String(), `msg="parent is up"`) })
	waitFor(t, 5*time.Second, "ping after up", func() bool {
		return netenv.Ping(t, r.Node, r.ctr.IP4.Addr(), 3).Received > 0
	})

	// An endpoint whose interface does not hang off eth0 survives its
	// deletion (an ipvlan-style registration on the wire host's veth):
	// it must follow the parent to its new ifindex.
	surv := *r.wire
	surv.IP4, surv.IP6 = netip.MustParsePrefix("192.0.2.99/24"), netip.Prefix{}
	surv.ParentIndex, surv.Parent = eth0.Index, eth0.Name
	survID, err := datapath.Register(&r.dp.Maps, datapath.Endpoint{
		ContainerID: "survivor", IfName: surv.IfName, Netns: surv.Path, ParentIfindex: eth0.Index, ParentName: "eth0",
		Ifindex: surv.Index, Mode: loader.ModeIPvlanL2, MAC: surv.MAC, Addrs: []netip.Prefix{surv.IP4},
	})
	if err != nil {
		t.Fatal(err)
	}

	oldIndex := eth0.Index
	if err := nl.LinkDel(link0); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "parent deletion logged", func() bool {
		return strings.Contains(r.ag.Out.String(), `msg="parent interface deleted`)
	})
	recreateUplink(t, r.lab, eth0)
	if eth0.Index == oldIndex {
		t.Fatalf("re-created eth0 has the old ifindex %d; the test needs a new one", oldIndex)
	}
	r.waitParentAttached(eth0.Index)
	waitFor(t, 5*time.Second, "parents map moved", func() bool {
		ps, _ := datapath.Parents(&r.dp.Maps)
		_, hasNew := ps[eth0.Index]
		_, hasOld := ps[oldIndex]
		return hasNew && !hasOld
	})
	var ep loader.Endpoint
	if err := r.dp.Maps.Endpoints.Lookup(survID, &ep); err != nil {
		t.Fatal(err)
	}
	if int(ep.ParentIfindex) != eth0.Index {
		t.Fatalf("surviving endpoint still on parent ifindex %d, want %d", ep.ParentIfindex, eth0.Index)
	}
	var ref loader.EndpointRef
	k := datapath.EpIPKey(surv.IP4.Addr(), eth0.Index)
	if err := r.dp.Maps.EpByIp.Lookup(&k, &ref); err != nil || ref.Id != survID {
		t.Fatalf("ep_by_ip ref on parent %d: %+v %v, want endpoint %d", eth0.Index, ref, err, survID)
	}
	// The container's macvlan died with its parent: GC collects it.
	waitFor(t, 10*time.Second, "dead container collected", func() bool {
		eps, _ := datapath.Endpoints(&r.dp.Maps)
		_, ok := eps[r.ep]
		return !ok
	})
	if !strings.Contains(r.ag.Out.String(), `msg="parent re-created: program re-attached and endpoints moved"`) {
		t.Fatal("re-creation not logged")
	}
	if err := datapath.Unregister(&r.dp.Maps, survID); err != nil {
		t.Fatal(err)
	}

	// A new pod on the new parent works both ways.
	c2 := r.AddMacvlanContainer("ctr2", eth0.IP4(13), eth0.IP6(13))
	r.register(r.dp, c2, "ctr2")
	netenv.MustPing(t, r.Node, c2.IP4.Addr(), 10)
	netenv.MustPing(t, c2.NS, r.nodeIP(), 10)
}

// recreateUplink rebuilds a deleted node uplink (veth to the wire bridge,
// addresses) and updates u to the new interface.
func recreateUplink(t *testing.T, l *lab, u *netenv.Uplink) {
	t.Helper()
	must(t, l.RecreateUplink(u))
}
