package loader_test

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/link"
	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/underpass-cni/underpass/internal/attach"
	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
	"github.com/underpass-cni/underpass/internal/testutil"
	"github.com/underpass-cni/underpass/test/netenv"
)

var ipRemote6 = netip.MustParseAddr("2001:db8:9::7")

// loadEndpoint returns programs that run dp's endpoint programs as endpoint
// id's filters do. BPF_PROG_TEST_RUN cannot set skb->tc_classid, which
// cls_bpf sets from the filter's classid, so each wrapper writes it (tc
// programs may) and tail-calls the endpoint program through a prog array
// of the test's own.
func loadEndpoint(tb testing.TB, dp *loader.Objects, id uint32) (ingress, egress *ebpf.Program) {
	tb.Helper()
	return loadEndpointInto(tb, dp.Programs.EndpointIngress, dp.Programs.EndpointEgress, id)
}

// loadEndpointInto wraps ingress and egress for endpoint id.
func loadEndpointInto(tb testing.TB, ingress, egress *ebpf.Program, id uint32) (*ebpf.Program, *ebpf.Program) {
	tb.Helper()
	progs, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.ProgramArray, KeySize: 4, ValueSize: 4, MaxEntries: 2})
	must(tb, err)
	tb.Cleanup(func() { progs.Close() })
	must(tb, progs.Put(uint32(0), ingress))
	must(tb, progs.Put(uint32(1), egress))
	off := skbFieldOffset(tb, "tc_classid")
	wrap := func(slot int32) *ebpf.Program {
		p, err := ebpf.NewProgram(&ebpf.ProgramSpec{
			Type: ebpf.SchedCLS, License: "Dual BSD/GPL",
			Instructions: asm.Instructions{
				asm.Mov.Imm32(asm.R2, int32(id)),
				asm.StoreMem(asm.R1, off, asm.R2, asm.Word),
				asm.LoadMapPtr(asm.R2, progs.FD()),
				asm.Mov.Imm(asm.R3, slot),
				asm.FnTailCall.Call(),
				asm.Mov.Imm(asm.R0, 0x5a5a), // the tail call failed
				asm.Return(),
			},
		})
		must(tb, err)
		tb.Cleanup(func() { p.Close() })
		return p
	}
	return wrap(0), wrap(1)
}

// skbFieldOffset is the offset of a struct __sk_buff field, from the BTF
// of the build.
func skbFieldOffset(tb testing.TB, field string) int16 {
	tb.Helper()
	spec, err := loader.Spec()
	must(tb, err)
	var skb *btf.Struct
	must(tb, spec.Types.TypeByName("__sk_buff", &skb))
	for _, m := range skb.Members {
		if m.Name == field {
			return int16(m.Offset.Bytes())
		}
	}
	tb.Fatalf("struct __sk_buff has no %s", field)
	return 0
}

// The filter's classid tells the shared programs whose frame it is: A's
// filters count into A only, by exact frame bytes.
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

// With its ep_progs slot empty (a datapath being removed) an endpoint
// program lets the frame through untouched and counts nothing: pods keep
// working.
func TestEndpointProgramsPassWhenSlotEmpty(t *testing.T) {
	r := newRig(t)
	inA, egA := loadEndpoint(t, r.dp, r.idA)
	for _, slot := range []loader.EpProg{loader.EpProgIngress, loader.EpProgEgress} {
		must(t, r.dp.Maps.EpProgs.Delete(uint32(slot)))
	}
	spoofed := icmpEcho(t, macB, macGW, ipB, ipRemote)
	before := r.epStats(t, r.idA)
	if res := r.run(t, egA, spoofed); res.verdict != actPass {
		t.Errorf("egress with no body: verdict %d, want %d (TC_ACT_UNSPEC)", res.verdict, uint32(actPass))
	}
	if res := r.run(t, inA, icmpEcho(t, macGW, macA, ipRemote, ipA)); res.verdict != actPass {
		t.Errorf("ingress with no body: verdict %d, want %d (TC_ACT_UNSPEC)", res.verdict, uint32(actPass))
	}
	if after := r.epStats(t, r.idA); after != before {
		t.Errorf("counted with no program: %+v -> %+v", before, after)
	}
}

