package loader_test

import (
	"bytes"
	"cmp"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"golang.org/x/sys/unix"

	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
)

// Services translated at the pod (services.mode: ebpf): what the endpoint
// programs do to a pod's frame to a VIP and to its reply, judged byte for
// byte against the frame a stack would have sent to the backend (so every
// checksum is checked), and counted.

var (
	vipSvc     = netip.MustParseAddr("10.96.7.7")
	vipSvc6    = netip.MustParseAddr("fd00:96::77")
	wireBack6  = netip.MustParseAddr("2001:db8:1::99")
	wireBack4  = netip.MustParseAddr("198.51.100.20")
	clientPort = uint16(40123)
)

// svcRig is the program rig with services.mode: ebpf and endpoint A's
// programs at hand.
type svcRig struct {
	*rig
	ingressA, egressA *ebpf.Program
}

func newSvcRig(tb testing.TB, fronts ...datapath.Frontend) *svcRig {
	tb.Helper()
	r := newRig(tb)
	r.setConfig(tb, datapath.Config{ServicesSynced: true, HostReachable: true, ServicesEBPF: true})
	must(tb, datapath.SyncFrontends(&r.dp.Maps, fronts))
	in, eg := loadEndpoint(tb, r.dp, r.idA)
	return &svcRig{rig: r, ingressA: in, egressA: eg}
}

func (s *svcRig) svcStat(tb testing.TB, st loader.SvcStat) uint64 {
	tb.Helper()
	c, err := datapath.ServiceStats(&s.dp.Maps)
	must(tb, err)
	return c[st].Packets
}

// wantFrame runs prog on in and wants out exactly (the test run pads
// short frames: only len(want) bytes count).
func wantFrame(tb testing.TB, r *rig, prog *ebpf.Program, in, want []byte) {
	tb.Helper()
	res := r.run(tb, prog, in)
	if res.verdict != actOK {
		tb.Fatalf("verdict %d, want TC_ACT_OK", res.verdict)
	}
	if got := res.out[:min(len(res.out), len(want))]; !bytes.Equal(got, want) {
		tb.Fatalf("frame\n got % x\nwant % x", got, want)
	}
}

func TestServiceTranslation(t *testing.T) {
	for _, tc := range []struct {
		name        string
		proto       layers.IPProtocol
		client, vip netip.Addr
		backend     netip.AddrPort
		dmacOut     net.HardwareAddr // where the translated frame goes
	}{
		// A local endpoint: straight to its MAC, the macvlan driver hands
		// the frame to the sibling slave.
		{"tcp4 local backend", layers.IPProtocolTCP, ipA, vipSvc, netip.AddrPortFrom(ipB, 8080), macB},
		{"udp4 local backend", layers.IPProtocolUDP, ipA, vipSvc, netip.AddrPortFrom(ipB, 5353), macB},
		// SCTP's CRC32c covers the ports, not the addresses: same port only.
		{"sctp4 local backend", layers.IPProtocolSCTP, ipA, vipSvc, netip.AddrPortFrom(ipB, 80), macB},
		// The node itself: the parent's MAC, which the parent program hairpins.
		{"tcp4 host backend", layers.IPProtocolTCP, ipA, vipSvc, netip.AddrPortFrom(ipHost, 6443), macParent},
		// Elsewhere on the wire, unknown to the pod's neighbour table: the
		// pod's own choice of next hop stays.
		{"tcp4 wire backend", layers.IPProtocolTCP, ipA, vipSvc, netip.AddrPortFrom(wireBack4, 8443), macGW},
		{"tcp6 wire backend", layers.IPProtocolTCP, ipA6, vipSvc6, netip.AddrPortFrom(wireBack6, 8080), macGW},
		{"udp6 wire backend", layers.IPProtocolUDP, ipA6, vipSvc6, netip.AddrPortFrom(wireBack6, 5353), macGW},
		{"sctp6 wire backend", layers.IPProtocolSCTP, ipA6, vipSvc6, netip.AddrPortFrom(wireBack6, 80), macGW},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newSvcRig(t, datapath.Frontend{VIP: tc.vip, Port: 80, Proto: uint8(tc.proto), Backends: []netip.AddrPort{tc.backend}})
			client := netip.AddrPortFrom(tc.client, clientPort)
			vip := netip.AddrPortFrom(tc.vip, 80)
			out := segment(t, macA, macGW, client, vip, tc.proto)
			wantFrame(t, r.rig, r.egressA, out, segment(t, macA, tc.dmacOut, client, tc.backend, tc.proto))

			// The reply, from the backend, reaches A from the VIP.
			reply := segment(t, tc.dmacOut, macA, tc.backend, client, tc.proto)
			if tc.dmacOut.String() != macB.String() {
				reply = segment(t, macGW, macA, tc.backend, client, tc.proto)
			}
			want := segment(t, macGW, macA, vip, client, tc.proto)
			if tc.dmacOut.String() == macB.String() {
				want = segment(t, macB, macA, vip, client, tc.proto)
			}
			wantFrame(t, r.rig, r.ingressA, reply, want)

			if n := r.svcStat(t, loader.SvcStatTranslated); n != 1 {
				t.Errorf("translated %d, want 1", n)
			}
			if n := r.svcStat(t, loader.SvcStatReversed); n != 1 {
				t.Errorf("reversed %d, want 1", n)
			}
			if s := r.epStats(t, r.idA); s.Tx.Packets != 1 || s.Rx.Packets != 1 {
				t.Errorf("endpoint counters tx %d rx %d, want 1 and 1", s.Tx.Packets, s.Rx.Packets)
			}
			// The Service's own counters: both directions, one flow.
			sc := r.svcCounters(t)
			if sc.ToBackend.Packets != 1 || sc.ToBackend.Bytes != uint64(len(out)) || sc.FromBackend.Packets != 1 ||
				sc.FromBackend.Bytes != uint64(len(reply)) || sc.Flows != 1 || sc.Failures != 0 {
				t.Errorf("service counters %+v, want 1 frame (%d bytes) each way, 1 flow", sc, len(out))
			}
		})
	}
}

// swap16 is a port in network order, as the maps keep it.
func swap16(v uint16) uint16 { return v<<8 | v>>8 }

// svcCounters is the counters of the rig's one frontend.
func (s *svcRig) svcCounters(tb testing.TB) datapath.ServiceCounter {
	tb.Helper()
	c, err := datapath.ServiceCounters(&s.dp.Maps)
	must(tb, err)
	if len(c) != 1 {
		tb.Fatalf("%d frontends with counters, want 1", len(c))
	}
	return c[0]
}

// A UDP flow idle for longer than 60 s is over: the next datagram on its
// tuple picks a backend afresh. A TCP flow as idle keeps its backend
// (its end is its FIN or RST; the LRU bounds the table).
func TestServiceUDPFlowExpires(t *testing.T) {
	for _, tc := range []struct {
		proto layers.IPProtocol
		flows uint64 // after the idle gap
	}{{layers.IPProtocolUDP, 2}, {layers.IPProtocolTCP, 1}} {
		t.Run(tc.proto.String(), func(t *testing.T) {
			backend := netip.AddrPortFrom(ipB, 5353)
			r := newSvcRig(t, datapath.Frontend{VIP: vipSvc, Port: 53, Proto: uint8(tc.proto), Backends: []netip.AddrPort{backend}})
			client, vip := netip.AddrPortFrom(ipA, clientPort), netip.AddrPortFrom(vipSvc, 53)
			send := func() {
				t.Helper()
				wantFrame(t, r.rig, r.egressA, segment(t, macA, macGW, client, vip, tc.proto), segment(t, macA, macB, client, backend, tc.proto))
			}
			send()
			send() // within the timeout: the same flow
			if n := r.svcStat(t, loader.SvcStatNewFlows); n != 1 {
				t.Fatalf("new flows %d after two datagrams, want 1", n)
			}
			// Age the flow by 61 s (the programs' clock is
			// CLOCK_MONOTONIC_COARSE: what they stamp after this read
			// is not earlier than it).
			ck := loader.CtKey{Client: client.Addr().As16(), Vip: vip.Addr().As16(), ClientPort: swap16(client.Port()),
				Vport: swap16(vip.Port()), L4proto: uint8(tc.proto)}
			var ct loader.Ct
			must(t, r.dp.Maps.SvcCt.Lookup(&ck, &ct))
			var now unix.Timespec
			must(t, unix.ClockGettime(unix.CLOCK_MONOTONIC_COARSE, &now))
			ct.SeenNs = uint64(now.Nano()) - uint64(61*time.Second)
			must(t, r.dp.Maps.SvcCt.Update(&ck, &ct, ebpf.UpdateExist))
			send()
			if n := r.svcStat(t, loader.SvcStatNewFlows); n != tc.flows {
				t.Fatalf("new flows %d after 61 s idle, want %d", n, tc.flows)
			}
			must(t, r.dp.Maps.SvcCt.Lookup(&ck, &ct))
			if ct.SeenNs < uint64(now.Nano()) {
				t.Errorf("the flow's last-seen was not refreshed by its datagram")
			}
		})
	}
}

// The programs stamp with the coarse clock; the programs before them, whose
// flows an upgrade keeps in the pinned svc_ct, with the fine one, up to a
// tick ahead of it. A UDP flow stamped ahead is not 2^64 ns idle: it keeps
// its backend.
func TestServiceFlowStampedAheadIsNotIdle(t *testing.T) {
	backend := netip.AddrPortFrom(ipB, 5353)
	vip := netip.AddrPortFrom(vipSvc, 53)
	r := newSvcRig(t, datapath.Frontend{VIP: vipSvc, Port: 53, Proto: datapath.ProtoUDP, Backends: []netip.AddrPort{backend}})
	client := netip.AddrPortFrom(ipA, clientPort)
	in := segment(t, macA, macGW, client, vip, layers.IPProtocolUDP)
	out := segment(t, macA, macB, client, backend, layers.IPProtocolUDP)
	wantFrame(t, r.rig, r.egressA, in, out)
	ageFlow(t, &r.dp.Maps, client, vip, datapath.ProtoUDP, -50*time.Millisecond)
	wantFrame(t, r.rig, r.egressA, in, out)
	if n := r.svcStat(t, loader.SvcStatNewFlows); n != 1 {
		t.Errorf("new flows %d, want 1: the flow stamped ahead was taken for idle", n)
	}
}

