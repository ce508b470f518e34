package agent_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/underpass-cni/underpass/internal/adopt"
	"github.com/underpass-cni/underpass/internal/attach"
	ctlpkg "github.com/underpass-cni/underpass/internal/ctl"
	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
	"github.com/underpass-cni/underpass/internal/testutil"
	"github.com/underpass-cni/underpass/test/netenv"
	"github.com/vishvananda/netlink"
)

// Slaves made by hand (as `ip netns` users, LXC or Docker do) on a parent
// listed in adopt.parents are served with no step per container: before
// the agent, host <-> container fails both ways (the baseline); with it,
// both work within seconds, the endpoint is named after its namespace, a
// forged source is dropped as for a pod, a slave a CNI ADD registered is
// not adopted twice, a restarted agent keeps the adoption, and a deleted
// namespace is unregistered.
func TestAdoptHandMadeSlaves(t *testing.T) {
	l := newLab(t, netenv.Options{})
	u := l.Uplinks[0]
	c := l.AddMacvlanContainer("byhand", u.IP4(30), u.IP6(30))
	cni := l.AddMacvlanContainer("cni", u.IP4(31), netip.Prefix{})

	// The baseline: macvlan does not connect a slave with its own parent.
	if r := netenv.Ping(t, l.Node, c.IP4.Addr(), 2); r.Received != 0 {
		t.Fatalf("host -> hand-made macvlan container answered before underpass: %v", r)
	}
	if r := netenv.Ping(t, c.NS, u.Node4.Addr(), 2); r.Received != 0 {
		t.Fatalf("hand-made macvlan container -> host answered before underpass: %v", r)
	}

	l.writeConfig("adopt: {parents: [" + u.Name + "]}\n")
	ag := l.start(agentBin)
	ag.waitReady()
	dp := l.open()
	// A CNI ADD registering a slave the agent may have adopted already
	// (it was there first): the registration by its owner wins.
	addEndpoint(t, l.Node, dp, cni, u.MAC)

	ep := waitAdopted(t, dp, c, 10*time.Second)
	if ep.PodName != filepath.Base(c.Path) || ep.ParentName != u.Name {
		t.Errorf("adopted endpoint named %q on %q, want %q on %q", ep.PodName, ep.ParentName, filepath.Base(c.Path), u.Name)
	}
	if !slices.Contains(ep.Addrs, c.IP4) || !slices.Contains(ep.Addrs, c.IP6) {
		t.Errorf("adopted addresses %v, want %s and %s", ep.Addrs, c.IP4, c.IP6)
	}
	// The baseline's failed resolution is still in the host's neighbour
	// table: its next packet starts a new one, so one ping may go first.
	t0 := time.Now()
	waitFor(t, 5*time.Second, "host -> adopted container", func() bool { return netenv.Ping(t, l.Node, c.IP4.Addr(), 1).Received == 1 })
	t.Logf("host -> adopted container answered %s after its adoption was seen", time.Since(t0).Round(time.Millisecond))
	netenv.MustPing(t, l.Node, c.IP4.Addr(), 3)
	netenv.MustPing(t, c.NS, u.Node4.Addr(), 3)
	netenv.MustPing(t, l.Node, c.IP6.Addr(), 3)

	// The CNI pod stays the CNI's: one registration, not adopted.
	if n := countByMAC(t, dp, cni.MAC); n != 1 {
		t.Errorf("the CNI-registered slave has %d registrations, want 1", n)
	}

	// A forged source from a raw socket (CAP_NET_RAW, which containers
	// get by default) is dropped and counted, as for a pod.
	id, _, err := datapath.Find(&dp.Maps, ep.ContainerID, ep.IfName)
	must(t, err)
	before, err := datapath.EndpointStats(&dp.Maps, id)
	must(t, err)
	wire := netenv.StartCounter(t, l.Wire, u.Port, netenv.MatchDstIP(u.Gateway4))
	for range 3 {
		must(t, netenv.SendForgedUDP4(c.NS, u.IP4(250).Addr(), u.Gateway4))
	}
	netenv.Barrier(t, l.Node, u.Name, wire)
	after, err := datapath.EndpointStats(&dp.Maps, id)
	must(t, err)
	if d := after.Drops[loader.DropSpoofedSource] - before.Drops[loader.DropSpoofedSource]; d < 3 {
		t.Errorf("spoofed_source drops of the adopted container moved by %d, want 3", d)
	}
	if n := wire.Count(); n != 0 {
		t.Errorf("%d forged frames reached the wire", n)
	}

	// A restarted agent finds the adoption in the maps: same registration.
	// A container that went while no agent ran is collected at its start.
	gone := l.AddMacvlanContainer("gone", u.IP4(33), netip.Prefix{})
	waitAdopted(t, dp, gone, 10*time.Second)
	ag.stop()
	must(t, netenv.DeleteNSPath(gone.Path))
	if _, found, err := findAdopted(dp, gone.MAC); err != nil || !found {
		t.Fatalf("with no agent running, the gone container's registration went already (%v)", err)
	}
	ag = l.start(agentBin)
	ag.waitReady()
	if again := waitAdopted(t, dp, c, 10*time.Second); again.ID != ep.ID {
		t.Errorf("after a restart the endpoint is %d, was %d: adopted again instead of kept", again.ID, ep.ID)
	}
	if _, found, err := findAdopted(dp, gone.MAC); err != nil || found {
		t.Errorf("a container that went while the agent was down is still registered once it is ready (%v)", err)
	}
	netenv.MustPing(t, l.Node, c.IP4.Addr(), 2)

	// The namespace goes: so does the registration.
	must(t, netenv.DeleteNSPath(c.Path))
	waitFor(t, 10*time.Second, "the deleted namespace's endpoint unregistered", func() bool {
		_, found, err := findAdopted(dp, c.MAC)
		return err == nil && !found
	})

	// Parents no longer listed: nothing is adopted any more.
	d := l.AddMacvlanContainer("later", u.IP4(32), netip.Prefix{})
	waitAdopted(t, dp, d, 10*time.Second)
	l.writeConfig("")
	waitFor(t, 10*time.Second, "adopted endpoints unregistered once adopt.parents is empty", func() bool {
		_, found, err := findAdopted(dp, d.MAC)
		return err == nil && !found
	})
	if n := countByMAC(t, dp, cni.MAC); n != 1 {
		t.Errorf("emptying adopt.parents touched the CNI pod: %d registrations", n)
	}
}

