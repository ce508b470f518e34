package events_test

import (
	"context"
	"log/slog"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/gopacket/gopacket/layers"

	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/events"
	"github.com/underpass-cni/underpass/internal/loader"
	"github.com/underpass-cni/underpass/internal/testutil"
)

const parentIfindex = 1 // lo: BPF_PROG_TEST_RUN needs a real device

var must = testutil.Must

// records is a slog.Handler that hands every record to the test.
type records chan slog.Record

func (records) Enabled(context.Context, slog.Level) bool          { return true }
func (r records) Handle(_ context.Context, rec slog.Record) error { r <- rec.Clone(); return nil }
func (r records) WithAttrs([]slog.Attr) slog.Handler              { return r }
func (r records) WithGroup(string) slog.Handler                   { return r }

func (r records) next(t *testing.T) map[string]string {
	t.Helper()
	select {
	case rec := <-r:
		out := map[string]string{"msg": rec.Message, "level": rec.Level.String()}
		rec.Attrs(func(a slog.Attr) bool {
			out[a.Key] = a.Value.String()
			return true
		})
		return out
	case <-time.After(3 * time.Second):
		t.Fatal("no log record")
		return nil
	}
}

func (r records) none(t *testing.T, wait time.Duration) {
	t.Helper()
	select {
	case rec := <-r:
		t.Fatalf("unexpected log record: %s", rec.Message)
	case <-time.After(wait):
	}
}

type rig struct {
	dp *loader.Objects
	id uint32
}

func newRig(t *testing.T) *rig {
	t.Helper()
	dp := testutil.LoadDatapath(t)
	m := &dp.Maps
	must(t, datapath.PutParent(m, parentIfindex, testutil.MACParent, loader.ModeMacvlan))
	id, err := datapath.Register(m, datapath.Endpoint{
		ContainerID: "c0ffee0123456789abcdef", IfName: "net1", ParentIfindex: parentIfindex, ParentName: "lo",
		Mode: loader.ModeMacvlan, MAC: testutil.MACA, Addrs: []netip.Prefix{netip.PrefixFrom(testutil.IPA, 24), netip.PrefixFrom(testutil.IPA6, 64)},
		PodName: "web-0", PodNamespace: "shop",
	})
	must(t, err)
	return &rig{dp: dp, id: id}
}

// start runs a reader until the test ends.
func (r *rig) start(t *testing.T, opts events.Options) records {
	t.Helper()
	recs := make(records, 16)
	opts.Log = slog.New(recs)
	opts.IfName = func(i int) string { return map[int]string{parentIfindex: "lo"}[i] }
	rd, err := events.New(&r.dp.Maps, opts)
	must(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- rd.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(3 * time.Second):
			t.Error("Run did not return after cancel")
		}
	})
	return recs
}

type xdpCtx struct {
	Data, DataEnd, DataMeta, IngressIfindex, RxQueueIndex, EgressIfindex uint32
}

// xdp runs parent_xdp on a frame arriving from the wire on the parent.
func (r *rig) xdp(t *testing.T, frame []byte) {
	t.Helper()
	_, err := r.dp.Programs.ParentXdp.Run(&ebpf.RunOptions{Data: frame,
		Context: xdpCtx{DataEnd: uint32(len(frame)), IngressIfindex: parentIfindex}, Repeat: 1})
	must(t, err)
}

// garp is a gratuitous ARP from mac claiming ip.
func garp(t *testing.T, mac net.HardwareAddr, ip netip.Addr) []byte {
	return testutil.Frame(t, &layers.Ethernet{SrcMAC: mac, DstMAC: testutil.MACBcast, EthernetType: layers.EthernetTypeARP}, &layers.ARP{
		AddrType: layers.LinkTypeEthernet, Protocol: layers.EthernetTypeIPv4, HwAddressSize: 6, ProtAddressSize: 4,
		Operation: layers.ARPRequest, SourceHwAddress: mac, SourceProtAddress: ip.AsSlice(),
		DstHwAddress: make([]byte, 6), DstProtAddress: ip.AsSlice(),
	})
}