// An established flow does not look for its reply's way back (svc_rev) on
// every packet, but once a second: one the LRU dropped is written again,
// and the replies get the VIP again.
func TestServiceReplyWayRestored(t *testing.T) {
	backend := netip.AddrPortFrom(ipB, 8080)
	r := newSvcRig(t, datapath.Frontend{VIP: vipSvc, Port: 80, Proto: datapath.ProtoTCP, Backends: []netip.AddrPort{backend}})
	m := &r.dp.Maps
	client, vip := netip.AddrPortFrom(ipA, clientPort), netip.AddrPortFrom(vipSvc, 80)
	out := segment(t, macA, macGW, client, vip, layers.IPProtocolTCP)
	translated := segment(t, macA, macB, client, backend, layers.IPProtocolTCP)
	reply, reversed := segment(t, macB, macA, backend, client, layers.IPProtocolTCP), segment(t, macB, macA, vip, client, layers.IPProtocolTCP)
	wantFrame(t, r.rig, r.egressA, out, translated)
	rk := loader.RevKey{Backend: backend.Addr().As16(), Client: client.Addr().As16(), BackendPort: swap16(backend.Port()),
		ClientPort: swap16(client.Port()), L4proto: datapath.ProtoTCP}
	must(t, m.SvcRev.Delete(&rk)) // as the LRU would
	wantFrame(t, r.rig, r.ingressA, reply, reply)
	// The flow last seen 2 s ago: its next packet looks, and writes it.
	ageFlow(t, m, client, vip, datapath.ProtoTCP, 2*time.Second)
	wantFrame(t, r.rig, r.egressA, out, translated)
	wantFrame(t, r.rig, r.ingressA, reply, reversed)
	if n := r.svcStat(t, loader.SvcStatNewFlows); n != 1 {
		t.Errorf("new flows %d, want 1: the flow is the same", n)
	}
}

// A UDP datagram without a checksum (IPv4 allows it) keeps none.
func TestServiceTranslationUDPNoChecksum(t *testing.T) {
	backend := netip.AddrPortFrom(ipB, 5353)
	r := newSvcRig(t, datapath.Frontend{VIP: vipSvc, Port: 53, Proto: datapath.ProtoUDP, Backends: []netip.AddrPort{backend}})
	client := netip.AddrPortFrom(ipA, clientPort)
	zero := func(f []byte) []byte {
		f[14+20+6], f[14+20+7] = 0, 0
		return f
	}
	in := zero(segment(t, macA, macGW, client, netip.AddrPortFrom(vipSvc, 53), layers.IPProtocolUDP))
	wantFrame(t, r.rig, r.egressA, in, zero(segment(t, macA, macB, client, backend, layers.IPProtocolUDP)))
}

// Traffic the table does not name keeps today's path untouched: another
// port of the VIP, a VIP not in the table, ICMP, and everything when the
// mode is host.
func TestServiceTranslationLeavesOthers(t *testing.T) {
	backend := netip.AddrPortFrom(ipB, 8080)
	r := newSvcRig(t, datapath.Frontend{VIP: vipSvc, Port: 80, Proto: datapath.ProtoTCP, Backends: []netip.AddrPort{backend}})
	client := netip.AddrPortFrom(ipA, clientPort)
	for name, f := range map[string][]byte{
		"other port":     segment(t, macA, macGW, client, netip.AddrPortFrom(vipSvc, 81), layers.IPProtocolTCP),
		"other protocol": segment(t, macA, macGW, client, netip.AddrPortFrom(vipSvc, 80), layers.IPProtocolUDP),
		"other VIP":      segment(t, macA, macGW, client, netip.AddrPortFrom(vipLive, 80), layers.IPProtocolTCP),
		"icmp":           icmpEcho(t, macA, macGW, ipA, vipSvc),
	} {
		t.Run(name, func(t *testing.T) { wantFrame(t, r.rig, r.egressA, f, f) })
	}
	t.Run("mode host", func(t *testing.T) {
		r.setConfig(t, datapath.Config{ServicesSynced: true, HostReachable: true})
		f := segment(t, macA, macGW, client, netip.AddrPortFrom(vipSvc, 80), layers.IPProtocolTCP)
		wantFrame(t, r.rig, r.egressA, f, f)
	})
	if n := r.svcStat(t, loader.SvcStatTranslated); n != 0 {
		t.Errorf("translated %d, want 0", n)
	}
}

// SCTP to another port cannot be translated in place (its CRC32c covers
// the port): left to the host path, and counted.
func TestServiceSCTPPortChangeLeftToHost(t *testing.T) {
	r := newSvcRig(t, datapath.Frontend{VIP: vipSvc, Port: 80, Proto: datapath.ProtoSCTP, Backends: []netip.AddrPort{netip.AddrPortFrom(ipB, 8080)}})
	f := segment(t, macA, macGW, netip.AddrPortFrom(ipA, clientPort), netip.AddrPortFrom(vipSvc, 80), layers.IPProtocolSCTP)
	wantFrame(t, r.rig, r.egressA, f, f)
	if n := r.svcStat(t, loader.SvcStatUntranslatable); n != 1 {
		t.Errorf("untranslatable %d, want 1", n)
	}
}

// A Service with no backend is stale: the guard's drop, or in reject mode
// a reset back to the pod, from the VIP.
func TestServiceWithoutBackendsIsStale(t *testing.T) {
	r := newSvcRig(t, datapath.Frontend{VIP: vipSvc, Port: 80, Proto: datapath.ProtoTCP})
	syn := tcpSYN(t, macA, macGW, ipA, vipSvc, "S")
	syn[14+20+2], syn[14+20+3] = 0, 80 // tcpSYN goes to 443
	syn = fixTCP4(t, syn)
	if res := r.run(t, r.egressA, syn); res.verdict != actShot {
		t.Fatalf("verdict %d, want drop", res.verdict)
	}
	if s := r.epStats(t, r.idA); s.StaleDropped != 1 {
		t.Errorf("stale dropped %d, want 1", s.StaleDropped)
	}
	r.setConfig(t, datapath.Config{ServicesSynced: true, HostReachable: true, ServicesEBPF: true, StaleReject: true})
	res := r.run(t, r.egressA, syn)
	if res.verdict != actRedirect {
		t.Fatalf("reject mode: verdict %d, want a redirect of the answer", res.verdict)
	}
	if s := r.epStats(t, r.idA); s.StaleRejected != 1 {
		t.Errorf("stale rejected %d, want 1", s.StaleRejected)
	}
	if n := r.svcStat(t, loader.SvcStatStale); n != 2 {
		t.Errorf("stale %d, want 2", n)
	}
	if sc := r.svcCounters(t); sc.Failures != 2 || sc.Flows != 0 || sc.ToBackend.Packets != 0 {
		t.Errorf("service counters %+v, want 2 failures and nothing else", sc)
	}
}

// fixTCP4 recomputes the checksums of an IPv4 TCP frame edited by hand.
func fixTCP4(tb testing.TB, f []byte) []byte {
	tb.Helper()
	src, _ := netip.AddrFromSlice(f[26:30])
	dst, _ := netip.AddrFromSlice(f[30:34])
	sp := uint16(f[34])<<8 | uint16(f[35])
	dp := uint16(f[36])<<8 | uint16(f[37])
	return segment(tb, net.HardwareAddr(f[6:12]), net.HardwareAddr(f[0:6]), netip.AddrPortFrom(src, sp), netip.AddrPortFrom(dst, dp), layers.IPProtocolTCP)
}

// A flow keeps its backend; new flows spread over all of them; with
// sessionAffinity a client's new flows keep the first one's.
func TestServiceBackendChoice(t *testing.T) {
	backs := []netip.AddrPort{
		netip.AddrPortFrom(netip.MustParseAddr("198.51.100.31"), 80),
		netip.AddrPortFrom(netip.MustParseAddr("198.51.100.32"), 80),
		netip.AddrPortFrom(netip.MustParseAddr("198.51.100.33"), 80),
	}
	dst := func(out []byte) netip.Addr {
		a, _ := netip.AddrFromSlice(out[30:34])
		return a
	}
	send := func(t *testing.T, r *svcRig, port uint16) netip.Addr {
		f := segment(t, macA, macGW, netip.AddrPortFrom(ipA, port), netip.AddrPortFrom(vipSvc, 80), layers.IPProtocolTCP)
		res := r.run(t, r.egressA, f)
		if res.verdict != actOK {
			t.Fatalf("verdict %d", res.verdict)
		}
		return dst(res.out)
	}
	t.Run("spread and sticky", func(t *testing.T) {
		r := newSvcRig(t, datapath.Frontend{VIP: vipSvc, Port: 80, Proto: datapath.ProtoTCP, Backends: backs})
		const flows = 300
		hits := map[netip.Addr]int{}
		for i := range flows {
			first := send(t, r, uint16(20000+i))
			for range 3 {
				if again := send(t, r, uint16(20000+i)); again != first {
					t.Fatalf("flow %d moved from %s to %s", i, first, again)
				}
			}
			hits[first]++
		}
		// Uniform: each gets 100 ± 5σ (σ ≈ 8.2).
		for _, b := range backs {
			if n := hits[b.Addr()]; n < 59 || n > 141 {
				t.Errorf("backend %s got %d of %d flows: %v", b, n, flows, hits)
			}
		}
		t.Logf("flows per backend: %v", hits)
		if n := r.svcStat(t, loader.SvcStatNewFlows); n != flows {
			t.Errorf("new flows %d, want %d", n, flows)
		}
	})
	t.Run("affinity", func(t *testing.T) {
		r := newSvcRig(t, datapath.Frontend{VIP: vipSvc, Port: 80, Proto: datapath.ProtoTCP, Backends: backs, Affinity: time.Hour})
		first := send(t, r, 30000)
		for i := range 50 {
			if b := send(t, r, uint16(30001+i)); b != first {
				t.Fatalf("flow %d of the client went to %s, its affinity is %s", i, b, first)
			}
		}
	})
	t.Run("backend draining", func(t *testing.T) {
		r := newSvcRig(t, datapath.Frontend{VIP: vipSvc, Port: 80, Proto: datapath.ProtoTCP, Backends: backs})
		first := send(t, r, 40000)
		var rest, gone []netip.AddrPort
		for _, b := range backs {
			if b.Addr() != first {
				rest = append(rest, b)
			} else {
				gone = append(gone, b)
			}
		}
		// Terminating but serving: its open flow stays, new flows avoid it.
		must(t, datapath.SyncFrontends(&r.dp.Maps, []datapath.Frontend{{VIP: vipSvc, Port: 80, Proto: datapath.ProtoTCP, Backends: rest, Draining: gone}}))
		if b := send(t, r, 40000); b != first {
			t.Fatalf("the open flow moved from its draining backend %s to %s", first, b)
		}
		for i := range 60 {
			if b := send(t, r, uint16(41000+i)); b == first {
				t.Fatalf("new flow %d went to the draining backend %s", i, first)
			}
		}
	})
	t.Run("affinity ends when the Service changes", func(t *testing.T) {
		f := datapath.Frontend{VIP: vipSvc, Port: 80, Proto: datapath.ProtoTCP, Backends: backs, Affinity: time.Hour}
		r := newSvcRig(t, f)
		first := send(t, r, 30000)
		var rest []netip.AddrPort
		for _, b := range backs {
			if b.Addr() != first {
				rest = append(rest, b)
			}
		}
		f.Backends, f.Draining = rest, []netip.AddrPort{netip.AddrPortFrom(first, 80)}
		must(t, datapath.SyncFrontends(&r.dp.Maps, []datapath.Frontend{f}))
		if b := send(t, r, 30001); b == first {
			t.Fatalf("a new flow of the client followed its affinity to the draining %s", first)
		}
	})
	t.Run("backend removed", func(t *testing.T) {
		r := newSvcRig(t, datapath.Frontend{VIP: vipSvc, Port: 80, Proto: datapath.ProtoTCP, Backends: backs})
		first := send(t, r, 40000)
		var rest []netip.AddrPort
		for _, b := range backs {
			if b.Addr() != first {
				rest = append(rest, b)
			}
		}
		must(t, datapath.SyncFrontends(&r.dp.Maps, []datapath.Frontend{{VIP: vipSvc, Port: 80, Proto: datapath.ProtoTCP, Backends: rest}}))
		if b := send(t, r, 40000); b == first {
			t.Fatalf("the flow still goes to %s, removed", first)
		}
	})
}