// The agent's scan and the OCI hook race: what the hook registers after a
// scan began is newer than that scan's view (taken with adopt.Snap before
// it), so that scan's Sync leaves it, where it would otherwise unregister a
// running container it never saw; the next scan keeps it, and removes it
// once it is gone. The agent here adopts nothing itself (no adopt.parents):
// the test plays both scans and the hook.
func TestAdoptSyncLeavesNewerRegistrations(t *testing.T) {
	l := newLab(t, netenv.Options{})
	u := l.Uplinks[0]
	l.writeConfig("")
	ag := l.start(agentBin)
	ag.waitReady()
	dp := l.open()
	parents := []adopt.Parent{{Name: u.Name, Ifindex: u.Index}}
	log := slog.New(slog.DiscardHandler)
	var c *netenv.Container
	must(t, l.Node.Do(func() error {
		before, err := adopt.Snap(dp) // a scan begins, before the container exists
		if err != nil {
			return err
		}
		c = l.AddMacvlanContainer("hooked", u.IP4(35), netip.Prefix{})
		found, err := adopt.Scan(parents, []string{filepath.Dir(c.Path)})
		if err != nil {
			return err
		}
		if _, err := adopt.Adopt(dp, found, nil, log); err != nil { // the hook
			return err
		}
		res, err := adopt.Sync(dp, before, nil, nil, log) // the scan, which did not see it
		if err != nil || len(res.Removed) != 0 {
			return fmt.Errorf("the scan that began before the hook's registration removed %v (%v)", res.Removed, err)
		}
		if before, err = adopt.Snap(dp); err != nil {
			return err
		}
		if res, err = adopt.Sync(dp, before, found, nil, log); err != nil || len(res.Added)+len(res.Removed) != 0 {
			return fmt.Errorf("the next scan, which sees it: added %v, removed %v (%v)", res.Added, res.Removed, err)
		}
		if before, err = adopt.Snap(dp); err != nil {
			return err
		}
		if res, err = adopt.Sync(dp, before, nil, nil, log); err != nil || len(res.Removed) != 1 {
			return fmt.Errorf("a scan that no longer finds it removed %v (%v), want it", res.Removed, err)
		}
		return nil
	}))
	if _, found, err := findAdopted(dp, c.MAC); err != nil || found {
		t.Errorf("still adopted at the end (%v)", err)
	}
	ag.stop()
}

