package loader_test

import (
	"errors"
	"io/fs"
	"net/netip"
	"os"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/gopacket/gopacket/layers"
	"github.com/vishvananda/netlink"

	"github.com/underpass-cni/underpass/internal/testutil"
	"github.com/underpass-cni/underpass/loader"
	"github.com/underpass-cni/underpass/pkg/datapath"
	"github.com/underpass-cni/underpass/test/netenv"
)

var ipRemote6 = netip.MustParseAddr("2001:db8:9::7")

func loadEndpoint(tb testing.TB, dp *loader.Datapath, id uint32) (ingress, egress *ebpf.Program) {
	tb.Helper()
	in, eg, err := loader.LoadEndpointPrograms(dp, id)
	must(tb, err)
	tb.Cleanup(func() { in.Close(); eg.Close() })
	return in, eg
}

// Each endpoint's programs know their endpoint by the constant they were
// loaded with: A's programs count into A only, by exact frame bytes.
func TestEndpointProgramsCount(t *testing.T) {
	r := newRig(t)
	inA, egA := loadEndpoint(t, r.dp, r.idA)
	inB, _ := loadEndpoint(t, r.dp, r.idB)

	out := icmpEcho(t, macA, macGW, ipA, ipRemote)
	out6 := icmpEcho(t, macA, macGW, ipA6, ipRemote6)
	in := icmpEcho(t, macGW, macA, ipRemote, ipA)
	for _, f := range [][]byte{out, out6} {
		if res := r.run(t, egA, f); res.verdict != actOK {
			t.Fatalf("own traffic: verdict %d, want pass", res.verdict)
		}
	}
	for range 3 {
		if res := r.run(t, inA, in); res.verdict != actOK {
			t.Fatalf("ingress: verdict %d, want pass", res.verdict)
		}
	}
	if res := r.run(t, inB, in); res.verdict != actOK {
		t.Fatalf("ingress B: verdict %d, want pass", res.verdict)
	}

	a, b := r.epStats(t, r.idA), r.epStats(t, r.idB)
	if a.Tx.Packets != 2 || a.Tx.Bytes != uint64(len(out)+len(out6)) {
		t.Errorf("A tx = %+v, want 2 packets, %d bytes", a.Tx, len(out)+len(out6))
	}
	if a.Rx.Packets != 3 || a.Rx.Bytes != uint64(3*len(in)) {
		t.Errorf("A rx = %+v, want 3 packets, %d bytes", a.Rx, 3*len(in))
	}
	if b.Rx.Packets != 1 || b.Rx.Bytes != uint64(len(in)) || b.Tx.Packets != 0 {
		t.Errorf("B = rx %+v tx %+v, want rx 1 packet of %d bytes and no tx", b.Rx, b.Tx, len(in))
	}
	if a.Drops[loader.DropSpoofedSource] != 0 {
		t.Errorf("own traffic counted as spoofed: %v", a.Drops)
	}
}

func TestEndpointSpoofing(t *testing.T) {
	r := newRig(t)
	_, egA := loadEndpoint(t, r.dp, r.idA)
	ipOther := netip.MustParseAddr("192.0.2.99")
	linkLocal := netip.MustParseAddr("fe80::aa:ff:fe00:a")

	for _, tc := range []struct {
		name  string
		frame []byte
		drop  bool
	}{
		{"own MAC and IPv4", icmpEcho(t, macA, macGW, ipA, ipRemote), false},
		{"own MAC and IPv6", icmpEcho(t, macA, macGW, ipA6, ipRemote6), false},
		{"IPv6 link-local source", icmpEcho(t, macA, macGW, linkLocal, ipA6), false},
		{"DAD from the unspecified address", neighborSolicitation(t, macA, netip.IPv6Unspecified(), ipA6), false},
		{"ARP for own address", arp(t, layers.ARPRequest, macA, macBcast, macA, ipA, ipGW), false},
		{"another endpoint's MAC", icmpEcho(t, macB, macGW, ipA, ipRemote), true},
		{"a wire MAC", icmpEcho(t, macWire, macGW, ipA, ipRemote), true},
		{"another endpoint's IPv4", icmpEcho(t, macA, macGW, ipB, ipRemote), true},
		{"an unregistered IPv4", icmpEcho(t, macA, macGW, ipOther, ipRemote), true},
		{"the host's IPv6", icmpEcho(t, macA, macGW, ipHost6, ipRemote6), true},
		{"ARP claiming another endpoint's address", arp(t, layers.ARPReply, macA, macGW, macA, ipB, ipGW), true},
		{"TCP SYN from a foreign address", tcpSYN(t, macA, macGW, ipOther, ipRemote, "S"), true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := r.epStats(t, r.idA)
			drops := dropCount(t, r, loader.DropSpoofedSource)
			res := r.run(t, egA, tc.frame)
			after := r.epStats(t, r.idA)
			d2 := dropCount(t, r, loader.DropSpoofedSource)
			gotDrops := loader.Counter{Packets: d2.Packets - drops.Packets, Bytes: d2.Bytes - drops.Bytes}
			if tc.drop {
				if res.verdict != actShot {
					t.Fatalf("verdict %d, want drop", res.verdict)
				}
				if d := after.Drops[loader.DropSpoofedSource] - before.Drops[loader.DropSpoofedSource]; d != 1 {
					t.Fatalf("endpoint spoofed_source drops moved by %d, want 1", d)
				}
				if gotDrops.Packets != 1 || gotDrops.Bytes != uint64(len(tc.frame)) {
					t.Fatalf("global spoofed_source drops moved by %+v, want 1 packet of %d bytes", gotDrops, len(tc.frame))
				}
				if after.Tx != before.Tx {
					t.Fatalf("dropped frame counted as tx: %+v -> %+v", before.Tx, after.Tx)
				}
				return
			}
			if res.verdict != actOK {
				t.Fatalf("verdict %d, want pass", res.verdict)
			}
			if after.Tx.Packets != before.Tx.Packets+1 || after.Tx.Bytes != before.Tx.Bytes+uint64(len(tc.frame)) {
				t.Fatalf("tx %+v -> %+v, want +1 packet of %d bytes", before.Tx, after.Tx, len(tc.frame))
			}
			if gotDrops.Packets != 0 {
				t.Fatalf("legitimate frame counted as spoofed")
			}
		})
	}
}