// SyncFrontends reads back as written, replaces in place, and removes
// what is no longer wanted, backends included.
func TestSyncFrontends(t *testing.T) {
	r := newRig(t)
	m := &r.dp.Maps
	b1 := netip.AddrPortFrom(ipB, 8080)
	b2 := netip.AddrPortFrom(wireBack4, 8080)
	b6 := netip.AddrPortFrom(wireBack6, 80)
	want := []datapath.Frontend{
		{VIP: vipSvc, Port: 80, Proto: datapath.ProtoTCP, Backends: []netip.AddrPort{b1, b2}},
		{VIP: vipSvc, Port: 53, Proto: datapath.ProtoUDP, Backends: []netip.AddrPort{b1}, Affinity: 3 * time.Hour},
		{VIP: vipSvc6, Port: 80, Proto: datapath.ProtoTCP, Backends: []netip.AddrPort{b6}},
	}
	must(t, datapath.SyncFrontends(m, want))
	got, err := datapath.Frontends(m)
	must(t, err)
	if fmt.Sprint(got) != fmt.Sprint(sortedFronts(want)) {
		t.Fatalf("read back\n%v\nwant\n%v", got, sortedFronts(want))
	}
	// Shrink one, drop one.
	want = []datapath.Frontend{{VIP: vipSvc, Port: 80, Proto: datapath.ProtoTCP, Backends: []netip.AddrPort{b2}}}
	must(t, datapath.SyncFrontends(m, want))
	got, err = datapath.Frontends(m)
	must(t, err)
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("after the update %v, want %v", got, want)
	}
	count := func(em *ebpf.Map) int {
		n := 0
		it := em.Iterate()
		var k, v []byte
		for it.Next(&k, &v) {
			n++
		}
		must(t, it.Err())
		return n
	}
	if n := count(m.SvcBackends); n != 1 {
		t.Errorf("backends: %d left, want 1", n)
	}
	// The slots of the revision before stay until the next update, for a
	// packet that read the frontend just before it flipped: 1 + 2.
	if n := count(m.SvcSlots); n != 3 {
		t.Errorf("slots: %d left, want 3", n)
	}
	must(t, datapath.SyncFrontends(m, nil))
	if n, b, f := count(m.SvcSlots), count(m.SvcBackends), count(m.SvcFrontends); n+b+f != 0 {
		t.Errorf("after removing all: %d slots, %d backends, %d frontends left", n, b, f)
	}
	// Incremental: two frontends share a backend, which lives while either
	// uses it; a table opened afresh knows what the maps hold.
	tab, err := datapath.OpenFrontendTable(m)
	must(t, err)
	must(t, tab.Put(datapath.Frontend{VIP: vipSvc, Port: 80, Proto: datapath.ProtoTCP, Backends: []netip.AddrPort{b2}}))
	must(t, tab.Put(datapath.Frontend{VIP: vipSvc, Port: 81, Proto: datapath.ProtoTCP, Backends: []netip.AddrPort{b2}}))
	if n := count(m.SvcBackends); n != 1 {
		t.Errorf("a shared backend written %d times", n)
	}
	must(t, tab.Delete(vipSvc, 80, datapath.ProtoTCP))
	if n := count(m.SvcBackends); n != 1 {
		t.Errorf("backend used by :81 deleted with :80 (%d left)", n)
	}
	tab, err = datapath.OpenFrontendTable(m)
	must(t, err)
	must(t, tab.Delete(vipSvc, 81, datapath.ProtoTCP))
	must(t, tab.Delete(vipSvc, 81, datapath.ProtoTCP)) // absent is fine
	if n, b, f := count(m.SvcSlots), count(m.SvcBackends), count(m.SvcFrontends); n+b+f != 0 {
		t.Errorf("after deleting both: %d slots, %d backends, %d frontends left", n, b, f)
	}
	for _, bad := range []datapath.Frontend{
		{Port: 80, Proto: datapath.ProtoTCP},
		{VIP: vipSvc, Port: 80, Proto: 1},
		{VIP: vipSvc, Port: 80, Proto: datapath.ProtoTCP, Backends: []netip.AddrPort{b6}},
	} {
		if err := datapath.SyncFrontends(m, []datapath.Frontend{bad}); err == nil {
			t.Errorf("%+v accepted", bad)
		}
	}
}

func sortedFronts(fs []datapath.Frontend) []datapath.Frontend {
	// Frontends sorts by VIP, port, protocol.
	return slices.SortedFunc(slices.Values(fs), func(a, b datapath.Frontend) int {
		return cmp.Or(a.VIP.Compare(b.VIP), cmp.Compare(a.Port, b.Port), cmp.Compare(a.Proto, b.Proto))
	})
}

// ageFlow makes the translated flow client -> vip look last seen d earlier.
func ageFlow(tb testing.TB, m *loader.Maps, client, vip netip.AddrPort, proto uint8, d time.Duration) {
	tb.Helper()
	ck := loader.CtKey{Client: client.Addr().As16(), Vip: vip.Addr().As16(), ClientPort: swap16(client.Port()),
		Vport: swap16(vip.Port()), L4proto: proto}
	var ct loader.Ct
	must(tb, m.SvcCt.Lookup(&ck, &ct))
	ct.SeenNs -= uint64(d)
	must(tb, m.SvcCt.Update(&ck, &ct, ebpf.UpdateExist))
}

// acked is TCP frame f as a segment of an open connection (ACK, no SYN),
// checksums computed again.
func acked(tb testing.TB, f []byte) []byte {
	tb.Helper()
	return reflag(tb, f, func(tcp *layers.TCP) { tcp.SYN, tcp.ACK, tcp.Ack = false, true, 1 })
}

// reflag is TCP frame f with its header changed by set, checksums computed
// again.
func reflag(tb testing.TB, f []byte, set func(*layers.TCP)) []byte {
	tb.Helper()
	pkt := gopacket.NewPacket(f, layers.LayerTypeEthernet, gopacket.Default)
	tcp, ok := pkt.Layer(layers.LayerTypeTCP).(*layers.TCP)
	if !ok {
		tb.Fatalf("reflag: not a TCP frame")
	}
	set(tcp)
	must(tb, tcp.SetNetworkLayerForChecksum(pkt.NetworkLayer()))
	var ls []gopacket.SerializableLayer
	for _, l := range pkt.Layers() {
		ls = append(ls, l.(gopacket.SerializableLayer))
	}
	return serialize(tb, ls...)
}

// A source port comes round again: the pod talks to the backend directly
// on the tuple a translated flow used. Its replies are the direct flow's
// (not given the VIP); back through the VIP on that tuple, they are again.
// A TCP tuple is taken, either way, by a SYN only.
// The same for UDP, whose datagrams carry no mark of a new flow: any
// direct one on the tuple ends the translated flow's replies.
func TestServiceTupleReusedDirectly(t *testing.T) {
	for _, proto := range []layers.IPProtocol{layers.IPProtocolTCP, layers.IPProtocolUDP} {
		t.Run(proto.String(), func(t *testing.T) {
			backend := netip.AddrPortFrom(ipB, 80)
			vip := netip.AddrPortFrom(vipSvc, 80)
			r := newSvcRig(t, datapath.Frontend{VIP: vipSvc, Port: 80, Proto: uint8(proto), Backends: []netip.AddrPort{backend}})
			client := netip.AddrPortFrom(ipA, clientPort)
			reply := segment(t, macB, macA, backend, client, proto)
			reversed := segment(t, macB, macA, vip, client, proto)
			viaVIP := segment(t, macA, macGW, client, vip, proto)
			direct := segment(t, macA, macB, client, backend, proto)

			wantFrame(t, r.rig, r.egressA, viaVIP, direct)
			wantFrame(t, r.rig, r.ingressA, reply, reversed)
			if proto == layers.IPProtocolTCP {
				// Only a SYN takes a TCP tuple: a stray segment of an
				// old direct connection leaves the flow as it is.
				stray := acked(t, direct)
				wantFrame(t, r.rig, r.egressA, stray, stray)
				wantFrame(t, r.rig, r.ingressA, reply, reversed)
			}
			wantFrame(t, r.rig, r.egressA, direct, direct)
			wantFrame(t, r.rig, r.ingressA, reply, reply)
			if proto == layers.IPProtocolTCP {
				// Nor does a late segment of the old translated
				// connection take it back, even on the flow's
				// once-a-second check.
				late := acked(t, viaVIP)
				wantFrame(t, r.rig, r.egressA, late, acked(t, direct))
				wantFrame(t, r.rig, r.ingressA, reply, reply)
				ageFlow(t, &r.dp.Maps, client, vip, uint8(proto), 2*time.Second)
				wantFrame(t, r.rig, r.egressA, late, acked(t, direct))
				wantFrame(t, r.rig, r.ingressA, reply, reply)
			}
			wantFrame(t, r.rig, r.egressA, viaVIP, direct)
			wantFrame(t, r.rig, r.ingressA, reply, reversed)
			// The translated flow went on: the same one throughout.
			if n := r.svcStat(t, loader.SvcStatNewFlows); n != 1 {
				t.Errorf("new flows %d, want 1", n)
			}
		})
	}
}