// An adopted container whose name changes (its container becomes known
// after its first scan: Docker's answer or Podman's conmon comes later) is
// renamed in place: same endpoint, counters kept, its guard never off. It
// used to be registered again, which detached its programs for a moment
// and zeroed its counters.
func TestAdoptRenameInPlace(t *testing.T) {
	h := newScanLab(t)
	l, u, dp := h.lab, h.u, h.dp
	c := l.AddMacvlanContainer("renamed", u.IP4(36), netip.Prefix{})
	sync := func(name string) adopt.Result {
		t.Helper()
		res, err := h.scan(c, func(*adopt.Slave) string { return name })
		must(t, err)
		return res
	}
	spoofed := func(id uint32) uint64 {
		t.Helper()
		s, err := datapath.EndpointStats(&dp.Maps, id)
		must(t, err)
		return s.Drops[loader.DropSpoofedSource]
	}
	forge := func() {
		t.Helper()
		wire := netenv.StartCounter(t, l.Wire, u.Port, netenv.MatchDstIP(u.Gateway4))
		for range 3 {
			must(t, netenv.SendForgedUDP4(c.NS, u.IP4(250).Addr(), u.Gateway4))
		}
		netenv.Barrier(t, l.Node, u.Name, wire)
		if n := wire.Count(); n != 0 {
			t.Errorf("%d forged frames reached the wire", n)
		}
	}

	if res := sync("netns-pin"); len(res.Added) != 1 {
		t.Fatalf("the first scan added %v, want the container", res.Added)
	}
	ep, found, err := findAdopted(dp, c.MAC)
	if err != nil || !found {
		t.Fatalf("not adopted (%v)", err)
	}
	forge()
	if n := spoofed(ep.ID); n != 3 {
		t.Fatalf("spoofed_source drops %d before the rename, want 3", n)
	}

	res := sync("web-7")
	if len(res.Added)+len(res.Removed) != 0 || len(res.Renamed) != 1 || res.Renamed[0].From != "netns-pin" || res.Renamed[0].PodName != "web-7" {
		t.Fatalf("the scan that learnt the name: added %v, removed %v, renamed %v; want one rename from netns-pin to web-7", res.Added, res.Removed, res.Renamed)
	}
	again, err := datapath.Lookup(&dp.Maps, ep.ID)
	must(t, err)
	if again.PodName != "web-7" || !again.Created.Equal(ep.Created) || again.MAC.String() != ep.MAC.String() || !slices.Equal(again.Addrs, ep.Addrs) {
		t.Errorf("after the rename endpoint %d is %+v, want %+v named web-7", ep.ID, again, ep)
	}
	if n := spoofed(ep.ID); n != 3 {
		t.Errorf("spoofed_source drops %d after the rename, want the 3 from before it: registered again, not renamed", n)
	}
	forge()
	if n := spoofed(ep.ID); n != 6 {
		t.Errorf("spoofed_source drops %d after 3 more forged frames, want 6", n)
	}
	netenv.MustPing(t, l.Node, c.IP4.Addr(), 2)
	if res := sync("web-7"); len(res.Added)+len(res.Removed)+len(res.Renamed) != 0 {
		t.Errorf("a scan with nothing new: added %v, removed %v, renamed %v", res.Added, res.Removed, res.Renamed)
	}
	h.ag.stop()
}

