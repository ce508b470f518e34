package observability_test

import (
	"net"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"

	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
	"github.com/underpass-cni/underpass/internal/testutil"
)

// BenchmarkParentXDP measures what parent_xdp costs per frame from the
// wire, by path, with BPF_PROG_TEST_RUN (the kernel's own loop). A test run
// without a context receives on lo, so lo plays the parent. "ns/pkt" is net
// of the harness: an empty XDP program's time is subtracted. Reported, not
// asserted. Run: go test -run '^$' -bench ParentXDP ./test/observability/
func BenchmarkParentXDP(b *testing.B) {
	dp := testutil.LoadDatapath(b)
	m := &dp.Maps
	// The program rigs' addresses; the wire host's is one on the subnet
	// that no endpoint has.
	macParent, macPod, macWire := testutil.MACParent, testutil.MACA, testutil.MACWire
	ipPod, ipHost := testutil.IPA, testutil.IPHost
	ipWire := netip.MustParseAddr("192.0.2.50")
	must(b, datapath.PutParent(m, 1, macParent, loader.ModeMacvlan))
	_, err := datapath.Register(m, datapath.Endpoint{ContainerID: "bench", IfName: "eth0", ParentIfindex: 1,
		Mode: loader.ModeMacvlan, MAC: macPod, Addrs: []netip.Prefix{netip.PrefixFrom(ipPod, 24)}})
	must(b, err)

	empty, err := ebpf.NewProgram(&ebpf.ProgramSpec{Type: ebpf.XDP, License: "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 2), asm.Return()}})
	must(b, err)
	defer empty.Close()
	toPod := ping(b, macWire, macPod, ipWire, ipPod)
	baseline := measureXDP(b, empty, toPod, 20)
	b.Logf("test-run overhead (empty XDP program): %.1f ns/pkt", baseline)

	for _, tc := range []struct {
		name  string
		frame []byte
	}{
		{"unicast-to-pod (counted)", toPod},
		{"unicast-to-host", ping(b, macWire, macParent, ipWire, ipHost)},
		{"arp-request (no conflict)", arpFrame(b, macWire, ipWire, ipPod)},
		{"gratuitous-arp-conflict (event)", arpFrame(b, macWire, ipPod, ipPod)},
	} {
		b.Run(tc.name, func(b *testing.B) {
			testutil.ReportPerPacket(b, measureXDP(b, dp.Programs.ParentXdp, tc.frame, b.N), baseline)
		})
	}
}

// measureXDP is testutil.MeasureProg for a frame every round must pass.
func measureXDP(b *testing.B, prog *ebpf.Program, frame []byte, rounds int) float64 {
	return testutil.MeasureProg(b, prog, frame, rounds, func(verdict uint32) {
		if verdict != 2 {
			b.Fatalf("verdict %d, want XDP_PASS", verdict)
		}
	})
}

func ping(tb testing.TB, smac, dmac net.HardwareAddr, src, dst netip.Addr) []byte {
	return testutil.Frame(tb, &layers.Ethernet{SrcMAC: smac, DstMAC: dmac, EthernetType: layers.EthernetTypeIPv4},
		&layers.IPv4{Version: 4, IHL: 5, TTL: 64, Protocol: layers.IPProtocolICMPv4, SrcIP: src.AsSlice(), DstIP: dst.AsSlice()},
		&layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(layers.ICMPv4TypeEchoRequest, 0)}, gopacket.Payload("benchmark payload"))
}

func arpFrame(tb testing.TB, mac net.HardwareAddr, spa, tpa netip.Addr) []byte {
	return testutil.Frame(tb, &layers.Ethernet{SrcMAC: mac, DstMAC: net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, EthernetType: layers.EthernetTypeARP},
		&layers.ARP{AddrType: layers.LinkTypeEthernet, Protocol: layers.EthernetTypeIPv4, HwAddressSize: 6, ProtAddressSize: 4,
			Operation: layers.ARPRequest, SourceHwAddress: mac, SourceProtAddress: spa.AsSlice(),
			DstHwAddress: make([]byte, 6), DstProtAddress: tpa.AsSlice()})
}