// A client's source port comes round again for a new connection to the
// same VIP (a fixed source port, or a busy client's ports wrapping) while
// the old connection's flow is still in svc_ct, its backend now draining.
// Once the old connection ended (the client's FIN or RST, or the
// backend's), a SYN on the tuple is a new connection: it picks among the
// ready backends, as conntrack does for a SYN on a closed entry, instead
// of following the old flow to the draining one. A SYN while the
// connection is open (a retransmission) keeps the backend.
func TestServiceTupleReusedAfterClose(t *testing.T) {
	backs := []netip.AddrPort{
		netip.AddrPortFrom(netip.MustParseAddr("198.51.100.31"), 80),
		netip.AddrPortFrom(netip.MustParseAddr("198.51.100.32"), 80),
		netip.AddrPortFrom(netip.MustParseAddr("198.51.100.33"), 80),
	}
	vip := netip.AddrPortFrom(vipSvc, 80)
	fin := func(tcp *layers.TCP) { tcp.SYN, tcp.FIN, tcp.ACK, tcp.Ack = false, true, true, 1 }
	rst := func(tcp *layers.TCP) { tcp.SYN, tcp.RST = false, true }
	rstAck := func(tcp *layers.TCP) { tcp.SYN, tcp.RST, tcp.ACK, tcp.Ack = false, true, true, 1 }
	for _, tc := range []struct {
		name       string
		fromClient bool              // the end goes through the client's egress, else its ingress
		end        func(*layers.TCP) // the segment that ends the connection
	}{
		{"client FIN", true, fin},
		{"client RST", true, rst},
		{"backend FIN", false, fin},
		{"backend RST", false, rstAck},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newSvcRig(t, datapath.Frontend{VIP: vipSvc, Port: 80, Proto: datapath.ProtoTCP, Backends: backs})
			client := netip.AddrPortFrom(ipA, clientPort)
			syn := segment(t, macA, macGW, client, vip, layers.IPProtocolTCP)
			to := func(f []byte) netip.AddrPort {
				t.Helper()
				res := r.run(t, r.egressA, f)
				if res.verdict != actOK {
					t.Fatalf("verdict %d", res.verdict)
				}
				a, _ := netip.AddrFromSlice(res.out[30:34])
				return netip.AddrPortFrom(a, binary.BigEndian.Uint16(res.out[36:38]))
			}
			first := to(syn)
			var rest []netip.AddrPort
			for _, b := range backs {
				if b != first {
					rest = append(rest, b)
				}
			}
			must(t, datapath.SyncFrontends(&r.dp.Maps, []datapath.Frontend{{VIP: vipSvc, Port: 80, Proto: datapath.ProtoTCP,
				Backends: rest, Draining: []netip.AddrPort{first}}}))
			// Open: a retransmitted SYN and the connection's segments
			// stay with the draining backend.
			if b := to(syn); b != first {
				t.Fatalf("a retransmitted SYN of the open connection went to %s, not its backend %s", b, first)
			}
			if b := to(acked(t, syn)); b != first {
				t.Fatalf("a segment of the open connection went to %s, not its backend %s", b, first)
			}
			// The end, still the old backend's (translated, or given
			// the VIP).
			if tc.fromClient {
				wantFrame(t, r.rig, r.egressA, reflag(t, segment(t, macA, macGW, client, vip, layers.IPProtocolTCP), tc.end),
					reflag(t, segment(t, macA, macGW, client, first, layers.IPProtocolTCP), tc.end))
			} else {
				wantFrame(t, r.rig, r.ingressA, reflag(t, segment(t, macGW, macA, first, client, layers.IPProtocolTCP), tc.end),
					reflag(t, segment(t, macGW, macA, vip, client, layers.IPProtocolTCP), tc.end))
			}
			again := to(syn)
			if again == first {
				t.Fatalf("a new connection on the closed tuple followed the old flow to the draining %s", first)
			}
			if b := to(syn); b != again {
				t.Fatalf("the new connection's retransmitted SYN went to %s, its first to %s", b, again)
			}
			if b := to(acked(t, syn)); b != again {
				t.Fatalf("the new connection's segment went to %s, its SYN to %s", b, again)
			}
			// Its replies come from the VIP.
			wantFrame(t, r.rig, r.ingressA, segment(t, macGW, macA, again, client, layers.IPProtocolTCP),
				segment(t, macGW, macA, vip, client, layers.IPProtocolTCP))
			// The old backend's late FIN (from LAST_ACK) is no longer
			// given the VIP: the client's stack resets it directly,
			// instead of meeting it on the new connection's tuple.
			// Nor does it end the new flow.
			late := reflag(t, segment(t, macGW, macA, first, client, layers.IPProtocolTCP), fin)
			wantFrame(t, r.rig, r.ingressA, late, late)
			if b := to(syn); b != again {
				t.Fatalf("after the old backend's late FIN, a retransmitted SYN went to %s, the connection's backend is %s", b, again)
			}
			if n := r.svcStat(t, loader.SvcStatNewFlows); n != 2 {
				t.Errorf("new flows %d, want 2", n)
			}
		})
	}
}

// A FIN or RST from a backend the tuple had before (its flow moved on when
// the backend left, its reply entry did not) is given the VIP as before,
// but does not end the flow that has another backend now: a SYN on the
// tuple (the open connection's retransmission) keeps the flow's backend.
func TestServiceFormerBackendDoesNotEndTheFlow(t *testing.T) {
	x, y := netip.AddrPortFrom(wireBack4, 80), netip.AddrPortFrom(netip.MustParseAddr("198.51.100.21"), 80)
	vip := netip.AddrPortFrom(vipSvc, 80)
	r := newSvcRig(t, datapath.Frontend{VIP: vipSvc, Port: 80, Proto: datapath.ProtoTCP, Backends: []netip.AddrPort{x}})
	client := netip.AddrPortFrom(ipA, clientPort)
	syn := segment(t, macA, macGW, client, vip, layers.IPProtocolTCP)
	wantFrame(t, r.rig, r.egressA, syn, segment(t, macA, macGW, client, x, layers.IPProtocolTCP))
	must(t, datapath.SyncFrontends(&r.dp.Maps, []datapath.Frontend{{VIP: vipSvc, Port: 80, Proto: datapath.ProtoTCP, Backends: []netip.AddrPort{y}}}))
	wantFrame(t, r.rig, r.egressA, acked(t, syn), acked(t, segment(t, macA, macGW, client, y, layers.IPProtocolTCP)))
	rst := func(from netip.AddrPort) []byte {
		return reflag(t, segment(t, macGW, macA, from, client, layers.IPProtocolTCP), func(tcp *layers.TCP) {
			tcp.SYN, tcp.RST, tcp.ACK, tcp.Ack = false, true, true, 1
		})
	}
	wantFrame(t, r.rig, r.ingressA, rst(x), rst(vip))
	flows := r.svcStat(t, loader.SvcStatNewFlows)
	wantFrame(t, r.rig, r.egressA, syn, segment(t, macA, macGW, client, y, layers.IPProtocolTCP))
	if n := r.svcStat(t, loader.SvcStatNewFlows); n != flows {
		t.Errorf("a SYN after the former backend's RST started a new flow (new flows %d -> %d)", flows, n)
	}
}

// A datagram too short to hold a TCP header (the ports are read from
// packet memory when 20 bytes are there, else with a helper; IPv6, so the
// test run's padding to 60 bytes does not make up the difference)
// translates all the same, and so does its reply.
func TestServiceShortDatagram(t *testing.T) {
	backend := netip.AddrPortFrom(wireBack6, 5353)
	vip := netip.AddrPortFrom(vipSvc6, 53)
	r := newSvcRig(t, datapath.Frontend{VIP: vipSvc6, Port: 53, Proto: datapath.ProtoUDP, Backends: []netip.AddrPort{backend}})
	client := netip.AddrPortFrom(ipA6, clientPort)
	dgram := func(smac, dmac net.HardwareAddr, src, dst netip.AddrPort) []byte {
		u := &layers.UDP{SrcPort: layers.UDPPort(src.Port()), DstPort: layers.UDPPort(dst.Port())}
		i6 := ip6(src.Addr(), dst.Addr(), layers.IPProtocolUDP)
		must(t, u.SetNetworkLayerForChecksum(i6))
		return serialize(t, eth(smac, dmac, layers.EthernetTypeIPv6), i6, u, gopacket.Payload("hi"))
	}
	out := dgram(macA, macGW, client, vip)
	if len(out) != 14+40+8+2 {
		t.Fatalf("frame of %d bytes", len(out))
	}
	wantFrame(t, r.rig, r.egressA, out, dgram(macA, macGW, client, backend))
	wantFrame(t, r.rig, r.ingressA, dgram(macGW, macA, backend, client), dgram(macGW, macA, vip, client))
}

// A pod that is itself a backend of the Service it calls never gets itself
// (its kernel would answer over loopback, not from the VIP): another
// backend, or, when it is the only one, the host path.
func TestServiceNeverPicksTheClient(t *testing.T) {
	self, other := netip.AddrPortFrom(ipA, 80), netip.AddrPortFrom(ipB, 80)
	r := newSvcRig(t, datapath.Frontend{VIP: vipSvc, Port: 80, Proto: datapath.ProtoTCP, Backends: []netip.AddrPort{self, other}})
	for i := range 40 {
		client := netip.AddrPortFrom(ipA, uint16(42000+i))
		in := segment(t, macA, macGW, client, netip.AddrPortFrom(vipSvc, 80), layers.IPProtocolTCP)
		wantFrame(t, r.rig, r.egressA, in, segment(t, macA, macB, client, other, layers.IPProtocolTCP))
	}
	must(t, datapath.SyncFrontends(&r.dp.Maps, []datapath.Frontend{{VIP: vipSvc, Port: 80, Proto: datapath.ProtoTCP, Backends: []netip.AddrPort{self}}}))
	in := segment(t, macA, macGW, netip.AddrPortFrom(ipA, 43000), netip.AddrPortFrom(vipSvc, 80), layers.IPProtocolTCP)
	wantFrame(t, r.rig, r.egressA, in, in)
}