// A new datapath build loaded over the pinned one replaces the endpoint
// program bodies of every endpoint at once: filters attached before the
// upgrade run the new bodies from the next frame on, and the previous
// build's again after a downgrade.
func TestEndpointProgramsUpgradeInPlace(t *testing.T) {
	r := newRig(t)
	_, egA := loadEndpoint(t, r.dp, r.idA)
	own := icmpEcho(t, macA, macGW, ipA, ipRemote)
	if res := r.run(t, egA, own); res.verdict != actOK {
		t.Fatalf("before the upgrade: verdict %d, want pass", res.verdict)
	}

	spec, err := loader.Spec()
	must(t, err)
	// The "new build": an egress body that drops everything.
	spec.Programs["ep_egress_body"].Instructions = asm.Instructions{
		asm.Mov.Imm(asm.R0, actShot),
		asm.Return(),
	}
	up, err := loader.Load(r.dp.Dir, loader.Options{Spec: spec})
	must(t, err)
	defer up.Close()
	if res := r.run(t, egA, own); res.verdict != actShot {
		t.Fatalf("after the upgrade: verdict %d, want the new program's drop", res.verdict)
	}

	down, err := loader.Load(r.dp.Dir, loader.Options{})
	must(t, err)
	defer down.Close()
	before := r.epStats(t, r.idA)
	if res := r.run(t, egA, own); res.verdict != actOK {
		t.Fatalf("after the downgrade: verdict %d, want pass", res.verdict)
	}
	if after := r.epStats(t, r.idA); after.Tx.Packets != before.Tx.Packets+1 {
		t.Fatalf("after the downgrade: tx %+v -> %+v, want +1 packet", before.Tx, after.Tx)
	}
}