func dropCount(tb testing.TB, r *rig, reason loader.DropReason) loader.Counter {
	d, err := datapath.Drops(&r.dp.Maps)
	must(tb, err)
	return d[reason]
}

func TestLoadEndpointProgramsRefusesIDZero(t *testing.T) {
	r := newRig(t)
	if _, _, err := loader.LoadEndpointPrograms(r.dp, 0); err == nil {
		t.Fatal("endpoint id 0 accepted")
	}
}

// A freshly loaded datapath with a container on a real macvlan: attach,
// traffic counted, detach, and detach again after the interface is gone.
func TestAttachEndpoint(t *testing.T) {
	testutil.RequireRoot(t)
	dir := testutil.MountBPFFS(t) + "/underpass"
	dp, err := loader.Load(dir, loader.Options{})
	must(t, err)
	t.Cleanup(func() { dp.Close() })

	env := netenv.New(t, netenv.Options{})
	u := env.Uplinks[0]
	c := env.AddMacvlanContainer("c1", u.IP4(10), netip.Prefix{})
	id, err := datapath.Register(&dp.Maps, datapath.EndpointSpec{
		ContainerID: "attach-test", IfName: "eth0", Netns: c.Path, ParentIfindex: u.Index, ParentName: u.Name,
		Ifindex: c.Index, Mode: loader.ModeMacvlan, MAC: c.MAC, Addrs: []netip.Prefix{c.IP4},
	})
	must(t, err)

	var att loader.EndpointAttachment
	must(t, c.Do(func() error {
		var err error
		att, err = loader.AttachEndpoint(dp, id, c.Index)
		return err
	}))
	if att.Mode == loader.AttachLegacy {
		t.Log("kernel without tcx: legacy filters attached")
	} else {
		for _, p := range []string{att.IngressPin, att.EgressPin} {
			if _, err := os.Stat(p); err != nil {
				t.Fatalf("link pin: %v", err)
			}
		}
		if n := tcxPrograms(t, c.NS, c.Index); n != 2 {
			t.Fatalf("%d tcx programs on the container's eth0, want 2", n)
		}
	}
	// Attaching again (a retried ADD) replaces rather than stacks.
	must(t, c.Do(func() error {
		var err error
		att, err = loader.AttachEndpoint(dp, id, c.Index)
		return err
	}))
	if att.Mode == loader.AttachTCX {
		if n := tcxPrograms(t, c.NS, c.Index); n != 2 {
			t.Fatalf("%d tcx programs after re-attach, want 2", n)
		}
	}

	const n = 5
	before, err := datapath.EndpointStats(&dp.Maps, id)
	must(t, err)
	netenv.MustPing(t, c.NS, u.Gateway4, n)
	after, err := datapath.EndpointStats(&dp.Maps, id)
	must(t, err)
	// At least the echo requests and replies; ARP and IPv6 link-local
	// chatter may add to it (exact accounting is the CNI end-to-end test's).
	if after.Tx.Packets-before.Tx.Packets < n || after.Rx.Packets-before.Rx.Packets < n {
		t.Fatalf("counters moved rx %d tx %d after %d pings", after.Rx.Packets-before.Rx.Packets, after.Tx.Packets-before.Tx.Packets, n)
	}
	if after.Drops[loader.DropSpoofedSource] != 0 {
		t.Fatalf("the container's own traffic was dropped as spoofed: %v", after.Drops)
	}

	must(t, loader.DetachEndpoint(dp, id))
	assertNoEndpointPins(t, dir, id)
	if att.Mode == loader.AttachTCX {
		if n := tcxPrograms(t, c.NS, c.Index); n != 0 {
			t.Fatalf("%d tcx programs after detach, want 0", n)
		}
	}
	netenv.MustPing(t, c.NS, u.Gateway4, 2)
	detached, err := datapath.EndpointStats(&dp.Maps, id)
	must(t, err)
	if detached.Tx != after.Tx && att.Mode == loader.AttachTCX {
		t.Fatalf("detached programs still count: %+v -> %+v", after.Tx, detached.Tx)
	}
	must(t, loader.DetachEndpoint(dp, id)) // idempotent

	// Attached, then the interface disappears (the container netns went
	// away): detaching must still clean the pins.
	must(t, c.Do(func() error {
		_, err := loader.AttachEndpoint(dp, id, c.Index)
		return err
	}))
	l, err := c.Netlink().LinkByIndex(c.Index)
	must(t, err)
	must(t, c.Netlink().LinkDel(l))
	must(t, loader.DetachEndpoint(dp, id))
	assertNoEndpointPins(t, dir, id)
}