// Every backend draining (a rollout's old pods still serving, none ready
// yet): open flows go on, new ones meet the stale guard.
func TestServiceOpenFlowsOutliveTheirReadyBackends(t *testing.T) {
	backend := netip.AddrPortFrom(ipB, 8080)
	f := datapath.Frontend{VIP: vipSvc, Port: 80, Proto: datapath.ProtoTCP, Backends: []netip.AddrPort{backend}}
	r := newSvcRig(t, f)
	open := netip.AddrPortFrom(ipA, clientPort)
	in := segment(t, macA, macGW, open, netip.AddrPortFrom(vipSvc, 80), layers.IPProtocolTCP)
	wantFrame(t, r.rig, r.egressA, in, segment(t, macA, macB, open, backend, layers.IPProtocolTCP))
	f.Backends, f.Draining = nil, []netip.AddrPort{backend}
	must(t, datapath.SyncFrontends(&r.dp.Maps, []datapath.Frontend{f}))
	wantFrame(t, r.rig, r.egressA, in, segment(t, macA, macB, open, backend, layers.IPProtocolTCP))
	fresh := segment(t, macA, macGW, netip.AddrPortFrom(ipA, clientPort+1), netip.AddrPortFrom(vipSvc, 80), layers.IPProtocolTCP)
	if res := r.run(t, r.egressA, fresh); res.verdict != actShot {
		t.Fatalf("a new flow with no ready backend: verdict %d, want the stale guard's drop", res.verdict)
	}
}

// A flow remembers its backend itself, not only its id, and its frontend's
// id and gen when it started; while those are the frontend's, its packets
// do not look the backend up.
//   - backend id: an id that names another backend now (handed out again,
//     e.g. after an agent restart) does not take the flow there, once the
//     flow looks its backend up (its frontend changed since it started).
//   - frontend id: an agent that starts over tables its last run emptied
//     (the Service deleted, then made again with the same VIP) does not
//     hand out the frontend id the old flow holds (svc_ct outlives the
//     frontend), so the flow's tuple goes to the new backend, not the old
//     one (whose backend id the new one gets).
func TestServiceFlowDoesNotFollowAReusedID(t *testing.T) {
	x, y := netip.AddrPortFrom(wireBack4, 80), netip.AddrPortFrom(netip.MustParseAddr("198.51.100.21"), 80)
	client := netip.AddrPortFrom(ipA, clientPort)
	in := segment(t, macA, macGW, client, netip.AddrPortFrom(vipSvc, 80), layers.IPProtocolTCP)
	for _, tc := range []struct {
		name  string
		reuse func(t *testing.T, m *loader.Maps)
	}{
		{"backend id", func(t *testing.T, m *loader.Maps) {
			// The id of x now names y, and x is gone; the frontend
			// changed (as any rewrite of it would).
			var id uint32
			var b loader.Backend
			it := m.SvcBackends.Iterate()
			for it.Next(&id, &b) {
				break
			}
			must(t, it.Err())
			yb := loader.Backend{Addr: y.Addr().As16(), Port: b.Port}
			must(t, m.SvcBackends.Update(id, &yb, ebpf.UpdateExist))
			k := loader.SvcKey{Addr: vipSvc.As16(), Port: swap16(80), L4proto: datapath.ProtoTCP}
			var s loader.Svc
			must(t, m.SvcFrontends.Lookup(&k, &s))
			s.Gen++
			must(t, m.SvcFrontends.Update(&k, &s, ebpf.UpdateExist))
		}},
		{"frontend id", func(t *testing.T, m *loader.Maps) {
			must(t, datapath.SyncFrontends(m, nil))
			must(t, datapath.SyncFrontends(m, []datapath.Frontend{{VIP: vipSvc, Port: 80, Proto: datapath.ProtoTCP, Backends: []netip.AddrPort{y}}}))
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newSvcRig(t, datapath.Frontend{VIP: vipSvc, Port: 80, Proto: datapath.ProtoTCP, Backends: []netip.AddrPort{x}})
			wantFrame(t, r.rig, r.egressA, in, segment(t, macA, macGW, client, x, layers.IPProtocolTCP))
			tc.reuse(t, &r.dp.Maps)
			wantFrame(t, r.rig, r.egressA, in, segment(t, macA, macGW, client, y, layers.IPProtocolTCP))
			if n := r.svcStat(t, loader.SvcStatNewFlows); n != 2 {
				t.Fatalf("new flows %d, want 2: the old flow was carried over", n)
			}
		})
	}
}

// An affinity entry outlives its frontend too (svc_affinity is the
// programs'), and the LRU may have dropped the frontend's flows: an agent
// that starts over (the frontend with the highest id deleted, a new one
// made) must not hand out the frontend id the entry holds, else the new
// frontend's first flow from that client follows the entry to the old
// frontend's backend (still listed, for another frontend).
func TestServiceAffinityDoesNotFollowAReusedID(t *testing.T) {
	x, y := netip.AddrPortFrom(wireBack4, 80), netip.AddrPortFrom(netip.MustParseAddr("198.51.100.21"), 80)
	vip2 := netip.MustParseAddr("10.96.7.8")
	other := datapath.Frontend{VIP: vip2, Port: 80, Proto: datapath.ProtoTCP, Backends: []netip.AddrPort{x}}
	sticky := func(b netip.AddrPort) datapath.Frontend {
		return datapath.Frontend{VIP: vipSvc, Port: 80, Proto: datapath.ProtoTCP, Backends: []netip.AddrPort{b}, Affinity: time.Hour}
	}
	r := newSvcRig(t, other, sticky(x)) // the sticky one gets the higher id
	m := &r.dp.Maps
	client := netip.AddrPortFrom(ipA, clientPort)
	vip := netip.AddrPortFrom(vipSvc, 80)
	wantFrame(t, r.rig, r.egressA, segment(t, macA, macGW, client, vip, layers.IPProtocolTCP),
		segment(t, macA, macGW, client, x, layers.IPProtocolTCP))
	var ak loader.AffinityKey
	var af loader.Affinity
	if it := m.SvcAffinity.Iterate(); !it.Next(&ak, &af) {
		t.Fatalf("no affinity entry: %v", it.Err())
	}
	var ck loader.CtKey
	var ct loader.Ct
	var flows []loader.CtKey
	it := m.SvcCt.Iterate()
	for it.Next(&ck, &ct) {
		flows = append(flows, ck)
	}
	must(t, it.Err())
	for _, k := range flows {
		must(t, m.SvcCt.Delete(&k)) // as the LRU would
	}
	must(t, datapath.SyncFrontends(m, []datapath.Frontend{other}))
	must(t, datapath.SyncFrontends(m, []datapath.Frontend{other, sticky(y)}))
	next := netip.AddrPortFrom(ipA, clientPort+1)
	wantFrame(t, r.rig, r.egressA, segment(t, macA, macGW, next, vip, layers.IPProtocolTCP),
		segment(t, macA, macGW, next, y, layers.IPProtocolTCP))
}

// A flow's packets skip looking up its backend only while its frontend is
// as the flow found it. A backend two frontends share, dropped by the
// flow's frontend, stays listed for the other: the flow keeps it (as a
// draining one). When the other drops it too, it is gone, though the flow's
// own frontend did not change again: the flow's next packet goes to a
// backend of the current set, not on to the one that is gone.
func TestServiceFlowLeavesADeletedSharedBackend(t *testing.T) {
	p, q := netip.AddrPortFrom(wireBack4, 80), netip.AddrPortFrom(netip.MustParseAddr("198.51.100.21"), 80)
	vip2 := netip.MustParseAddr("10.96.7.8")
	front := func(vip netip.Addr, b netip.AddrPort) datapath.Frontend {
		return datapath.Frontend{VIP: vip, Port: 80, Proto: datapath.ProtoTCP, Backends: []netip.AddrPort{b}}
	}
	r := newSvcRig(t, front(vipSvc, p), front(vip2, p))
	client := netip.AddrPortFrom(ipA, clientPort)
	in := segment(t, macA, macGW, client, netip.AddrPortFrom(vipSvc, 80), layers.IPProtocolTCP)
	toP, toQ := segment(t, macA, macGW, client, p, layers.IPProtocolTCP), segment(t, macA, macGW, client, q, layers.IPProtocolTCP)
	wantFrame(t, r.rig, r.egressA, in, toP)
	must(t, datapath.SyncFrontends(&r.dp.Maps, []datapath.Frontend{front(vipSvc, q), front(vip2, p)}))
	wantFrame(t, r.rig, r.egressA, in, toP)
	wantFrame(t, r.rig, r.egressA, in, toP)
	must(t, datapath.SyncFrontends(&r.dp.Maps, []datapath.Frontend{front(vipSvc, q), front(vip2, q)}))
	wantFrame(t, r.rig, r.egressA, in, toQ)
	if n := r.svcStat(t, loader.SvcStatNewFlows); n != 2 {
		t.Errorf("new flows %d, want 2", n)
	}
}