// A filter's classid carries 16 bits of endpoint id; 0 means "no endpoint".
func TestAttachEndpointRefusesIDsOutOfRange(t *testing.T) {
	r := newRig(t)
	for _, id := range []uint32{0, attach.MaxEndpointID + 1} {
		if err := attach.Endpoint(r.dp.EndpointTarget(id, "", 1)); err == nil || !strings.Contains(err.Error(), "out of range") {
			t.Errorf("endpoint id %d: %v, want out of range", id, err)
		}
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
	id, err := datapath.Register(&dp.Maps, datapath.Endpoint{
		ContainerID: "attach-test", IfName: "eth0", Netns: c.Path, ParentIfindex: u.Index, ParentName: u.Name,
		Ifindex: c.Index, Mode: loader.ModeMacvlan, MAC: c.MAC, Addrs: []netip.Prefix{c.IP4},
	})
	must(t, err)

	must(t, attach.Endpoint(dp.EndpointTarget(id, c.Path, c.Index)))
	assertEndpointFilters(t, c, id, 1)
	// Attaching again (a retried ADD) replaces rather than stacks.
	must(t, attach.Endpoint(dp.EndpointTarget(id, c.Path, c.Index)))
	assertEndpointFilters(t, c, id, 1)
	if got, err := attach.InspectEndpoint(c.Path, c.Index); err != nil || got != (attach.EndpointFilters{Ingress: id, Egress: id}) {
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
	must(t, attach.DetachEndpoint(attach.EndpointOptions{ID: id + 1000, Ifindex: c.Index, Netns: c.Path}))
	assertEndpointFilters(t, c, id, 1)
	must(t, attach.DetachEndpoint(attach.EndpointOptions{ID: id, Ifindex: c.Index, Netns: c.Path}))
	assertEndpointFilters(t, c, id, 0)
	netenv.MustPing(t, c.NS, u.Gateway4, 2)
	detached, err := datapath.EndpointStats(&dp.Maps, id)
	must(t, err)
	if detached.Tx.Packets > after.Tx.Packets+1 { // +1: a late neighbour probe counted before the detach
		t.Fatalf("detached programs still count: %+v -> %+v", after.Tx, detached.Tx)
	}
	if got, err := attach.InspectEndpoint(c.Path, c.Index); err != nil || got != (attach.EndpointFilters{}) {
		t.Fatalf("AttachedEndpoint after detach = %+v, %v; want none", got, err)
	}
	must(t, attach.DetachEndpoint(attach.EndpointOptions{ID: id, Ifindex: c.Index, Netns: c.Path})) // idempotent

	// Attached, then the interface disappears, then the netns: detaching
	// is success both times (the filters went with the interface).
	must(t, attach.Endpoint(dp.EndpointTarget(id, c.Path, c.Index)))
	l, err := c.Netlink().LinkByIndex(c.Index)
	must(t, err)
	must(t, c.Netlink().LinkDel(l))
	must(t, attach.DetachEndpoint(attach.EndpointOptions{ID: id, Ifindex: c.Index, Netns: c.Path}))
	if _, err := attach.InspectEndpoint(c.Path, c.Index); err == nil {
		t.Fatal("AttachedEndpoint on a deleted interface: no error")
	}
	must(t, attach.DetachEndpoint(attach.EndpointOptions{ID: id, Ifindex: c.Index, Netns: filepath.Join(t.TempDir(), "gone")}))
	if _, err := attach.InspectEndpoint(filepath.Join(t.TempDir(), "gone"), c.Index); !errors.Is(err, attach.ErrNetnsGone) {
		t.Fatalf("AttachedEndpoint on a missing netns: %v, want ErrNetnsGone", err)
	}
	// A file that is not a namespace (a runtime unmounted it) is gone too.
	notNS := filepath.Join(t.TempDir(), "unmounted")
	must(t, os.WriteFile(notNS, nil, 0o600))
	must(t, attach.DetachEndpoint(attach.EndpointOptions{ID: id, Ifindex: c.Index, Netns: notNS}))
	if err := attach.Endpoint(dp.EndpointTarget(id, notNS, c.Index)); !errors.Is(err, attach.ErrNetnsGone) {
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
	if err := attach.Endpoint(dp.EndpointTarget(7, c.Path, c.Index+100)); err == nil {
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

// An attach that fails half-way (here the kernel refuses the ingress
// program after the egress filter was swapped) takes back what it put, and
// leaves an interface that was guarded before guarded still: quarantined,
// never bare (nor running as the id its caller is about to free). One
// that had none of ours is bare again, as before the attach.
func TestAttachEndpointFailureKeepsTheGuard(t *testing.T) {
	testutil.RequireRoot(t)
	dp := testutil.LoadDatapath(t)
	env := netenv.New(t, netenv.Options{})
	u := env.Uplinks[0]
	broken := func(id uint32, c *netenv.Container) error {
		o := dp.EndpointTarget(id, c.Path, c.Index)
		o.Ingress = dp.Programs.ParentXdp // not a tc program: the ingress swap fails
		return attach.Endpoint(o)
	}
	for _, tc := range []struct {
		name   string
		before func(c *netenv.Container)
		want   attach.EndpointFilters
	}{
		{"bare", func(*netenv.Container) {}, attach.EndpointFilters{}},
		{"quarantined", func(c *netenv.Container) {
			must(t, attach.QuarantineEndpoint(dp.EndpointTarget(0, c.Path, c.Index)))
		}, attach.EndpointFilters{Quarantined: true}},
		{"guarded by another id", func(c *netenv.Container) {
			must(t, attach.Endpoint(dp.EndpointTarget(7, c.Path, c.Index)))
		}, attach.EndpointFilters{Quarantined: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			i := len(tc.name)
			c := env.AddMacvlanContainer(fmt.Sprintf("c%d", i), u.IP4(20+i), netip.Prefix{})
			tc.before(c)
			if err := broken(9, c); err == nil {
				t.Fatal("attach with an XDP program as ingress: no error")
			}
			if got, err := attach.InspectEndpoint(c.Path, c.Index); err != nil || got != tc.want {
				t.Fatalf("after the failed attach: %+v, %v; want %+v", got, err, tc.want)
			}
		})
	}
}

// A frame a pod receives from a MAC that is no endpoint's (the wire, the
// node, or a pod that skipped its own filter and made its MAC up): its
// ARP and ND may not advertise another endpoint's MAC, which would point
// the pod's neighbour cache (its gateway entry) at that endpoint. Counted
// globally: there is no endpoint to charge.
func TestEndpointIngressRefusesAdvertisedEndpoints(t *testing.T) {
	r := newRig(t)
	inA, _ := loadEndpoint(t, r.dp, r.idA)
	madeUp := net.HardwareAddr{0x02, 0xde, 0xad, 0xbe, 0xef, 0x01}
	linkLocalB := netip.MustParseAddr("fe80::bb:ff:fe00:b")
	ns := func(smac, slla net.HardwareAddr, src, target netip.Addr) []byte {
		return neighborSolicitationLL(t, smac, slla, src, target)
	}
	// An RA from src with pad options (MTU) before its source link-layer
	// option (none when slla is nil).
	raFrom := func(smac net.HardwareAddr, src netip.Addr, slla net.HardwareAddr, pads int) []byte {
		i6 := ip6(src, netip.MustParseAddr("ff02::1"), layers.IPProtocolICMPv6)
		i6.HopLimit = 255
		ic := &layers.ICMPv6{TypeCode: layers.CreateICMPv6TypeCode(layers.ICMPv6TypeRouterAdvertisement, 0)}
		ic.SetNetworkLayerForChecksum(i6)
		var opts layers.ICMPv6Options
		for range pads {
			opts = append(opts, layers.ICMPv6Option{Type: layers.ICMPv6OptMTU, Data: []byte{0, 0, 0, 0, 0x05, 0xdc}})
		}
		if slla != nil {
			opts = append(opts, layers.ICMPv6Option{Type: layers.ICMPv6OptSourceAddress, Data: slla})
		}
		m := &layers.ICMPv6RouterAdvertisement{HopLimit: 64, RouterLifetime: 1800, Options: opts}
		return serialize(t, eth(smac, net.HardwareAddr{0x33, 0x33, 0, 0, 0, 1}, layers.EthernetTypeIPv6), i6, ic, m)
	}
	ra := func(smac, slla net.HardwareAddr, pads int) []byte { return raFrom(smac, linkLocalGW, slla, pads) }
	rs := func(smac, slla net.HardwareAddr) []byte {
		i6 := ip6(linkLocalGW, netip.MustParseAddr("ff02::2"), layers.IPProtocolICMPv6)
		i6.HopLimit = 255
		ic := &layers.ICMPv6{TypeCode: layers.CreateICMPv6TypeCode(layers.ICMPv6TypeRouterSolicitation, 0)}
		ic.SetNetworkLayerForChecksum(i6)
		m := &layers.ICMPv6RouterSolicitation{Options: layers.ICMPv6Options{{Type: layers.ICMPv6OptSourceAddress, Data: slla}}}
		return serialize(t, eth(smac, net.HardwareAddr{0x33, 0x33, 0, 0, 0, 2}, layers.EthernetTypeIPv6), i6, ic, m)
	}
	// An IPv6 redirect from the router's link-local: dst is better reached
	// through target (target == dst: dst is on-link).
	redirect6 := func(smac net.HardwareAddr, target, dst netip.Addr, tlla net.HardwareAddr) []byte {
		i6 := ip6(linkLocalGW, linkLocalA, layers.IPProtocolICMPv6)
		i6.HopLimit = 255
		ic := &layers.ICMPv6{TypeCode: layers.CreateICMPv6TypeCode(layers.ICMPv6TypeRedirect, 0)}
		ic.SetNetworkLayerForChecksum(i6)
		m := &layers.ICMPv6Redirect{TargetAddress: target.AsSlice(), DestinationAddress: dst.AsSlice(),
			Options: layers.ICMPv6Options{{Type: layers.ICMPv6OptTargetAddress, Data: tlla}}}
		return serialize(t, eth(smac, macA, layers.EthernetTypeIPv6), i6, ic, m)
	}
	// An IPv4 redirect from the gateway's address: use gw for what A sent
	// to dst.
	redirect4 := func(smac net.HardwareAddr, gw, dst netip.Addr) []byte {
		g := gw.As4()
		inner := serialize(t, ip4(ipA, dst, layers.IPProtocolUDP), gopacket.Payload(make([]byte, 8)))
		return serialize(t, eth(smac, macA, layers.EthernetTypeIPv4), ip4(ipGW, ipA, layers.IPProtocolICMPv4),
			&layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(layers.ICMPv4TypeRedirect, 1),
				Id: uint16(g[0])<<8 | uint16(g[1]), Seq: uint16(g[2])<<8 | uint16(g[3])}, gopacket.Payload(inner))
	}
	withTrailer := func(f []byte) []byte { return append(append([]byte{}, f...), 0xde, 0xad, 0xbe, 0xef) }
	arp802 := arp(t, layers.ARPRequest, madeUp, macA, macB, ipGW, ipA)
	arp802[14], arp802[15] = 0, 6 // IEEE 802 hardware, which the kernel takes on Ethernet too
	for _, tc := range []struct {
		name   string
		frame  []byte
		reason loader.DropReason // DropMax: passes
	}{
		{"ARP from a made-up MAC, claiming the gateway with B's MAC", arp(t, layers.ARPRequest, madeUp, macA, macB, ipGW, ipA), loader.DropSpoofedSource},
		{"ARP reply from a made-up MAC with B's MAC", arp(t, layers.ARPReply, madeUp, macA, macB, ipGW, ipA), loader.DropSpoofedSource},
		{"ARP from A's own MAC with B's MAC", arp(t, layers.ARPRequest, macA, macA, macB, ipGW, ipA), loader.DropSpoofedSource},
		{"NS from a made-up MAC with B's MAC", ns(madeUp, macB, linkLocalGW, ipA6), loader.DropSpoofedSource},
		{"NA from a made-up MAC with B's MAC", neighborAdvertFrom(t, madeUp, linkLocalGW, linkLocalGW, macB), loader.DropSpoofedSource},
		{"RA from a made-up MAC with B's MAC after 3 options", ra(madeUp, macB, 3), loader.DropSpoofedSource},
		{"RA with B's MAC after 15 options", ra(madeUp, macB, 15), loader.DropSpoofedSource},
		{"RA with 33 options", ra(macGW, macGW, 32), loader.DropUnvetted},
		{"RS from a made-up MAC with B's MAC", rs(madeUp, macB), loader.DropSpoofedSource},
		{"RA from B's link-local, no link-layer option", raFrom(madeUp, linkLocalB, nil, 2), loader.DropSpoofedSource},
		{"IPv6 redirect to B as a router", redirect6(madeUp, linkLocalB, ipRemote6, madeUp), loader.DropSpoofedSource},
		{"IPv4 redirect to B as the gateway", redirect4(madeUp, ipB, ipRemote), loader.DropSpoofedSource},
		{"ARP for IEEE 802 hardware with B's MAC", arp802, loader.DropUnvetted},
		{"an 802.1Q-tagged frame (a priority tag inside one)", vlanTagged(t, madeUp, macA, ipGW, ipA), loader.DropUnvetted},
		{"NA with B's MAC behind 5 extension headers", behindExtHeaders(t, neighborAdvertFrom(t, madeUp, linkLocalGW, linkLocalGW, macB), 5), loader.DropUnvetted},
		// What the wire and the node send.
		{"the gateway's ARP", arp(t, layers.ARPRequest, macGW, macBcast, macGW, ipGW, ipA), loader.DropMax},
		{"the gateway's NA", neighborAdvertFrom(t, macGW, linkLocalGW, linkLocalGW, macGW), loader.DropMax},
		{"the gateway's RA with 4 options", ra(macGW, macGW, 3), loader.DropMax},
		{"the gateway's RA with 32 options", ra(macGW, macGW, 31), loader.DropMax},
		{"the gateway's RA with 32 options and an Ethernet trailer", withTrailer(ra(macGW, macGW, 31)), loader.DropMax},
		// True bindings of another pod's address to its MAC: a router's
		// "B is on-link" redirect, a proxy's NA for B.
		{"the router's redirect: B is on-link", redirect6(macGW, linkLocalB, linkLocalB, macB), loader.DropMax},
		{"a proxy's NA for B with B's MAC", neighborAdvertFrom(t, macGW, linkLocalGW, linkLocalB, macB), loader.DropMax},
		{"the gateway's IPv4 redirect to another router", redirect4(macGW, ipRemote, netip.MustParseAddr("203.0.113.9")), loader.DropMax},
		{"the router's IPv4 redirect: B is on-link", redirect4(macGW, ipB, ipB), loader.DropMax},
		{"the node's NS", ns(macParent, macParent, ipHost6, ipA6), loader.DropMax},
		{"TCP from the wire", tcpSYN(t, macGW, macA, ipRemote, ipA, "S"), loader.DropMax},
		{"an NA behind 2 extension headers", behindExtHeaders(t, neighborAdvertFrom(t, macGW, linkLocalGW, linkLocalGW, macGW), 2), loader.DropMax},
		// Not vetted: the address it points at is no endpoint's, so no
		// pod gets the traffic (it goes to the wire).
		{"ARP from a made-up MAC with its own MAC", arp(t, layers.ARPRequest, madeUp, macA, madeUp, ipGW, ipA), loader.DropMax},
		// B itself, vetted as B (its own addresses): passes.
		{"B's own NS", ns(macB, macB, linkLocalB, ipA6), loader.DropMax},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := r.epStats(t, r.idA)
			var drops loader.Counter
			if tc.reason != loader.DropMax {
				drops = dropCount(t, r, tc.reason)
			}
			res := r.run(t, inA, tc.frame)
			if tc.reason == loader.DropMax {
				if res.verdict != actOK {
					t.Fatalf("verdict %d, want pass", res.verdict)
				}
				return
			}
			if res.verdict != actShot {
				t.Fatalf("verdict %d, want drop (%s)", res.verdict, tc.reason)
			}
			if d := dropCount(t, r, tc.reason); d.Packets != drops.Packets+1 {
				t.Errorf("global %s drops %d -> %d, want +1", tc.reason, drops.Packets, d.Packets)
			}
			if after := r.epStats(t, r.idA); after.Rx != before.Rx {
				t.Errorf("dropped frame counted as received: %+v -> %+v", before.Rx, after.Rx)
			}
		})
	}
}