// unsolicitedNA is an unsolicited neighbour advertisement from mac for ip.
func unsolicitedNA(t *testing.T, mac net.HardwareAddr, ip netip.Addr) []byte {
	i6 := &layers.IPv6{Version: 6, HopLimit: 255, NextHeader: layers.IPProtocolICMPv6, SrcIP: ip.AsSlice(),
		DstIP: netip.MustParseAddr("ff02::1").AsSlice()}
	ic := &layers.ICMPv6{TypeCode: layers.CreateICMPv6TypeCode(layers.ICMPv6TypeNeighborAdvertisement, 0)}
	ic.SetNetworkLayerForChecksum(i6)
	na := &layers.ICMPv6NeighborAdvertisement{Flags: 0x20, TargetAddress: ip.AsSlice(),
		Options: layers.ICMPv6Options{{Type: layers.ICMPv6OptTargetAddress, Data: mac}}}
	return testutil.Frame(t, &layers.Ethernet{SrcMAC: mac, DstMAC: net.HardwareAddr{0x33, 0x33, 0, 0, 0, 1},
		EthernetType: layers.EthernetTypeIPv6}, i6, ic, na)
}

func TestConflictLogged(t *testing.T) {
	r := newRig(t)
	recs := r.start(t, events.Options{RepeatInterval: -1})

	r.xdp(t, garp(t, testutil.MACWire, testutil.IPA))
	got := recs.next(t)
	want := map[string]string{
		"level": "WARN", "ip": testutil.IPA.String(), "mac": testutil.MACWire.String(), "pod": "web-0", "namespace": "shop",
		"endpoint": "c0ffee012345/net1", "container_id": "c0ffee0123456789abcdef", "parent": "lo", "via": "arp",
		"endpoint_mac": testutil.MACA.String(),
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s = %q, want %q (record %v)", k, got[k], v, got)
		}
	}
	if got["endpoint_id"] == "" || got["endpoint_id"] == "0" {
		t.Errorf("no endpoint id: %v", got)
	}

	r.xdp(t, unsolicitedNA(t, testutil.MACWire, testutil.IPA6))
	got = recs.next(t)
	if got["ip"] != testutil.IPA6.String() || got["via"] != "nd" || got["pod"] != "web-0" {
		t.Errorf("NA conflict: %v", got)
	}

	// The endpoint's own announcement is no conflict.
	r.xdp(t, garp(t, testutil.MACA, testutil.IPA))
	recs.none(t, 200*time.Millisecond)
}

func TestConflictRepeatsSuppressed(t *testing.T) {
	r := newRig(t)
	const every = 300 * time.Millisecond
	recs := r.start(t, events.Options{RepeatInterval: every})
	start := time.Now()
	for range 3 {
		r.xdp(t, garp(t, testutil.MACWire, testutil.IPA))
	}
	if got := recs.next(t); got["repeated"] != "" {
		t.Fatalf("first line says repeated: %v", got)
	}
	if time.Since(start) < every-50*time.Millisecond {
		recs.none(t, every-time.Since(start)-50*time.Millisecond)
	}
	// Another MAC is another conflict: logged at once.
	other := net.HardwareAddr{0x02, 0xee, 0, 0, 0, 0xef}
	r.xdp(t, garp(t, other, testutil.IPA))
	if got := recs.next(t); got["mac"] != other.String() {
		t.Fatalf("second MAC not logged: %v", got)
	}
	time.Sleep(time.Until(start.Add(every + 50*time.Millisecond)))
	r.xdp(t, garp(t, testutil.MACWire, testutil.IPA))
	if got := recs.next(t); got["repeated"] != "2" || got["mac"] != testutil.MACWire.String() {
		t.Fatalf("after the interval: %v, want repeated=2", got)
	}
}

func TestDeletedEndpoint(t *testing.T) {
	r := newRig(t)
	// The event is queued, then the endpoint goes before the reader gets to
	// it: the line still names the address, the MAC and the id.
	r.xdp(t, garp(t, testutil.MACWire, testutil.IPA))
	must(t, datapath.Unregister(&r.dp.Maps, r.id))
	recs := r.start(t, events.Options{RepeatInterval: -1})
	got := recs.next(t)
	if got["ip"] != testutil.IPA.String() || got["mac"] != testutil.MACWire.String() || got["endpoint"] != "(deleted since)" || got["pod"] != "" {
		t.Fatalf("%v", got)
	}
}

// TestStart: the caller's loader.Objects may be closed while the reader runs
// (it holds its own map references).
func TestStart(t *testing.T) {
	r := newRig(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	dp, err := loader.Open(r.dp.Dir)
	must(t, err)
	recs := make(records, 4)
	must(t, events.Start(ctx, &dp.Maps, events.Options{Log: slog.New(recs)}))
	dp.Close()
	r.xdp(t, garp(t, testutil.MACWire, testutil.IPA))
	if got := recs.next(t); got["pod"] != "web-0" {
		t.Fatalf("%v", got)
	}
}
