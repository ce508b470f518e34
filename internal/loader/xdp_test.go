package loader_test

import (
	"encoding/binary"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"
	"github.com/gopacket/gopacket/layers"

	"github.com/underpass-cni/underpass/internal/loader"
)

// xdpCtx is struct xdp_md for a test run: only the receiving device is set.
type xdpCtx struct {
	Data, DataEnd, DataMeta, IngressIfindex, RxQueueIndex, EgressIfindex uint32
}

func (r *rig) xdp(tb testing.TB, frame []byte) uint32 {
	tb.Helper()
	opts := ebpf.RunOptions{Data: frame, Context: xdpCtx{DataEnd: uint32(len(frame)), IngressIfindex: parentIfindex}, Repeat: 1}
	verdict, err := r.dp.Programs.ParentXdp.Run(&opts)
	if err != nil {
		tb.Fatalf("xdp run: %v", err)
	}
	if verdict != 2 {
		tb.Fatalf("xdp verdict %d, want XDP_PASS: the program only observes", verdict)
	}
	return verdict
}

func neighborAdvert(tb testing.TB, smac net.HardwareAddr, target netip.Addr) []byte {
	return neighborAdvertFrom(tb, smac, target, target, smac)
}

func TestXDPConflicts(t *testing.T) {
	r := newRig(t)
	rd, err := ringbuf.NewReader(r.dp.Maps.Events)
	must(t, err)
	defer rd.Close()

	for _, tc := range []struct {
		name     string
		frame    []byte
		conflict bool
		claimed  netip.Addr
	}{
		{"gratuitous ARP from a stranger", arp(t, layers.ARPRequest, macWire, macBcast, macWire, ipA, ipA), true, ipA},
		{"ARP reply from a stranger", arp(t, layers.ARPReply, macWire, macParent, macWire, ipA, ipHost), true, ipA},
		{"NA from a stranger", neighborAdvert(t, macWire, ipA6), true, ipA6},
		{"the endpoint's own ARP echoed back", arp(t, layers.ARPRequest, macA, macBcast, macA, ipA, ipGW), false, ipA},
		{"ARP for the endpoint (a question)", arp(t, layers.ARPRequest, macWire, macBcast, macWire, ipGW, ipA), false, ipA},
		{"stranger claims a foreign IP", arp(t, layers.ARPRequest, macWire, macBcast, macWire, ipRemote, ipRemote), false, ipA},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := r.epStats(t, r.idA).IpConflicts
			g := r.stats(t)[loader.StatIPConflict].Packets
			r.xdp(t, tc.frame)
			after := r.epStats(t, r.idA).IpConflicts
			if got := after - before; (got == 1) != tc.conflict || got > 1 {
				t.Fatalf("ip_conflicts moved by %d, want conflict=%v", got, tc.conflict)
			}
			if got := r.stats(t)[loader.StatIPConflict].Packets - g; (got == 1) != tc.conflict {
				t.Fatalf("global conflict counter moved by %d", got)
			}
			if !tc.conflict {
				return
			}
			rd.SetDeadline(time.Now().Add(2 * time.Second))
			rec, err := rd.Read()
			if err != nil {
				t.Fatalf("no conflict event: %v", err)
			}
			var ev loader.Event
			if len(rec.RawSample) < binary.Size(ev) {
				t.Fatalf("short event: %d bytes", len(rec.RawSample))
			}
			_, err = binary.Decode(rec.RawSample, binary.NativeEndian, &ev)
			must(t, err)
			if ev.Kind != uint32(loader.EventIPConflict) || ev.EpId != r.idA || net.HardwareAddr(ev.Mac[:]).String() != macWire.String() ||
				netip.AddrFrom16(ev.Addr).Unmap() != tc.claimed || ev.Ifindex != parentIfindex {
				t.Fatalf("event %+v does not name endpoint %d, %s, %s", ev, r.idA, macWire, tc.claimed)
			}
		})
	}
}

func TestXDPWireCounters(t *testing.T) {
	r := newRig(t)
	f := icmpEcho(t, macGW, macA, ipGW, ipA)
	before := r.epStats(t, r.idA).WireRx
	r.xdp(t, f)
	r.xdp(t, f)
	after := r.epStats(t, r.idA).WireRx
	if after.Packets != before.Packets+2 || after.Bytes != before.Bytes+2*uint64(len(f)) {
		t.Fatalf("wire_rx %+v -> %+v, want +2 packets, +%d bytes", before, after, 2*len(f))
	}
	b := r.epStats(t, r.idB).WireRx
	r.xdp(t, icmpEcho(t, macGW, macParent, ipGW, ipHost))
	r.xdp(t, icmpEcho(t, macGW, macBcast, ipGW, netip.MustParseAddr("192.0.2.255")))
	if r.epStats(t, r.idA).WireRx != after || r.epStats(t, r.idB).WireRx != b {
		t.Fatal("frames for the host or broadcast were counted for an endpoint")
	}
}