// Counters and names follow their frontends: a table opened over frontends
// an older build wrote (no counters) gives them counters; counters and
// names a dead run left without a frontend go, when their writer opens
// the table, not when a reader reads it.
func TestServiceCountersFollowFrontends(t *testing.T) {
	r := newSvcRig(t, datapath.Frontend{VIP: vipSvc, Port: 80, Proto: datapath.ProtoTCP,
		Backends: []netip.AddrPort{netip.AddrPortFrom(ipB, 8080)}, Service: "default/web", PortName: "http"})
	m := &r.dp.Maps
	sc := r.svcCounters(t)
	if sc.Service != "default/web" || sc.PortName != "http" {
		t.Fatalf("counters name %q %q", sc.Service, sc.PortName)
	}
	var s loader.Svc
	k := loader.SvcKey{Addr: vipSvc.As16(), Port: swap16(80), L4proto: datapath.ProtoTCP}
	must(t, m.SvcFrontends.Lookup(&k, &s))
	must(t, m.SvcCounters.Delete(s.Id)) // as an older build left it
	const orphan = 999
	must(t, m.SvcNames.Update(uint32(orphan), &loader.SvcName{}, ebpf.UpdateAny))
	must(t, m.SvcCounters.Update(uint32(orphan), make([]loader.SvcCounters, ebpf.MustPossibleCPU()), ebpf.UpdateAny))

	// A reader (underpassctl services) tidies nothing: the agent writes a
	// new frontend's counters and name just before the frontend itself,
	// and they must not be taken for an orphan's in between.
	_, err := datapath.Frontends(m)
	must(t, err)
	var kept []loader.SvcCounters
	if err := m.SvcCounters.Lookup(uint32(orphan), &kept); err != nil {
		t.Fatalf("datapath.Frontends deleted counters without a frontend: %v", err)
	}

	_, err = datapath.OpenFrontendTable(m)
	must(t, err)
	r.svcCounters(t) // fails unless the frontend has counters again
	var name loader.SvcName
	if err := m.SvcNames.Lookup(uint32(orphan), &name); err == nil {
		t.Error("an orphan name survived OpenFrontendTable")
	}
	var per []loader.SvcCounters
	if err := m.SvcCounters.Lookup(uint32(orphan), &per); err == nil {
		t.Error("orphan counters survived OpenFrontendTable")
	}
}

// Full flow tables (other pods' flows in every entry of svc_ct and
// svc_rev) take a new flow all the same: the LRU evicts the least
// recently used, the new flow is translated, remembered and reversed, and
// the fill shows in datapath.FlowTableUsage (the metrics' gauge).
func TestServiceFullFlowTables(t *testing.T) {
	backend := netip.AddrPortFrom(ipB, 8080)
	r := newSvcRig(t, datapath.Frontend{VIP: vipSvc, Port: 80, Proto: datapath.ProtoTCP, Backends: []netip.AddrPort{backend}})
	m := &r.dp.Maps
	n := int(m.SvcCt.MaxEntries())
	cts, ctv := make([]loader.CtKey, n), make([]loader.Ct, n)
	revs, revv := make([]loader.RevKey, n), make([]loader.Rev, n)
	for i := range n {
		other := netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}).As16()
		cts[i] = loader.CtKey{Client: other, Vip: vipSvc.As16(), ClientPort: uint16(i), Vport: swap16(80), L4proto: datapath.ProtoTCP}
		ctv[i] = loader.Ct{BackendId: 1, SvcId: 1}
		revs[i] = loader.RevKey{Backend: backend.Addr().As16(), Client: other, BackendPort: swap16(8080), ClientPort: uint16(i), L4proto: datapath.ProtoTCP}
	}
	for _, fill := range []func() error{
		func() error { _, err := m.SvcCt.BatchUpdate(cts, ctv, nil); return err },
		func() error { _, err := m.SvcRev.BatchUpdate(revs, revv, nil); return err },
	} {
		must(t, fill())
	}
	usage, err := datapath.FlowTableUsage(m)
	must(t, err)
	for _, u := range usage[:2] {
		// LRU maps may evict a little before they are full (per-CPU
		// free lists): near capacity is full.
		if u.Entries < u.Capacity*9/10 {
			t.Fatalf("%s holds %d of %d after filling it", u.Name, u.Entries, u.Capacity)
		}
		t.Logf("%s: %d of %d entries", u.Name, u.Entries, u.Capacity)
	}

	client, vip := netip.AddrPortFrom(ipA, clientPort), netip.AddrPortFrom(vipSvc, 80)
	wantFrame(t, r.rig, r.egressA, segment(t, macA, macGW, client, vip, layers.IPProtocolTCP),
		segment(t, macA, macB, client, backend, layers.IPProtocolTCP))
	wantFrame(t, r.rig, r.ingressA, segment(t, macB, macA, backend, client, layers.IPProtocolTCP),
		segment(t, macB, macA, vip, client, layers.IPProtocolTCP))
	ck := loader.CtKey{Client: ipA.As16(), Vip: vipSvc.As16(), ClientPort: swap16(clientPort), Vport: swap16(80), L4proto: datapath.ProtoTCP}
	var ct loader.Ct
	if err := m.SvcCt.Lookup(&ck, &ct); err != nil {
		t.Fatalf("the new flow is not in the full svc_ct: %v", err)
	}
	if n := r.svcStat(t, loader.SvcStatNewFlows); n != 1 {
		t.Errorf("new flows %d, want 1", n)
	}
}

// An ICMP error about a translated flow reaches the client quoting the
// frame as the client sent it (to VIP:port), so its stack finds the
// socket: a connected UDP socket gets ECONNREFUSED, a TCP flow learns the
// path MTU. Sent by the backend itself, it comes from the VIP; sent by a
// router on the way, from the router. The frame is judged byte for byte
// against the error a stack would have sent about the untranslated frame
// (checksums included), but for the quoted L4 checksum, which stays.
func TestServiceICMPErrorsReversed(t *testing.T) {
	router6 := netip.MustParseAddr("2001:db8:1::1")
	for _, tc := range []struct {
		name        string
		proto       layers.IPProtocol
		client, vip netip.Addr
		backend     netip.AddrPort
		backendMAC  net.HardwareAddr
		from        netip.Addr // who sends the error; the backend's address: the backend
		typ, code   uint8
	}{
		{"udp4 port unreachable from the backend", layers.IPProtocolUDP, ipA, vipSvc, netip.AddrPortFrom(ipB, 5353), macB, ipB, 3, 3},
		{"tcp4 frag needed from a router", layers.IPProtocolTCP, ipA, vipSvc, netip.AddrPortFrom(wireBack4, 8443), macGW, ipGW, 3, 4},
		{"udp4 time exceeded from a router", layers.IPProtocolUDP, ipA, vipSvc, netip.AddrPortFrom(wireBack4, 5353), macGW, ipGW, 11, 0},
		{"udp6 port unreachable from the backend", layers.IPProtocolUDP, ipA6, vipSvc6, netip.AddrPortFrom(wireBack6, 5353), macGW, wireBack6, 1, 4},
		{"tcp6 packet too big from a router", layers.IPProtocolTCP, ipA6, vipSvc6, netip.AddrPortFrom(wireBack6, 8080), macGW, router6, 2, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newSvcRig(t, datapath.Frontend{VIP: tc.vip, Port: 53, Proto: uint8(tc.proto), Backends: []netip.AddrPort{tc.backend}})
			client := netip.AddrPortFrom(tc.client, clientPort)
			sent := segment(t, macA, macGW, client, netip.AddrPortFrom(tc.vip, 53), tc.proto)
			res := r.run(t, r.egressA, sent)
			if res.verdict != actOK {
				t.Fatalf("translation: verdict %d", res.verdict)
			}
			translated := res.out[:len(sent)]
			// What the error quotes: the IP packet as it went out, and as
			// the client sent it with the L4 checksum that went out.
			quoteOut := slices.Clone(translated[14:])
			quoteWant := slices.Clone(sent[14:])
			l4 := 20
			if tc.client.Is6() {
				l4 = 40
			}
			csum := l4 + 6
			if tc.proto == layers.IPProtocolTCP {
				csum = l4 + 16
			}
			copy(quoteWant[csum:csum+2], quoteOut[csum:csum+2])
			wantFrom := tc.from
			if tc.from == tc.backend.Addr() {
				wantFrom = tc.vip
			}
			in := icmpError(t, tc.backendMAC, macA, tc.from, tc.client, tc.typ, tc.code, quoteOut)
			wantFrame(t, r.rig, r.ingressA, in, icmpError(t, tc.backendMAC, macA, wantFrom, tc.client, tc.typ, tc.code, quoteWant))
			if n := r.svcStat(t, loader.SvcStatReversed); n != 1 {
				t.Errorf("reversed %d, want 1", n)
			}
		})
	}
	// An error about a flow that was never translated is left alone.
	t.Run("not a translated flow", func(t *testing.T) {
		r := newSvcRig(t, datapath.Frontend{VIP: vipSvc, Port: 53, Proto: datapath.ProtoUDP, Backends: []netip.AddrPort{netip.AddrPortFrom(ipB, 5353)}})
		direct := segment(t, macA, macB, netip.AddrPortFrom(ipA, clientPort), netip.AddrPortFrom(ipB, 5353), layers.IPProtocolUDP)
		in := icmpError(t, macB, macA, ipB, ipA, 3, 3, direct[14:])
		wantFrame(t, r.rig, r.ingressA, in, in)
	})
}

// icmpError is an ICMP (IPv4) or ICMPv6 error from -> to quoting quoted.
func icmpError(tb testing.TB, smac, dmac net.HardwareAddr, from, to netip.Addr, typ, code uint8, quoted []byte) []byte {
	tb.Helper()
	if from.Is4() {
		return serialize(tb, eth(smac, dmac, layers.EthernetTypeIPv4), ip4(from, to, layers.IPProtocolICMPv4),
			&layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(typ, code), Seq: 1400}, gopacket.Payload(quoted))
	}
	i6 := ip6(from, to, layers.IPProtocolICMPv6)
	ic := &layers.ICMPv6{TypeCode: layers.CreateICMPv6TypeCode(typ, code)}
	must(tb, ic.SetNetworkLayerForChecksum(i6))
	// The 4 bytes after the checksum: unused, or the MTU of a packet too big.
	return serialize(tb, eth(smac, dmac, layers.EthernetTypeIPv6), i6, ic, gopacket.Payload(append([]byte{0, 0, 5, 0}, quoted...)))
}

