package loader_test

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/gopacket/gopacket/layers"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

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
// traffic counted, re-attach, detach, and detach again once the interface
// and then the netns are gone.
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

	must(t, loader.AttachEndpoint(dp, id, c.Path, c.Index))
	assertEndpointFilters(t, c, id, 1)
	// Attaching again (a retried ADD) replaces rather than stacks.
	must(t, loader.AttachEndpoint(dp, id, c.Path, c.Index))
	assertEndpointFilters(t, c, id, 1)
	if got, err := loader.AttachedEndpoint(c.Path, c.Index); err != nil || got != (loader.EndpointFilters{Ingress: id, Egress: id}) {
		t.Fatalf("AttachedEndpoint = %+v, %v; want endpoint %d both ways", got, err, id)
	}
	// Nothing went to the tcx hooks: endpoints use filters on every kernel.
	if n := tcxPrograms(t, c.NS, c.Index); n != 0 {
		t.Fatalf("%d tcx programs on the container's eth0, want 0", n)
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

	// Another endpoint's id detaches nothing; "1" must not match "12".
	must(t, loader.DetachEndpoint(c.Path, c.Index, id+1000))
	assertEndpointFilters(t, c, id, 1)
	must(t, loader.DetachEndpoint(c.Path, c.Index, id))
	assertEndpointFilters(t, c, id, 0)
	netenv.MustPing(t, c.NS, u.Gateway4, 2)
	detached, err := datapath.EndpointStats(&dp.Maps, id)
	must(t, err)
	if detached.Tx.Packets > after.Tx.Packets+1 { // +1: a late neighbour probe counted before the detach
		t.Fatalf("detached programs still count: %+v -> %+v", after.Tx, detached.Tx)
	}
	if got, err := loader.AttachedEndpoint(c.Path, c.Index); err != nil || got != (loader.EndpointFilters{}) {
		t.Fatalf("AttachedEndpoint after detach = %+v, %v; want none", got, err)
	}
	must(t, loader.DetachEndpoint(c.Path, c.Index, id)) // idempotent

	// Attached, then the interface disappears, then the netns: detaching
	// is success both times (the filters went with the interface).
	must(t, loader.AttachEndpoint(dp, id, c.Path, c.Index))
	l, err := c.Netlink().LinkByIndex(c.Index)
	must(t, err)
	must(t, c.Netlink().LinkDel(l))
	must(t, loader.DetachEndpoint(c.Path, c.Index, id))
	if _, err := loader.AttachedEndpoint(c.Path, c.Index); err == nil {
		t.Fatal("AttachedEndpoint on a deleted interface: no error")
	}
	must(t, loader.DetachEndpoint(filepath.Join(t.TempDir(), "gone"), c.Index, id))
	if _, err := loader.AttachedEndpoint(filepath.Join(t.TempDir(), "gone"), c.Index); !errors.Is(err, loader.ErrNetnsGone) {
		t.Fatalf("AttachedEndpoint on a missing netns: %v, want ErrNetnsGone", err)
	}
	// A file that is not a namespace (a runtime unmounted it) is gone too.
	notNS := filepath.Join(t.TempDir(), "unmounted")
	must(t, os.WriteFile(notNS, nil, 0o600))
	must(t, loader.DetachEndpoint(notNS, c.Index, id))
	if err := loader.AttachEndpoint(dp, id, notNS, c.Index); !errors.Is(err, loader.ErrNetnsGone) {
		t.Fatalf("AttachEndpoint into a file that is no netns: %v, want ErrNetnsGone", err)
	}
}

// A failed attach leaves no filter: here the interface does not exist.
func TestAttachEndpointFailureLeavesNothing(t *testing.T) {
	testutil.RequireRoot(t)
	dp, err := loader.Load(testutil.MountBPFFS(t)+"/underpass", loader.Options{})
	must(t, err)
	t.Cleanup(func() { dp.Close() })
	env := netenv.New(t, netenv.Options{})
	c := env.AddMacvlanContainer("c1", env.Uplinks[0].IP4(10), netip.Prefix{})
	if err := loader.AttachEndpoint(dp, 7, c.Path, c.Index+100); err == nil {
		t.Fatal("attach to a missing ifindex: no error")
	}
	assertEndpointFilters(t, c, 7, 0)
}

// assertEndpointFilters checks that c's interface has want (0 or 1) filters
// of endpoint id on each hook, and no other endpoint filters.
func assertEndpointFilters(tb testing.TB, c *netenv.Container, id uint32, want int) {
	tb.Helper()
	l, err := c.Netlink().LinkByIndex(c.Index)
	must(tb, err)
	for _, parent := range []uint32{netlink.HANDLE_MIN_INGRESS, netlink.HANDLE_MIN_EGRESS} {
		fs, err := c.Netlink().FilterList(l, parent)
		if err != nil && want == 0 {
			continue // no clsact qdisc: no filters
		}
		must(tb, err)
		n := 0
		for _, f := range fs {
			bf, ok := f.(*netlink.BpfFilter)
			if !ok || !strings.HasPrefix(bf.Name, "underpass-endpoint") {
				continue
			}
			if bf.Name != fmt.Sprintf("underpass-endpoint-%d", id) {
				tb.Fatalf("filter %q on hook %x, want only endpoint %d's", bf.Name, parent, id)
			}
			n++
		}
		if n != want {
			tb.Fatalf("%d filters of endpoint %d on hook %x, want %d", n, id, parent, want)
		}
	}
}

func tcxPrograms(tb testing.TB, n *netenv.NS, ifindex int) int {
	tb.Helper()
	total := 0
	must(tb, n.Do(func() error {
		for _, a := range []ebpf.AttachType{ebpf.AttachTCXIngress, ebpf.AttachTCXEgress} {
			res, err := link.QueryPrograms(link.QueryOptions{Target: ifindex, Attach: a})
			if errors.Is(err, ebpf.ErrNotSupported) || errors.Is(err, unix.EINVAL) {
				return nil // no tcx on this kernel (6.1 says EINVAL): certainly none there
			}
			if err != nil {
				return err
			}
			total += len(res.Programs)
		}
		return nil
	}))
	return total
}