// A container that changes its own addresses (CAP_NET_ADMIN) is
// registered again at each scan that sees the change. The attack: change
// them again and again while flooding forged-source frames at a neighbour
// on the same parent, which macvlan's bridge mode delivers straight from
// slave to slave (the parent's program never sees them). The guard must
// never be off: not one forged frame may reach the neighbour or the wire.
// It used to be: a registration again detached the container's filters,
// rewrote the maps, then attached them again; a claim of another pod's
// address, which the registration refuses, a flush of every address and a
// rename of the interface all left the container unregistered, with no
// filter at all.
func TestAdoptReregistrationKeepsGuard(t *testing.T) {
	h := newScanLab(t)
	l, u, dp := h.lab, h.u, h.dp
	c := l.AddMacvlanContainer("churner", u.IP4(37), netip.Prefix{})
	victim := l.AddMacvlanContainer("victim", u.IP4(38), netip.Prefix{})
	addEndpoint(t, l.Node, dp, victim, u.MAC)
	owner := l.AddMacvlanContainer("owner", u.IP4(40), netip.Prefix{})
	addEndpoint(t, l.Node, dp, owner, u.MAC) // a registered pod: its address is taken
	scan := func() error {
		_, err := h.scan(c, nil)
		return err
	}
	setAddr := func(add bool, p netip.Prefix) {
		t.Helper()
		must(t, c.NS.Do(func() error {
			link, err := netlink.LinkByName(c.IfName)
			if err != nil {
				return err
			}
			a := &netlink.Addr{IPNet: &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}}
			if add {
				return netlink.AddrAdd(link, a)
			}
			return netlink.AddrDel(link, a)
		}))
	}
	must(t, scan())
	ep, found, err := findAdopted(dp, c.MAC)
	if err != nil || !found {
		t.Fatalf("not adopted (%v)", err)
	}
	forgedSrc := u.IP4(250).Addr()
	atVictim := netenv.StartCounter(t, victim.NS, victim.IfName, netenv.MatchSrcIP(forgedSrc))
	onWire := netenv.StartCounter(t, l.Wire, u.Port, netenv.MatchSrcIP(forgedSrc))
	netenv.MustPing(t, c.NS, victim.IP4.Addr(), 1) // the victim's MAC resolved

	// The flood: forged-source frames to the victim's MAC, as fast as one
	// packet socket sends them (no route or neighbour needed, so it goes
	// on while the container has no address), for as long as the churn
	// lasts.
	victimMAC := victim.MAC
	stop := make(chan struct{})
	sent := make(chan [2]int)
	// From its own MAC and from a made-up one (which no ingress vets: only
	// the container's own egress filter stops it), to the victim and to
	// the gateway (through the parent).
	var frames [][]byte
	for _, from := range []net.HardwareAddr{c.MAC, {0x02, 0x66, 0x61, 0x6b, 0x65, 0x01}} {
		frames = append(frames, netenv.ForgedFrame4(from, victimMAC, forgedSrc, victim.IP4.Addr()),
			netenv.ForgedFrame4(from, u.GatewayMAC, forgedSrc, u.Gateway4))
	}
	go func() {
		// Frames sent; of them, refused with ENOBUFS (the guard's TC_ACT_SHOT).
		n, shot, err := netenv.SendFrames(c.NS, c.Index, frames, func(int) bool { return !testutil.Closed(stop) })
		if err != nil {
			t.Errorf("flood: %v", err)
		}
		sent <- [2]int{n, shot}
	}()
	// The churn: an address of its own added and removed, each change a
	// registration again; then another pod's address claimed (refused).
	extra := u.IP4(39)
	for i := range 20 {
		setAddr(i%2 == 0, extra)
		must(t, scan())
	}
	setAddr(true, owner.IP4)
	if err := scan(); !errors.Is(err, datapath.ErrAddrInUse) {
		t.Errorf("a scan after the container claimed another pod's address: %v, want ErrAddrInUse", err)
	}
	for range 5 {
		time.Sleep(20 * time.Millisecond) // the flood goes on under the claim
		if err := scan(); !errors.Is(err, datapath.ErrAddrInUse) {
			t.Errorf("a scan while the container holds another pod's address: %v, want ErrAddrInUse", err)
		}
	}
	// Refused, the container keeps its registration as it was (not cut
	// off, not unguarded).
	if held, found, err := findAdopted(dp, c.MAC); err != nil || !found || held.ID != ep.ID || slices.Contains(held.Addrs, owner.IP4) {
		t.Errorf("after the refused claim: found %v (%v), endpoint %d (was %d) with %v", found, err, held.ID, ep.ID, held.Addrs)
	}
	// The claim given up: registered again.
	setAddr(false, owner.IP4)
	must(t, scan())
	// Every address flushed: still registered, with none, so that its
	// guard drops every frame with an IP source; then its address back.
	setAddr(false, c.IP4)
	must(t, scan())
	if held, found, err := findAdopted(dp, c.MAC); err != nil || !found || held.ID != ep.ID || len(held.Addrs) != 0 {
		t.Errorf("with no address left: found %v (%v), endpoint %d (was %d) with %v, want it registered with none", found, err, held.ID, ep.ID, held.Addrs)
	}
	time.Sleep(100 * time.Millisecond) // the flood goes on with no address
	must(t, scan())
	// Renamed with no address (registered as eth0, found as eth1: the
	// same interface, by its index): replaced in place, still guarded.
	// The agent's collector (every second here) may quarantine it first:
	// guarded too.
	setLink(t, c, func(h *netlink.Handle, l netlink.Link) error { return h.LinkSetName(l, "eth1") })
	must(t, scan())
	if held, found, err := findAdopted(dp, c.MAC); err != nil || !found || held.IfName != "eth1" || len(held.Addrs) != 0 {
		// The collector's quarantine came first: guarded too.
		if f, qerr := attach.InspectEndpoint(c.Path, c.Index); qerr != nil || !f.Quarantined {
			t.Errorf("renamed with no address: found %v (%v), %+v, want it registered as eth1 with none, or quarantined (%+v, %v)", found, err, held, f, qerr)
		}
	}
	time.Sleep(100 * time.Millisecond)
	setLink(t, c, func(h *netlink.Handle, l netlink.Link) error { return h.LinkSetName(l, c.IfName) })
	must(t, scan())
	setAddr(true, c.IP4)
	must(t, scan())
	// Another MAC and another pod's address at once: refused, and the
	// registration (old MAC) or the collector's quarantine keeps it
	// guarded.
	otherMAC := net.HardwareAddr{0x02, 0x6f, 0x74, 0x68, 0x65, 0x72}
	setLink(t, c, func(h *netlink.Handle, l netlink.Link) error { return h.LinkSetHardwareAddr(l, otherMAC) })
	setAddr(true, owner.IP4)
	if err := scan(); !errors.Is(err, datapath.ErrAddrInUse) {
		t.Errorf("a scan after the container took another MAC and another pod's address: %v, want ErrAddrInUse", err)
	}
	time.Sleep(1500 * time.Millisecond) // the collector runs meanwhile
	if err := scan(); !errors.Is(err, datapath.ErrAddrInUse) {
		t.Errorf("a scan after the collector ran: %v, want ErrAddrInUse", err)
	}
	setAddr(false, owner.IP4)
	setLink(t, c, func(h *netlink.Handle, l netlink.Link) error { return h.LinkSetHardwareAddr(l, c.MAC) })
	must(t, scan())

	close(stop)
	res := <-sent
	netenv.Barrier(t, c.NS, c.IfName, onWire, atVictim) // a broadcast: bridged to the victim as the flood is
	if got := atVictim.Count() + onWire.Count(); got != 0 || res[0] == 0 {
		t.Errorf("%d of %d forged frames reached the victim, %d the wire; want 0 of many", atVictim.Count(), res[0], onWire.Count())
	}
	t.Logf("%d forged frames sent (%d refused at once by the guard) over 20 changes of address, a claim, a flush, a rename and a change of MAC: %d at the victim, %d on the wire",
		res[0], res[1], atVictim.Count(), onWire.Count())
	again, found, err := findAdopted(dp, c.MAC)
	if err != nil || !found || again.ID != ep.ID || !slices.Equal(again.Addrs, []netip.Prefix{c.IP4}) {
		t.Fatalf("after it all: found %v (%v), endpoint %d with %v, want %d with %s", found, err, again.ID, again.Addrs, ep.ID, c.IP4)
	}
	waitFor(t, 5*time.Second, "host -> the container", func() bool { return netenv.Ping(t, l.Node, c.IP4.Addr(), 1).Received == 1 })
	netenv.MustPing(t, l.Node, c.IP4.Addr(), 2)
	h.ag.stop()
}