// A UDP datagram to a Service that the client's stack fragmented: the
// first fragment (the only one with ports) is translated as any datagram
// and tells the others (svc_frags, by the IP identification) where to go;
// they get the backend's address, their IP header checksum fixed, nothing
// else touched. The reply's fragments get the VIP back the same way. Each
// fragment is judged byte for byte against the fragment a stack would have
// sent to (or from) the backend itself.
func TestServiceFragments(t *testing.T) {
	for _, tc := range []struct {
		name        string
		client, vip netip.Addr
		backend     netip.AddrPort
		dmac        net.HardwareAddr
	}{
		{"ipv4, local backend", ipA, vipSvc, netip.AddrPortFrom(ipB, 5353), macB},
		{"ipv6, backend on the wire", ipA6, vipSvc6, netip.AddrPortFrom(wireBack6, 5353), macGW},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newSvcRig(t, datapath.Frontend{VIP: tc.vip, Port: 53, Proto: datapath.ProtoUDP, Backends: []netip.AddrPort{tc.backend}})
			client, vip := netip.AddrPortFrom(tc.client, clientPort), netip.AddrPortFrom(tc.vip, 53)
			const id = 0x4242
			out := fragments(t, macA, macGW, client, vip, id)
			want := fragments(t, macA, tc.dmac, client, tc.backend, id)
			wantFrame(t, r.rig, r.egressA, out[0], want[0])
			wantFrame(t, r.rig, r.egressA, out[1], want[1])

			// Another datagram's fragment (another id) is not this one's.
			other := fragments(t, macA, macGW, client, vip, id+1)[1]
			wantFrame(t, r.rig, r.egressA, other, other)

			back := fragments(t, tc.dmac, macA, tc.backend, client, id)
			if tc.dmac.String() != macB.String() {
				back = fragments(t, macGW, macA, tc.backend, client, id)
			}
			wantBack := fragments(t, net.HardwareAddr(back[0][6:12]), macA, vip, client, id)
			wantFrame(t, r.rig, r.ingressA, back[0], wantBack[0])
			if tc.dmac.String() == macB.String() {
				// The backend is an endpoint too: its own egress sends the
				// reply's fragments as they are (the flow map is node-wide:
				// what the client's ingress noted is not for it).
				_, egressB := loadEndpoint(t, r.dp, r.idB)
				wantFrame(t, r.rig, egressB, back[1], back[1])
			}
			wantFrame(t, r.rig, r.ingressA, back[1], wantBack[1])

			sc := r.svcCounters(t)
			if sc.ToBackend.Packets != 2 || sc.FromBackend.Packets != 2 || sc.Flows != 1 {
				t.Errorf("service counters %+v, want 2 fragments each way in 1 flow", sc)
			}
		})
	}
}

// fragments is a UDP datagram src -> dst (segment's, with a longer
// payload) as a stack fragments it: the UDP header alone in the first
// fragment (more fragments), the payload in the second, both with the IP
// identification id; the UDP checksum covers the whole datagram.
func fragments(tb testing.TB, smac, dmac net.HardwareAddr, src, dst netip.AddrPort, id uint32) [2][]byte {
	tb.Helper()
	whole := segment(tb, smac, dmac, src, dst, layers.IPProtocolUDP)
	hl := 20
	if src.Addr().Is6() {
		hl = 40
	}
	eth, ip, udp := whole[:14], whole[14:14+hl], whole[14+hl:]
	parts := [2][]byte{udp[:8], udp[8:]}
	var out [2][]byte
	for i, part := range parts {
		f := slices.Clone(eth)
		if src.Addr().Is4() {
			h := slices.Clone(ip)
			binary.BigEndian.PutUint16(h[2:], uint16(20+len(part)))
			binary.BigEndian.PutUint16(h[4:], uint16(id))
			fo := uint16(i) // in 8-byte units: the second starts at 8
			if i == 0 {
				fo |= 0x2000 // more fragments
			}
			binary.BigEndian.PutUint16(h[6:], fo)
			h[10], h[11] = 0, 0
			binary.BigEndian.PutUint16(h[10:], ipChecksum(h))
			f = append(append(f, h...), part...)
		} else {
			h := slices.Clone(ip)
			binary.BigEndian.PutUint16(h[4:], uint16(8+len(part)))
			h[6] = 44 // a fragment header follows
			frag := make([]byte, 8)
			frag[0] = 17
			fo := uint16(i) << 3
			if i == 0 {
				fo |= 1
			}
			binary.BigEndian.PutUint16(frag[2:], fo)
			binary.BigEndian.PutUint32(frag[4:], id)
			f = append(append(append(f, h...), frag...), part...)
		}
		out[i] = f
	}
	return out
}