func TestAttachEndpointLegacy(t *testing.T) {
	testutil.RequireRoot(t)
	dir := testutil.MountBPFFS(t) + "/underpass"
	dp, err := loader.Load(dir, loader.Options{})
	must(t, err)
	t.Cleanup(func() { dp.Close() })

	env := netenv.New(t, netenv.Options{})
	u := env.Uplinks[0]
	c := env.AddMacvlanContainer("c1", u.IP4(10), netip.Prefix{})
	id, err := datapath.Register(&dp.Maps, datapath.EndpointSpec{
		ContainerID: "legacy-test", IfName: "eth0", ParentIfindex: u.Index, Ifindex: c.Index,
		Mode: loader.ModeMacvlan, MAC: c.MAC, Addrs: []netip.Prefix{c.IP4},
	})
	must(t, err)
	var att loader.EndpointAttachment
	must(t, c.Do(func() error {
		var err error
		att, err = loader.AttachEndpointLegacy(dp, id, c.Index)
		return err
	}))
	if att.Mode != loader.AttachLegacy {
		t.Fatalf("mode %s, want legacy", att.Mode)
	}
	assertNoEndpointPins(t, dir, id)
	if got := legacyFilters(t, c); got != 2 {
		t.Fatalf("%d endpoint filters, want 2 (ingress and egress)", got)
	}
	netenv.MustPing(t, c.NS, u.Gateway4, 3)
	s, err := datapath.EndpointStats(&dp.Maps, id)
	must(t, err)
	if s.Tx.Packets < 3 || s.Rx.Packets < 3 {
		t.Fatalf("legacy filters did not count: rx %+v tx %+v", s.Rx, s.Tx)
	}
	must(t, c.Do(func() error { return loader.DetachEndpointLegacy(c.Index) }))
	if got := legacyFilters(t, c); got != 0 {
		t.Fatalf("%d endpoint filters after detach, want 0", got)
	}
}

func legacyFilters(tb testing.TB, c *netenv.Container) int {
	tb.Helper()
	l, err := c.Netlink().LinkByIndex(c.Index)
	must(tb, err)
	n := 0
	for _, parent := range []uint32{netlink.HANDLE_MIN_INGRESS, netlink.HANDLE_MIN_EGRESS} {
		fs, err := c.Netlink().FilterList(l, parent)
		must(tb, err)
		for _, f := range fs {
			if bf, ok := f.(*netlink.BpfFilter); ok && bf.Name == "underpass-endpoint" {
				n++
			}
		}
	}
	return n
}

func tcxPrograms(tb testing.TB, n *netenv.NS, ifindex int) int {
	tb.Helper()
	total := 0
	must(tb, n.Do(func() error {
		for _, a := range []ebpf.AttachType{ebpf.AttachTCXIngress, ebpf.AttachTCXEgress} {
			res, err := link.QueryPrograms(link.QueryOptions{Target: ifindex, Attach: a})
			if err != nil {
				return err
			}
			total += len(res.Programs)
		}
		return nil
	}))
	return total
}

func assertNoEndpointPins(tb testing.TB, dir string, id uint32) {
	tb.Helper()
	for _, d := range []string{"ingress", "egress"} {
		if _, err := os.Stat(loader.EndpointLinkPin(dir, id, d)); !errors.Is(err, fs.ErrNotExist) {
			tb.Fatalf("pin of %s link left behind (stat: %v)", d, err)
		}
	}
	links, err := loader.EndpointLinks(dir)
	must(tb, err)
	if len(links[id]) != 0 {
		tb.Fatalf("EndpointLinks still lists %v", links[id])
	}
}