// scanLab is a lab whose agent adopts nothing itself (no adopt.parents):
// the test plays the agent's scans.
type scanLab struct {
	*lab
	u  *netenv.Uplink
	ag *agent
	dp *loader.Objects
}

func newScanLab(t *testing.T) *scanLab {
	l := newLab(t, netenv.Options{})
	l.writeConfig("")
	ag := l.start(agentBin)
	ag.waitReady()
	return &scanLab{lab: l, u: l.Uplinks[0], ag: ag, dp: l.open()}
}

// scan is one of the agent's scans (adopt.Snap, Scan, Sync) of c's
// namespace, naming the endpoints with name (nil: adopt.Name).
func (h *scanLab) scan(c *netenv.Container, name func(*adopt.Slave) string) (res adopt.Result, err error) {
	parents := []adopt.Parent{{Name: h.u.Name, Ifindex: h.u.Index}}
	err = h.Node.Do(func() error {
		before, err := adopt.Snap(h.dp)
		if err != nil {
			return err
		}
		found, err := adopt.Scan(parents, []string{filepath.Dir(c.Path)})
		if err != nil {
			return err
		}
		res, err = adopt.Sync(h.dp, before, found, name, slog.New(slog.DiscardHandler))
		return err
	})
	return res, err
}

// setLink changes c's interface with set, taken down and up around it
// (a rename needs it down).
func setLink(t *testing.T, c *netenv.Container, set func(*netlink.Handle, netlink.Link) error) {
	t.Helper()
	h := c.Netlink()
	l, err := h.LinkByIndex(c.Index)
	must(t, err)
	must(t, h.LinkSetDown(l))
	must(t, set(h, l))
	must(t, h.LinkSetUp(l))
}