func ipChecksum(h []byte) uint16 {
	var sum uint32
	for i := 0; i+1 < len(h); i += 2 {
		sum += uint32(h[i])<<8 | uint32(h[i+1])
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	return ^uint16(sum)
}

// hostReachability: false cuts a pod's own traffic with the host, not its
// Services: a flow the pod's program translated to a host-network backend
// (the kubernetes Service's apiserver on a control-plane node) passes the
// parent both ways, as kube-proxy's Service flows do; the same pod to the
// same host port directly is still cut.
func TestServiceHostBackendWithHostReachabilityOff(t *testing.T) {
	backend := netip.AddrPortFrom(ipHost, 6443)
	r := newSvcRig(t, datapath.Frontend{VIP: vipSvc, Port: 443, Proto: datapath.ProtoTCP, Backends: []netip.AddrPort{backend}})
	r.setConfig(t, datapath.Config{ServicesSynced: true, HostReachable: false, ServicesEBPF: true})
	client := netip.AddrPortFrom(ipA, clientPort)
	res := r.run(t, r.egressA, segment(t, macA, macGW, client, netip.AddrPortFrom(vipSvc, 443), layers.IPProtocolTCP))
	if res.verdict != actOK {
		t.Fatalf("translation: verdict %d", res.verdict)
	}
	toHost := slices.Clone(res.out)
	before := r.epStats(t, r.idA).Drops[loader.DropHostUnreachable]
	if res := r.parent(t, toHost); res.verdict == actShot {
		t.Fatal("the translated flow to the host backend was cut by hostReachability: false")
	}
	reply := segment(t, macParent, macA, backend, client, layers.IPProtocolTCP)
	if res := r.parent(t, reply); res.verdict == actShot {
		t.Fatal("the host backend's reply was cut by hostReachability: false")
	}
	direct := segment(t, macA, macParent, netip.AddrPortFrom(ipA, clientPort+1), backend, layers.IPProtocolTCP)
	if res := r.parent(t, direct); res.verdict != actShot {
		t.Fatalf("the pod straight to the host: verdict %d, want drop", res.verdict)
	}
	if d := r.epStats(t, r.idA).Drops[loader.DropHostUnreachable] - before; d != 1 {
		t.Errorf("host_unreachable drops moved by %d, want 1 (the direct frame only)", d)
	}
}

// Two Services with the same backend, and a client port that comes round
// for both (connect() keeps a source port unique per destination, and the
// destinations are the VIPs): the backend would see both connections on
// one tuple. A new flow whose tuple is another live flow's takes another
// backend. With none free, TCP and SCTP are dropped (service_tuple_in_use:
// the backend would take the SYN or INIT as part of the live connection),
// UDP takes the tuple over (one unconnected socket sends to both VIPs);
// either way a dropped flow leaves the live one's replies their VIP. The
// tuple is free again once the live flow ended (a RST, or a FIN each way:
// half-closed, it still carries data), is gone, or is idle past its hold.
func TestServiceTupleInUseThroughAnotherVIP(t *testing.T) {
	b, c := netip.AddrPortFrom(wireBack4, 8080), netip.AddrPortFrom(netip.MustParseAddr("198.51.100.21"), 8080)
	vip1, vip2 := netip.AddrPortFrom(vipSvc, 80), netip.AddrPortFrom(netip.MustParseAddr("10.96.7.8"), 80)
	front := func(vip netip.AddrPort, proto uint8, backs ...netip.AddrPort) datapath.Frontend {
		return datapath.Frontend{VIP: vip.Addr(), Port: vip.Port(), Proto: proto, Backends: backs}
	}
	protos := map[layers.IPProtocol]uint8{layers.IPProtocolTCP: datapath.ProtoTCP, layers.IPProtocolUDP: datapath.ProtoUDP,
		layers.IPProtocolSCTP: datapath.ProtoSCTP}
	for _, proto := range []layers.IPProtocol{layers.IPProtocolTCP, layers.IPProtocolUDP, layers.IPProtocolSCTP} {
		b, c, vip1, vip2 := b, c, vip1, vip2
		if proto == layers.IPProtocolSCTP { // translated only to the same port
			vip1, vip2 = netip.AddrPortFrom(vip1.Addr(), b.Port()), netip.AddrPortFrom(vip2.Addr(), b.Port())
		}
		t.Run(proto.String()+"/another backend", func(t *testing.T) {
			r := newSvcRig(t, front(vip1, protos[proto], b), front(vip2, protos[proto], b, c))
			// Each port: a flow to vip1 (on b), then one to vip2, which
			// must take c; on the old program half went to b.
			for port := uint16(41000); port < 41020; port++ {
				client := netip.AddrPortFrom(ipA, port)
				wantFrame(t, r.rig, r.egressA, segment(t, macA, macGW, client, vip1, proto), segment(t, macA, macGW, client, b, proto))
				wantFrame(t, r.rig, r.egressA, segment(t, macA, macGW, client, vip2, proto), segment(t, macA, macGW, client, c, proto))
				wantFrame(t, r.rig, r.egressA, segment(t, macA, macGW, client, vip2, proto), segment(t, macA, macGW, client, c, proto))
				wantFrame(t, r.rig, r.ingressA, segment(t, macGW, macA, b, client, proto), segment(t, macGW, macA, vip1, client, proto))
				wantFrame(t, r.rig, r.ingressA, segment(t, macGW, macA, c, client, proto), segment(t, macGW, macA, vip2, client, proto))
			}
			if n := r.svcStat(t, loader.SvcStatNewFlows); n != 40 {
				t.Errorf("new flows %d, want 40", n)
			}
			cs, err := datapath.ServiceCounters(&r.dp.Maps)
			must(t, err)
			for _, sc := range cs {
				if sc.Flows != 20 || sc.Failures != 0 {
					t.Errorf("%s: flows %d, failures %d; want 20, 0", sc.VIP, sc.Flows, sc.Failures)
				}
			}
		})
	}

	client := netip.AddrPortFrom(ipA, clientPort)
	// refused: vip2's flow on the tuple vip1's holds at b is dropped and
	// counted; vip1's flow goes on both ways.
	refused := func(t *testing.T, r *svcRig, proto layers.IPProtocol) {
		t.Helper()
		before := r.epStats(t, r.idA).Drops[loader.DropSvcTupleInUse]
		if res := r.run(t, r.egressA, segment(t, macA, macGW, client, vip2, proto)); res.verdict != actShot {
			t.Fatalf("a flow to %s on the tuple of the live flow to %s: verdict %d, want dropped", vip2, vip1, res.verdict)
		}
		if d := r.epStats(t, r.idA).Drops[loader.DropSvcTupleInUse] - before; d != 1 {
			t.Fatalf("service_tuple_in_use drops moved by %d, want 1", d)
		}
		wantFrame(t, r.rig, r.ingressA, segment(t, macGW, macA, b, client, proto), segment(t, macGW, macA, vip1, client, proto))
	}
	taken := func(t *testing.T, r *svcRig, proto layers.IPProtocol) {
		t.Helper()
		wantFrame(t, r.rig, r.egressA, segment(t, macA, macGW, client, vip2, proto), segment(t, macA, macGW, client, b, proto))
		wantFrame(t, r.rig, r.ingressA, segment(t, macGW, macA, b, client, proto), segment(t, macGW, macA, vip2, client, proto))
	}
	fin := func(tcp *layers.TCP) { tcp.SYN, tcp.FIN, tcp.ACK, tcp.Ack = false, true, true, 1 }
	rst := func(tcp *layers.TCP) { tcp.SYN, tcp.RST = false, true }
	fromClient := func(t *testing.T, r *svcRig, set func(*layers.TCP)) {
		t.Helper()
		wantFrame(t, r.rig, r.egressA, reflag(t, segment(t, macA, macGW, client, vip1, layers.IPProtocolTCP), set),
			reflag(t, segment(t, macA, macGW, client, b, layers.IPProtocolTCP), set))
	}
	fromBackend := func(t *testing.T, r *svcRig, set func(*layers.TCP)) {
		t.Helper()
		wantFrame(t, r.rig, r.ingressA, reflag(t, segment(t, macGW, macA, b, client, layers.IPProtocolTCP), set),
			reflag(t, segment(t, macGW, macA, vip1, client, layers.IPProtocolTCP), set))
	}
	for _, tc := range []struct {
		name string
		end  func(*testing.T, *svcRig) // what frees the tuple, after the checks that it is held
	}{
		{"a FIN each way", func(t *testing.T, r *svcRig) {
			fromClient(t, r, fin)
			refused(t, r, layers.IPProtocolTCP) // half-closed: the backend may still send
			fromBackend(t, r, fin)
		}},
		{"the backend's FIN, then the client's", func(t *testing.T, r *svcRig) {
			fromBackend(t, r, fin)
			refused(t, r, layers.IPProtocolTCP)
			fromClient(t, r, fin)
		}},
		{"the client's RST", func(t *testing.T, r *svcRig) { fromClient(t, r, rst) }},
		{"the backend's RST", func(t *testing.T, r *svcRig) {
			fromBackend(t, r, func(tcp *layers.TCP) { tcp.SYN, tcp.RST, tcp.ACK, tcp.Ack = false, true, true, 1 })
		}},
		{"idle past the hold", func(t *testing.T, r *svcRig) {
			// 30 minutes idle already: 2 h 1 min in all (past the
			// keepalive time, within its probes), then 2 h 13 min.
			ageFlow(t, &r.dp.Maps, client, vip1, uint8(layers.IPProtocolTCP), 91*time.Minute)
			refused(t, r, layers.IPProtocolTCP) // keepalive's probes are still due
			ageFlow(t, &r.dp.Maps, client, vip1, uint8(layers.IPProtocolTCP), 12*time.Minute)
		}},
	} {
		t.Run("TCP/none free until "+tc.name, func(t *testing.T) {
			r := newSvcRig(t, front(vip1, datapath.ProtoTCP, b), front(vip2, datapath.ProtoTCP, b))
			wantFrame(t, r.rig, r.egressA, segment(t, macA, macGW, client, vip1, layers.IPProtocolTCP),
				segment(t, macA, macGW, client, b, layers.IPProtocolTCP))
			refused(t, r, layers.IPProtocolTCP)
			cs, err := datapath.ServiceCounters(&r.dp.Maps)
			must(t, err)
			for _, sc := range cs {
				if want := uint64(map[bool]int{true: 1}[sc.VIP == vip2.Addr()]); sc.Failures != want {
					t.Errorf("%s: backend-selection failures %d, want %d", sc.VIP, sc.Failures, want)
				}
			}
			// Idle within the hold: still vip1's.
			ageFlow(t, &r.dp.Maps, client, vip1, uint8(layers.IPProtocolTCP), 30*time.Minute)
			refused(t, r, layers.IPProtocolTCP)
			tc.end(t, r)
			taken(t, r, layers.IPProtocolTCP)
		})
	}
	// SCTP is translated only to the same port: VIPs on the backend's.
	s1, s2 := netip.AddrPortFrom(vip1.Addr(), b.Port()), netip.AddrPortFrom(vip2.Addr(), b.Port())
	sctp := func(t *testing.T, r *svcRig, to netip.AddrPort) result {
		t.Helper()
		return r.run(t, r.egressA, segment(t, macA, macGW, client, to, layers.IPProtocolSCTP))
	}
	t.Run("SCTP/none free", func(t *testing.T) {
		r := newSvcRig(t, front(s1, datapath.ProtoSCTP, b), front(s2, datapath.ProtoSCTP, b))
		wantFrame(t, r.rig, r.egressA, segment(t, macA, macGW, client, s1, layers.IPProtocolSCTP),
			segment(t, macA, macGW, client, b, layers.IPProtocolSCTP))
		if res := sctp(t, r, s2); res.verdict != actShot {
			t.Fatalf("SCTP to %s on the tuple %s's flow holds: verdict %d, want dropped", s2, s1, res.verdict)
		}
		if d := r.epStats(t, r.idA).Drops[loader.DropSvcTupleInUse]; d != 1 {
			t.Errorf("service_tuple_in_use drops %d, want 1", d)
		}
		wantFrame(t, r.rig, r.ingressA, segment(t, macGW, macA, b, client, layers.IPProtocolSCTP),
			segment(t, macGW, macA, s1, client, layers.IPProtocolSCTP))
		ageFlow(t, &r.dp.Maps, client, s1, uint8(layers.IPProtocolSCTP), 61*time.Second)
		wantFrame(t, r.rig, r.egressA, segment(t, macA, macGW, client, s2, layers.IPProtocolSCTP),
			segment(t, macA, macGW, client, b, layers.IPProtocolSCTP))
	})
	// SCTP to another port is left to the host, tuple taken or not: no
	// flow written, nothing dropped.
	t.Run("SCTP/another port left to the host", func(t *testing.T) {
		r := newSvcRig(t, front(s1, datapath.ProtoSCTP, b), front(s2, datapath.ProtoSCTP, netip.AddrPortFrom(b.Addr(), 9090), b))
		wantFrame(t, r.rig, r.egressA, segment(t, macA, macGW, client, s1, layers.IPProtocolSCTP),
			segment(t, macA, macGW, client, b, layers.IPProtocolSCTP))
		flows := r.svcStat(t, loader.SvcStatNewFlows)
		// s2's picks: b:9090 (another port: left to the host) or b (its
		// tuple held: dropped); never a flow written.
		for range 20 {
			res := sctp(t, r, s2)
			if res.verdict != actOK && res.verdict != actShot {
				t.Fatalf("verdict %d", res.verdict)
			}
		}
		if n := r.svcStat(t, loader.SvcStatNewFlows); n != flows {
			t.Errorf("new flows %d -> %d: a flow was written", flows, n)
		}
		if n := r.svcStat(t, loader.SvcStatUntranslatable); n == 0 {
			t.Errorf("no frame left to the host as untranslatable in 20")
		}
	})
	t.Run("UDP/none free: taken over", func(t *testing.T) {
		r := newSvcRig(t, front(vip1, datapath.ProtoUDP, b), front(vip2, datapath.ProtoUDP, b))
		wantFrame(t, r.rig, r.egressA, segment(t, macA, macGW, client, vip1, layers.IPProtocolUDP),
			segment(t, macA, macGW, client, b, layers.IPProtocolUDP))
		taken(t, r, layers.IPProtocolUDP)
		if d := r.epStats(t, r.idA).Drops[loader.DropSvcTupleInUse]; d != 0 {
			t.Errorf("service_tuple_in_use drops %d, want 0", d)
		}
		// vip1's flow sends again (past its once-a-second check): the
		// replies are its again, the last sender's.
		ageFlow(t, &r.dp.Maps, client, vip1, uint8(layers.IPProtocolUDP), 2*time.Second)
		wantFrame(t, r.rig, r.egressA, segment(t, macA, macGW, client, vip1, layers.IPProtocolUDP),
			segment(t, macA, macGW, client, b, layers.IPProtocolUDP))
		wantFrame(t, r.rig, r.ingressA, segment(t, macGW, macA, b, client, layers.IPProtocolUDP),
			segment(t, macGW, macA, vip1, client, layers.IPProtocolUDP))
	})
	// A flow first seen at its RST (its entry lost to the LRU) is written
	// ended: it holds nothing.
	t.Run("TCP/a flow first seen at its RST holds nothing", func(t *testing.T) {
		r := newSvcRig(t, front(vip1, datapath.ProtoTCP, b), front(vip2, datapath.ProtoTCP, b))
		fromClient(t, r, rst)
		taken(t, r, layers.IPProtocolTCP)
	})
	// A SYN on vip1's closed flow after vip2's took the tuple: vip1 picks
	// afresh (b, held by vip2: dropped), and vip2's reply entry stays.
	t.Run("TCP/a closed flow reopened leaves the tuple's new holder", func(t *testing.T) {
		r := newSvcRig(t, front(vip1, datapath.ProtoTCP, b), front(vip2, datapath.ProtoTCP, b))
		wantFrame(t, r.rig, r.egressA, segment(t, macA, macGW, client, vip1, layers.IPProtocolTCP),
			segment(t, macA, macGW, client, b, layers.IPProtocolTCP))
		fromClient(t, r, rst)
		taken(t, r, layers.IPProtocolTCP)
		if res := r.run(t, r.egressA, segment(t, macA, macGW, client, vip1, layers.IPProtocolTCP)); res.verdict != actShot {
			t.Fatalf("vip1's new connection on the tuple vip2 holds: verdict %d, want dropped", res.verdict)
		}
		wantFrame(t, r.rig, r.ingressA, segment(t, macGW, macA, b, client, layers.IPProtocolTCP),
			segment(t, macGW, macA, vip2, client, layers.IPProtocolTCP))
	})
}
