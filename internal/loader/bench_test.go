package loader_test

import (
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/gopacket/gopacket/layers"

	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/testutil"
)

// BenchmarkParentEgress measures ns/packet of each path through the parent
// program with BPF_PROG_TEST_RUN (the kernel's own loop, so Go overhead is
// not in the figure). Run with: make bench.
//
// "ns/pkt" is the program's own cost: the time of an empty program under
// the same harness (the test-run loop's overhead) is measured first and
// subtracted; "raw-ns/pkt" is before the subtraction.
func BenchmarkParentEgress(b *testing.B) {
	r := newRig(b)
	empty := emptyProgram(b)
	baseline := measure(b, empty, icmpEcho(b, macA, macGW, ipA, ipRemote), 20)
	b.Logf("test-run overhead (empty program): %.1f ns/pkt", baseline)
	for _, tc := range []struct {
		name  string
		frame []byte
	}{
		{"pass/endpoint-to-wire", icmpEcho(b, macA, macGW, ipA, ipRemote)},
		{"pass/host-to-wire", icmpEcho(b, macParent, macGW, ipHost, ipRemote)},
		{"hairpin/host-to-endpoint", icmpEcho(b, macParent, macA, ipHost, ipA)},
		{"hairpin/endpoint-to-host", icmpEcho(b, macA, macParent, ipA, ipHost)},
		{"hairpin/host-to-endpoint-v6", icmpEcho(b, macParent, macA, ipHost6, ipA6)},
		{"steer/live-vip", tcpSYN(b, macA, macGW, ipA, vipLive, "S")},
		{"guard/stale-drop", tcpSYN(b, macA, macGW, ipA, vipStale, "S")},
		{"arp/not-local", arp(b, layers.ARPRequest, macA, macBcast, macA, ipA, ipGW)},
	} {
		b.Run(tc.name, func(b *testing.B) {
			benchProg(b, r, tc.frame, false, baseline)
		})
	}
	b.Run("guard/stale-reject", func(b *testing.B) {
		r.setConfig(b, datapath.Config{ServicesSynced: true, HostReachable: true, StaleReject: true})
		defer r.setConfig(b, datapath.Config{ServicesSynced: true, HostReachable: true})
		benchProg(b, r, tcpSYN(b, macA, macGW, ipA, vipStale, "S"), false, baseline)
	})
	b.Run("uplink/pass", func(b *testing.B) {
		benchProg(b, r, icmpEcho(b, macParent, macGW, ipHost, ipRemote), true, baseline)
	})
}

func benchProg(b *testing.B, r *rig, frame []byte, uplink bool, baseline float64) {
	prog := r.dp.Programs.ParentEgress
	if uplink {
		prog = r.dp.Programs.UplinkEgress
	}
	b.ResetTimer()
	testutil.ReportPerPacket(b, measure(b, prog, frame, b.N), baseline)
}

// measure returns the mean ns per run over rounds of the kernel's loop.
func measure(b *testing.B, prog *ebpf.Program, frame []byte, rounds int) float64 {
	return testutil.MeasureProg(b, prog, frame, rounds, nil)
}

// BenchmarkEndpoint measures the endpoint programs, which every pod frame
// runs through (egress: the spoofing check and tx counters; ingress: rx
// counters). BPF_PROG_TEST_RUN cannot set the filter's classid, so the
// figure includes the test's wrapper (a store and a tail call, see
// loadEndpoint), measured alone and subtracted as "wrapper".
func BenchmarkEndpoint(b *testing.B) {
	r := newRig(b)
	in, eg := loadEndpoint(b, r.dp, r.idA)
	// The wrapper on its own: tail-calling a program that only returns.
	empty := emptyProgram(b)
	wrapOnly, _ := loadEndpointInto(b, empty, empty, r.idA)
	frame := icmpEcho(b, macA, macGW, ipA, ipRemote)
	wrapper := measure(b, wrapOnly, frame, 20)
	b.Logf("test-run overhead with the classid wrapper: %.1f ns/pkt", wrapper)
	benchWrapped(b, wrapper, []wrappedCase{
		{"egress/own-ipv4", eg, frame},
		{"egress/own-ipv6", eg, icmpEcho(b, macA, macGW, ipA6, ipRemote6)},
		{"egress/spoofed-drop", eg, icmpEcho(b, macA, macGW, ipB, ipRemote)},
		{"ingress", in, icmpEcho(b, macGW, macA, ipRemote, ipA)},
	})
}

// wrappedCase is a program run through the classid wrapper on a frame.
type wrappedCase struct {
	name  string
	prog  *ebpf.Program
	frame []byte
}

// benchWrapped reports each case's ns/packet with the wrapper's cost
// subtracted.
func benchWrapped(b *testing.B, wrapper float64, cases []wrappedCase) {
	for _, tc := range cases {
		b.Run(tc.name, func(b *testing.B) {
			b.ResetTimer()
			testutil.ReportPerPacket(b, measure(b, tc.prog, tc.frame, b.N), wrapper)
		})
	}
}

// emptyProgram only returns: the harness's own cost.
func emptyProgram(b *testing.B) *ebpf.Program {
	p, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type: ebpf.SchedCLS, License: "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 0), asm.Return()},
	})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { p.Close() })
	return p
}

// BenchmarkServiceTranslation measures services.mode: ebpf per packet of an
// established flow, beside the same endpoint program on a frame it does not
// translate. A test run repeats on one buffer, which the first run has
// translated already: the frontend's one backend is the VIP itself, so
// every run does the whole work (frontend, flow and backend lookups, the
// rewrites with their checksum fixes, the next-hop lookup) with the same
// result. The classid wrapper is subtracted as in BenchmarkEndpoint.
func BenchmarkServiceTranslation(b *testing.B) {
	vip := netip.AddrPortFrom(vipSvc, 80)
	r := newSvcRig(b, datapath.Frontend{VIP: vipSvc, Port: 80, Proto: datapath.ProtoTCP, Backends: []netip.AddrPort{vip}})
	empty := emptyProgram(b)
	wrapOnly, _ := loadEndpointInto(b, empty, empty, r.idA)
	client := netip.AddrPortFrom(ipA, clientPort)
	toVIP := segment(b, macA, macGW, client, vip, layers.IPProtocolTCP)
	wrapper := measure(b, wrapOnly, toVIP, 20)
	// The flow's first packet records it (and its reply).
	r.run(b, r.egressA, toVIP)
	benchWrapped(b, wrapper, []wrappedCase{
		{"egress/not-a-service", r.egressA, segment(b, macA, macGW, client, netip.AddrPortFrom(ipRemote, 80), layers.IPProtocolTCP)},
		{"egress/translated", r.egressA, toVIP},
		{"ingress/not-a-reply", r.ingressA, segment(b, macGW, macA, netip.AddrPortFrom(ipRemote, 80), client, layers.IPProtocolTCP)},
		{"ingress/reply-reversed", r.ingressA, segment(b, macGW, macA, vip, client, layers.IPProtocolTCP)},
	})
}