// Hand-made ipvlan slaves (as `ip link add … type ipvlan` and Docker's
// and Podman's ipvlan drivers make them) on the parents in adopt.parents
// are adopted as macvlan ones are, in L2 mode: host <-> container both
// ways. (L3 slaves take the same path; their datapath, on a routed pod
// subnet, is test/datapath's TestIpvlan.) A CNI
// ipvlan pod on the same parent stays the CNI's, and does not keep the
// others from being adopted although they all have its MAC (every ipvlan
// slave has its parent's). This host's kernel has no ipvlan: the VM
// matrix runs it, where ipvlan is a required feature.
func TestAdoptIpvlan(t *testing.T) {
	testutil.SkipIfNotSupported(t, netenv.ProbeIpvlan())
	l := newLab(t, netenv.Options{})
	u := l.Uplinks[0]
	cniPod := l.AddIpvlanContainer("ipcni", netenv.IPvlanL2, u.IP4(41), netip.Prefix{})
	byHand := []struct {
		c    *netenv.Container
		mode loader.Mode
		node netip.Addr
	}{
		{l.AddIpvlanContainer("ipl2a", netenv.IPvlanL2, u.IP4(42), u.IP6(42)), loader.ModeIPvlanL2, u.Node4.Addr()},
		{l.AddIpvlanContainer("ipl2b", netenv.IPvlanL2, u.IP4(44), netip.Prefix{}), loader.ModeIPvlanL2, u.Node4.Addr()},
	}
	for _, h := range byHand {
		if r := netenv.Ping(t, l.Node, h.c.IP4.Addr(), 1); r.Received != 0 {
			t.Fatalf("host -> hand-made ipvlan container %s answered before underpass: %v", h.c.Name, r)
		}
	}

	l.writeConfig("adopt: {parents: [" + u.Name + "]}\n")
	ag := l.start(agentBin)
	ag.waitReady()
	dp := l.open()
	addEndpointMode(t, l.Node, dp, cniPod, u.MAC, loader.ModeIPvlanL2)
	ids := map[string]uint32{}
	for _, h := range byHand {
		cid, err := adopt.ContainerIDOf(h.c.Path)
		must(t, err)
		waitFor(t, 10*time.Second, "the agent adopting "+h.c.Name, func() bool {
			id, _, err := datapath.Find(&dp.Maps, cid, h.c.IfName)
			ids[h.c.Name] = id
			return err == nil && id != 0
		})
	}
	// Scans after the CNI pod's registration keep them (its MAC is theirs).
	time.Sleep(2500 * time.Millisecond)
	for _, h := range byHand {
		cid, err := adopt.ContainerIDOf(h.c.Path)
		must(t, err)
		id, ep, err := datapath.Find(&dp.Maps, cid, h.c.IfName)
		must(t, err)
		if id == 0 || id != ids[h.c.Name] {
			t.Fatalf("%s: endpoint %d after 2.5 s of scans next to the CNI ipvlan pod, was %d", h.c.Name, id, ids[h.c.Name])
		}
		if ep.Network != adopt.AdoptedNetwork || ep.Mode != h.mode || !slices.Contains(ep.Addrs, h.c.IP4) {
			t.Errorf("%s registered in network %q, mode %v, addresses %v; want adopted, mode %v, with %s",
				h.c.Name, ep.Network, ep.Mode, ep.Addrs, h.mode, h.c.IP4)
		}
		waitFor(t, 5*time.Second, "host -> "+h.c.Name, func() bool { return netenv.Ping(t, l.Node, h.c.IP4.Addr(), 1).Received == 1 })
		netenv.MustPing(t, l.Node, h.c.IP4.Addr(), 3)
		netenv.MustPing(t, h.c.NS, h.node, 3)
		if h.c.IP6.IsValid() {
			netenv.MustPing(t, l.Node, h.c.IP6.Addr(), 3)
		}
	}
	// The CNI pod: one registration, its own.
	eps, err := datapath.Endpoints(&dp.Maps)
	must(t, err)
	var regs []string
	for _, ep := range eps {
		if slices.Contains(ep.Addrs, cniPod.IP4) {
			regs = append(regs, ep.Network+"/"+ep.PodName)
		}
	}
	if len(regs) != 1 || strings.HasPrefix(regs[0], adopt.AdoptedNetwork) {
		t.Errorf("registrations of the CNI ipvlan pod's address: %v, want only the CNI's", regs)
	}
	// A namespace that goes is unregistered.
	gone := byHand[0].c
	cid, err := adopt.ContainerIDOf(gone.Path)
	must(t, err)
	must(t, netenv.DeleteNSPath(gone.Path))
	waitFor(t, 10*time.Second, "the deleted ipvlan namespace's endpoint unregistered", func() bool {
		id, _, err := datapath.Find(&dp.Maps, cid, gone.IfName)
		return err == nil && id == 0
	})
	ag.stop()
}

// waitAdopted waits for c's slave to be an adopted endpoint.
func waitAdopted(t *testing.T, dp *loader.Objects, c *netenv.Container, timeout time.Duration) datapath.Endpoint {
	t.Helper()
	var ep datapath.Endpoint
	waitFor(t, timeout, "the agent adopting "+c.Name, func() bool {
		e, found, err := findAdopted(dp, c.MAC)
		ep = e
		return err == nil && found
	})
	return ep
}

func findAdopted(dp *loader.Objects, mac net.HardwareAddr) (datapath.Endpoint, bool, error) {
	eps, err := datapath.Endpoints(&dp.Maps)
	if err != nil {
		return datapath.Endpoint{}, false, err
	}
	for _, ep := range eps {
		if ep.Network == adopt.AdoptedNetwork && ep.MAC.String() == mac.String() {
			return ep, true, nil
		}
	}
	return datapath.Endpoint{}, false, nil
}

func countByMAC(t *testing.T, dp *loader.Objects, mac net.HardwareAddr) int {
	t.Helper()
	eps, err := datapath.Endpoints(&dp.Maps)
	must(t, err)
	n := 0
	for _, ep := range eps {
		if ep.MAC.String() == mac.String() {
			n++
		}
	}
	return n
}

// underpassctl attach serves one slave by hand (no adopt.parents): the
// host reaches it; the agent leaves it be; detach undoes it; what is not a
// slave of this namespace's parent is refused with a reason.
func TestCtlAttach(t *testing.T) {
	l := newLab(t, netenv.Options{})
	u := l.Uplinks[0]
	c := l.AddMacvlanContainer("manual", u.IP4(40), netip.Prefix{})
	l.writeConfig("")
	ag := l.start(agentBin)
	ag.waitReady()
	dp := l.open()
	ctl := func(args ...string) (string, error) {
		var out, errOut strings.Builder
		err := l.Node.Do(func() error {
			return ctlpkg.Run(context.Background(), append([]string{"--bpffs", l.dir}, args...), ctlpkg.Env{Stdout: &out, Stderr: &errOut})
		})
		return out.String() + errOut.String(), err
	}

	out, err := ctl("attach", "--netns", c.Path, "--ifname", "eth0", "--name", "web-1")
	if err != nil || !strings.Contains(out, "attached web-1 eth0 (parent "+u.Name) {
		t.Fatalf("attach: %v\n%s", err, out)
	}
	netenv.MustPing(t, l.Node, c.IP4.Addr(), 3)
	netenv.MustPing(t, c.NS, u.Node4.Addr(), 3)
	time.Sleep(2 * time.Second) // two adopt passes of the agent, which must leave it
	if n := countByMAC(t, dp, c.MAC); n != 1 {
		t.Fatalf("%d registrations of the attached slave after the agent's passes, want 1", n)
	}
	// Again: the same registration replaced, not a second one.
	if out, err := ctl("attach", "--netns", c.Path, "--name", "web-1"); err != nil {
		t.Fatalf("attach again: %v\n%s", err, out)
	}
	if n := countByMAC(t, dp, c.MAC); n != 1 {
		t.Errorf("%d registrations after a second attach, want 1", n)
	}

	for _, bad := range [][]string{
		{"attach", "--netns", c.Path, "--ifname", "lo"},   // not a slave
		{"attach", "--netns", "/proc/thread-self/ns/net"}, // the host's own namespace (Do locks the thread in it)
		{"attach", "--netns", "/nonexistent", "--ifname", "eth0"},
		{"attach"}, // no --netns
		{"detach", "--netns", c.Path, "--ifname", "eth9"}, // not attached
	} {
		if out, err := ctl(bad...); err == nil {
			t.Errorf("underpassctl %v worked:\n%s", bad, out)
		} else {
			t.Logf("underpassctl %v: %v", bad, err)
		}
	}

	if out, err := ctl("detach", "--netns", c.Path, "--ifname", "eth0"); err != nil || !strings.Contains(out, "detached web-1 eth0") {
		t.Fatalf("detach: %v\n%s", err, out)
	}
	if n := countByMAC(t, dp, c.MAC); n != 0 {
		t.Errorf("%d registrations after detach, want 0", n)
	}
}
