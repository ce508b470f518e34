package loader_test

import (
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"net/netip"
	"path/filepath"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"golang.org/x/sys/unix"

	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
	"github.com/underpass-cni/underpass/internal/testutil"
)

const (
	actOK       = 0
	actPass     = 0xffffffff // TC_ACT_UNSPEC: the parent programs pass to the next program
	actShot     = 2
	actRedirect = 7

	// The program tests use loopback as "the parent": BPF_PROG_TEST_RUN needs
	// a real device for skb->dev, and lo exists in every netns.
	parentIfindex = 1
	bpfFIngress   = 1
)

// skbCtx is the prefix of struct __sk_buff up to ifindex: enough to set
// the device and a mark, and to read the mark back.
type skbCtx struct {
	Len            uint32
	PktType        uint32
	Mark           uint32
	QueueMapping   uint32
	Protocol       uint32
	VlanPresent    uint32
	VlanTCI        uint32
	VlanProto      uint32
	Priority       uint32
	IngressIfindex uint32
	Ifindex        uint32
}

// skbCtxOut has room for all of struct __sk_buff: the kernel refuses to
// copy a truncated context out.
type skbCtxOut struct {
	skbCtx
	Rest [256]byte
}

type rig struct {
	dp  *loader.Objects
	idA uint32
	idB uint32
	// ingress is the frames' skb->ingress_ifindex: 0 for the host's own
	// traffic, the input device for what the host forwards.
	ingress uint32
	// mark is the frames' skb->mark; 0 means 0xbeef, a mark a pod set.
	mark uint32
}

func newRig(tb testing.TB) *rig {
	tb.Helper()
	testutil.RequireRoot(tb)
	dir := filepath.Join(testutil.MountBPFFS(tb), "underpass")
	dp, err := loader.Load(dir, loader.Options{Trace: true})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { dp.Close() })
	m := &dp.Maps

	must(tb, datapath.PutParent(m, parentIfindex, macParent, loader.ModeMacvlan))
	must(tb, datapath.SetConfig(m, datapath.Config{ServicesSynced: true, HostReachable: true}, 1))
	r := &rig{dp: dp}
	r.idA, err = datapath.Register(m, datapath.Endpoint{
		ContainerID: "ctr-a", IfName: "eth0", ParentIfindex: parentIfindex, Mode: loader.ModeMacvlan, MAC: macA,
		Addrs: []netip.Prefix{netip.PrefixFrom(ipA, 24), netip.PrefixFrom(ipA6, 64)}, PodName: "a", PodNamespace: "default",
	})
	must(tb, err)
	r.idB, err = datapath.Register(m, datapath.Endpoint{
		ContainerID: "ctr-b", IfName: "eth0", ParentIfindex: parentIfindex, Mode: loader.ModeMacvlan, MAC: macB,
		Addrs: []netip.Prefix{netip.PrefixFrom(ipB, 24)},
	})
	must(tb, err)

	hosts := datapath.HostSet{}
	hosts.Add(netip.PrefixFrom(ipHost, 32), loader.HostLocal)
	hosts.Add(netip.PrefixFrom(ipHost6, 128), loader.HostLocal)
	hosts.Add(netip.PrefixFrom(ipDNS, 32), loader.HostSteer)
	must(tb, datapath.SyncHostCIDRs(m, hosts))
	must(tb, datapath.SyncServiceCIDRs(m, []netip.Prefix{netip.MustParsePrefix("10.96.0.0/16"), netip.MustParsePrefix("fd00:96::/108")}))
	_, _, err = datapath.SyncLiveServices(m, map[netip.Addr]bool{vipLive: true, vip6Live: true})
	must(tb, err)
	return r
}

var must = testutil.Must

type result struct {
	verdict uint32
	out     []byte
	mark    uint32
	trace   loader.Trace
}

func (r *rig) run(tb testing.TB, prog *ebpf.Program, frame []byte) result {
	tb.Helper()
	res, err := r.tryRun(tb, prog, frame)
	if err != nil {
		tb.Fatalf("run on % x: %v", frame, err)
	}
	return res
}

func (r *rig) tryRun(tb testing.TB, prog *ebpf.Program, frame []byte) (result, error) {
	tb.Helper()
	// Reset the trace so each run shows only its own decision.
	zero := make([]loader.Trace, ebpf.MustPossibleCPU())
	must(tb, r.dp.Maps.Trace.Update(uint32(0), zero, ebpf.UpdateAny))

	in := skbCtx{Ifindex: parentIfindex, IngressIfindex: r.ingress, Mark: 0xbeef}
	if r.mark != 0 {
		in.Mark = r.mark
	}
	var outCtx skbCtxOut
	out := make([]byte, len(frame)+256)
	opts := ebpf.RunOptions{Data: frame, DataOut: out, Context: in, ContextOut: &outCtx, Repeat: 1}
	verdict, err := prog.Run(&opts)
	if err != nil {
		return result{}, err
	}
	var traces []loader.Trace
	must(tb, r.dp.Maps.Trace.Lookup(uint32(0), &traces))
	var tr loader.Trace
	for _, t := range traces {
		if t.Count > 0 {
			tr = t
		}
	}
	return result{verdict: verdict, out: opts.DataOut, mark: outCtx.Mark, trace: tr}, nil
}

func (r *rig) parent(tb testing.TB, frame []byte) result {
	return r.run(tb, r.dp.Programs.ParentEgress, frame)
}

func (r *rig) stats(tb testing.TB) []loader.Counter {
	s, err := datapath.GlobalStats(&r.dp.Maps)
	must(tb, err)
	return s
}

func (r *rig) epStats(tb testing.TB, id uint32) loader.EndpointStats {
	s, err := datapath.EndpointStats(&r.dp.Maps, id)
	must(tb, err)
	return s
}

func (r *rig) setConfig(tb testing.TB, c datapath.Config) {
	must(tb, datapath.SetConfig(&r.dp.Maps, c, 2))
}

// wantRedirect checks the frame was sent back into the parent's receive
// path, with the mark cleared.
func wantRedirect(tb testing.TB, res result, ep uint32) {
	tb.Helper()
	wantRedirectMarked(tb, res, ep, 0)
}

// wantSteered is wantRedirect for a frame steered to a Service VIP or a
// steered host CIDR: it enters the host marked for the masquerade rules,
// and as a Service's when its destination is in the rig's Service CIDRs.
func wantSteered(tb testing.TB, res result, ep uint32) {
	tb.Helper()
	mark := loader.MarkSteered
	pkt := gopacket.NewPacket(res.out, layers.LayerTypeEthernet, gopacket.Default)
	if nl := pkt.NetworkLayer(); nl != nil {
		dst, _ := netip.AddrFromSlice(nl.NetworkFlow().Dst().Raw())
		for _, svc := range []string{"10.96.0.0/16", "fd00:96::/108"} {
			if netip.MustParsePrefix(svc).Contains(dst.Unmap()) {
				mark |= loader.MarkService
			}
		}
	}
	wantRedirectMarked(tb, res, ep, mark)
}

// wantRedirectMarked is wantRedirect with the mark the frame must carry
// into the host (the run starts with the pod's own mark 0xbeef).
func wantRedirectMarked(tb testing.TB, res result, ep uint32, mark uint32) {
	tb.Helper()
	if res.verdict != actRedirect {
		tb.Fatalf("verdict %d, want redirect (%d)", res.verdict, actRedirect)
	}
	if res.trace.Kind != uint32(loader.TraceRedirect) || res.trace.Ifindex != parentIfindex || res.trace.Flags != bpfFIngress {
		tb.Fatalf("redirect went to %+v, want ingress of ifindex %d", res.trace, parentIfindex)
	}
	if res.trace.EpId != ep {
		tb.Fatalf("redirect attributed to endpoint %d, want %d", res.trace.EpId, ep)
	}
	if res.mark != mark {
		tb.Fatalf("skb->mark %#x after the redirect, want %#x", res.mark, mark)
	}
}

func wantPass(tb testing.TB, res result, frame []byte) {
	tb.Helper()
	if res.verdict != actPass {
		tb.Fatalf("verdict %d, want pass", res.verdict)
	}
	if res.trace.Count != 0 && res.trace.Kind == uint32(loader.TraceRedirect) {
		tb.Fatalf("passed frame was also redirected: %+v", res.trace)
	}
	if string(res.out[:len(frame)]) != string(frame) {
		tb.Fatalf("passed frame was modified")
	}
}

func TestHairpinUnicast(t *testing.T) {
	r := newRig(t)
	for _, tc := range []struct {
		name   string
		frame  []byte
		ep     uint32
		toHost bool
	}{
		{"host to endpoint v4", icmpEcho(t, macParent, macA, ipHost, ipA), r.idA, false},
		{"endpoint to host v4", icmpEcho(t, macA, macParent, ipA, ipHost), r.idA, true},
		{"host to endpoint v6", icmpEcho(t, macParent, macA, ipHost6, ipA6), r.idA, false},
		{"endpoint to host v6", icmpEcho(t, macA, macParent, ipA6, ipHost6), r.idA, true},
		{"host to endpoint B", icmpEcho(t, macParent, macB, ipHost, ipB), r.idB, false},
		{"ARP reply host to endpoint", arp(t, layers.ARPReply, macParent, macA, macParent, ipHost, ipA), r.idA, false},
		{"ARP reply endpoint to host", arp(t, layers.ARPReply, macA, macParent, macA, ipA, ipHost), r.idA, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := r.epStats(t, tc.ep)
			g := r.stats(t)
			res := r.parent(t, tc.frame)
			wantRedirect(t, res, tc.ep)
			if string(res.out[:len(tc.frame)]) != string(tc.frame) {
				t.Fatal("hairpinned frame was modified")
			}
			after := r.epStats(t, tc.ep)
			g2 := r.stats(t)
			if tc.toHost {
				if after.EpToHost.Packets != before.EpToHost.Packets+1 || after.EpToHost.Bytes != before.EpToHost.Bytes+uint64(len(tc.frame)) {
					t.Fatalf("ep_to_host %+v -> %+v", before.EpToHost, after.EpToHost)
				}
				if g2[loader.StatEndpointToHost].Packets != g[loader.StatEndpointToHost].Packets+1 {
					t.Fatal("global endpoint->host counter did not move")
				}
			} else {
				if after.HostToEp.Packets != before.HostToEp.Packets+1 || after.HostToEp.Bytes != before.HostToEp.Bytes+uint64(len(tc.frame)) {
					t.Fatalf("host_to_ep %+v -> %+v", before.HostToEp, after.HostToEp)
				}
				if g2[loader.StatHostToEndpoint].Packets != g[loader.StatHostToEndpoint].Packets+1 {
					t.Fatal("global host->endpoint counter did not move")
				}
			}
		})
	}
}

func TestPassThrough(t *testing.T) {
	r := newRig(t)
	for _, tc := range []struct {
		name  string
		frame []byte
	}{
		{"endpoint to wire", icmpEcho(t, macA, macGW, ipA, ipRemote)},
		{"endpoint to endpoint (vepa)", icmpEcho(t, macA, macB, ipA, ipB)},
		{"host to wire", icmpEcho(t, macParent, macGW, ipHost, ipRemote)},
		{"wire-bound from unknown MAC", icmpEcho(t, macWire, macGW, ipRemote, ipGW)},
		{"broadcast IPv4", icmpEcho(t, macParent, macBcast, ipHost, netip.MustParseAddr("192.0.2.255"))},
		{"VLAN-tagged to endpoint MAC", vlanTagged(t, macParent, macA, ipHost, ipA)},
		{"host to non-service 10.97 address", icmpEcho(t, macParent, macGW, ipHost, netip.MustParseAddr("10.97.0.1"))},
		{"host to live VIP (not DNATed)", tcpSYN(t, macParent, macGW, ipHost, vipLive, "S")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			wantPass(t, r.parent(t, tc.frame), tc.frame)
		})
	}
}

func TestNotAParent(t *testing.T) {
	r := newRig(t)
	must(t, datapath.DeleteParent(&r.dp.Maps, parentIfindex))
	for _, f := range [][]byte{
		icmpEcho(t, macParent, macA, ipHost, ipA),
		tcpSYN(t, macA, macGW, ipA, vipStale, "S"),
	} {
		wantPass(t, r.parent(t, f), f)
	}
}

func TestResolutionClones(t *testing.T) {
	r := newRig(t)
	for _, tc := range []struct {
		name  string
		frame []byte
		clone bool
		stat  loader.Stat
	}{
		{"host asks for endpoint", arp(t, layers.ARPRequest, macParent, macBcast, macParent, ipHost, ipA), true, loader.StatARPCloned},
		{"endpoint asks for host", arp(t, layers.ARPRequest, macA, macBcast, macA, ipA, ipHost), true, loader.StatARPCloned},
		{"endpoint asks for endpoint", arp(t, layers.ARPRequest, macA, macBcast, macA, ipA, ipB), false, 0},
		{"host asks for gateway", arp(t, layers.ARPRequest, macParent, macBcast, macParent, ipHost, ipGW), false, 0},
		{"endpoint asks for gateway", arp(t, layers.ARPRequest, macA, macBcast, macA, ipA, ipGW), false, 0},
		{"endpoint gratuitous ARP", arp(t, layers.ARPRequest, macA, macBcast, macA, ipA, ipA), false, 0},
		{"host solicits endpoint", neighborSolicitation(t, macParent, ipHost6, ipA6), true, loader.StatNDCloned},
		{"endpoint solicits host", neighborSolicitation(t, macA, ipA6, ipHost6), true, loader.StatNDCloned},
		{"endpoint DAD", neighborSolicitation(t, macA, netip.IPv6Unspecified(), ipA6), false, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := r.stats(t)
			res := r.parent(t, tc.frame)
			if res.verdict != actPass {
				t.Fatalf("verdict %d: the original must go on to the wire", res.verdict)
			}
			cloned := res.trace.Kind == uint32(loader.TraceClone)
			if cloned != tc.clone {
				t.Fatalf("cloned=%v, want %v (trace %+v)", cloned, tc.clone, res.trace)
			}
			if !tc.clone {
				return
			}
			if res.trace.Ifindex != parentIfindex || res.trace.Flags != bpfFIngress {
				t.Fatalf("clone went to %+v", res.trace)
			}
			if res.mark != 0xbeef {
				t.Fatalf("original lost its mark: %#x", res.mark)
			}
			if got := r.stats(t)[tc.stat].Packets; got != before[tc.stat].Packets+1 {
				t.Fatalf("clone counter %d -> %d", before[tc.stat].Packets, got)
			}
		})
	}
}

func TestSteering(t *testing.T) {
	r := newRig(t)
	for _, tc := range []struct {
		name  string
		frame []byte
		mark  uint32 // what the host's nftables sees: steered flows are masqueraded if forwarded
	}{
		{"live VIP v4", tcpSYN(t, macA, macGW, ipA, vipLive, "S"), loader.MarkSteered | loader.MarkService},
		{"live VIP v6", tcpSYN(t, macA, macGW, ipA6, vip6Live, "S"), loader.MarkSteered | loader.MarkService},
		{"hostCIDR", udp(t, macA, macGW, ipA, ipDNS), loader.MarkSteered},
		{"node address via gateway", icmpEcho(t, macA, macGW, ipA, ipHost), 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := r.stats(t)[loader.StatSteered].Packets
			res := r.parent(t, tc.frame)
			wantRedirectMarked(t, res, r.idA, tc.mark)
			want := append(append([]byte{}, macParent...), tc.frame[6:]...)
			if string(res.out[:len(tc.frame)]) != string(want) {
				t.Fatalf("steered frame: got % x, want dst MAC rewritten to the parent's and nothing else", res.out[:14])
			}
			if got := r.stats(t)[loader.StatSteered].Packets; got != before+1 {
				t.Fatalf("steered counter %d -> %d", before, got)
			}
		})
	}
	t.Run("set change is live", func(t *testing.T) {
		f := udp(t, macA, macGW, ipA, ipDNS)
		must(t, datapath.SyncHostCIDRs(&r.dp.Maps, datapath.HostSet{}))
		wantPass(t, r.parent(t, f), f)
		hosts := datapath.HostSet{}
		hosts.Add(netip.PrefixFrom(ipDNS, 32), loader.HostSteer)
		must(t, datapath.SyncHostCIDRs(&r.dp.Maps, hosts))
		wantSteered(t, r.parent(t, f), r.idA)
	})
}

func TestStaleDrop(t *testing.T) {
	r := newRig(t)
	for _, tc := range []struct {
		name  string
		frame []byte
	}{
		{"SYN v4", tcpSYN(t, macA, macGW, ipA, vipStale, "S")},
		{"UDP v4", udp(t, macA, macGW, ipA, vipStale)},
		{"ping v4", icmpEcho(t, macA, macGW, ipA, vipStale)},
		{"SYN v6", tcpSYN(t, macA, macGW, ipA6, vip6Stale, "S")},
		{"UDP v6", udp(t, macA, macGW, ipA6, vip6Stale)},
		{"to parent MAC", tcpSYN(t, macA, macParent, ipA, vipStale, "S")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := r.epStats(t, r.idA)
			d0, _ := datapath.Drops(&r.dp.Maps)
			res := r.parent(t, tc.frame)
			if res.verdict != actShot {
				t.Fatalf("verdict %d, want drop", res.verdict)
			}
			after := r.epStats(t, r.idA)
			if after.StaleDropped != before.StaleDropped+1 || after.Drops[loader.DropStaleService] != before.Drops[loader.DropStaleService]+1 {
				t.Fatalf("endpoint counters did not name the client: %+v", after)
			}
			d1, _ := datapath.Drops(&r.dp.Maps)
			if d1[loader.DropStaleService].Packets != d0[loader.DropStaleService].Packets+1 {
				t.Fatal("global stale_service drop counter did not move")
			}
		})
	}
	t.Run("host-originated is attributed to nobody but dropped", func(t *testing.T) {
		f := tcpSYN(t, macParent, macGW, ipHost, vipStale, "S")
		if res := r.parent(t, f); res.verdict != actShot {
			t.Fatalf("verdict %d", res.verdict)
		}
	})
	t.Run("VIP becomes live", func(t *testing.T) {
		f := tcpSYN(t, macA, macGW, ipA, vipStale, "S")
		must(t, datapath.AddLiveService(&r.dp.Maps, vipStale))
		wantSteered(t, r.parent(t, f), r.idA)
		must(t, datapath.DeleteLiveService(&r.dp.Maps, vipStale))
		if res := r.parent(t, f); res.verdict != actShot {
			t.Fatalf("deleted VIP: verdict %d, want drop", res.verdict)
		}
	})
}

func TestStaleReject(t *testing.T) {
	r := newRig(t)
	r.setConfig(t, datapath.Config{ServicesSynced: true, HostReachable: true, StaleReject: true})

	for _, tc := range []struct {
		name     string
		src, dst netip.Addr
	}{
		{"v4", ipA, vipStale},
		{"v6", ipA6, vip6Stale},
	} {
		t.Run("SYN "+tc.name, func(t *testing.T) {
			syn := tcpSYN(t, macA, macGW, tc.src, tc.dst, "S")
			before := r.epStats(t, r.idA)
			res := r.parent(t, syn)
			wantRedirect(t, res, r.idA)
			pkt := gopacket.NewPacket(res.out, layers.LayerTypeEthernet, gopacket.Default)
			e := pkt.Layer(layers.LayerTypeEthernet).(*layers.Ethernet)
			if e.DstMAC.String() != macA.String() || e.SrcMAC.String() != macGW.String() {
				t.Fatalf("RST addressed %s -> %s, want back to the client", e.SrcMAC, e.DstMAC)
			}
			tcpL, ok := pkt.Layer(layers.LayerTypeTCP).(*layers.TCP)
			if !ok {
				t.Fatalf("no TCP in answer: %v", pkt)
			}
			if !tcpL.RST || !tcpL.ACK || tcpL.SYN || tcpL.Ack != 1001 || tcpL.SrcPort != 443 || tcpL.DstPort != 40000 {
				t.Fatalf("bad RST: %+v", tcpL)
			}
			var src, dst netip.Addr
			var l3len int
			if tc.src.Is4() {
				ip := pkt.Layer(layers.LayerTypeIPv4).(*layers.IPv4)
				src, _ = netip.AddrFromSlice(ip.SrcIP)
				dst, _ = netip.AddrFromSlice(ip.DstIP)
				if inetChecksum(res.out[14:34]) != 0 {
					t.Fatal("IPv4 header checksum is wrong")
				}
				l3len = int(ip.Length) - 20
				if len(res.out) != 14+40 {
					t.Fatalf("answer is %d bytes, want 54", len(res.out))
				}
			} else {
				ip := pkt.Layer(layers.LayerTypeIPv6).(*layers.IPv6)
				src, _ = netip.AddrFromSlice(ip.SrcIP)
				dst, _ = netip.AddrFromSlice(ip.DstIP)
				l3len = int(ip.Length)
			}
			if src != tc.dst || dst != tc.src {
				t.Fatalf("RST %s -> %s, want from the VIP to the client", src, dst)
			}
			seg := res.out[len(res.out)-l3len:]
			if c := inetChecksum(pseudoHeader(src, dst, 6, l3len), seg); c != 0 {
				t.Fatalf("TCP checksum is wrong (residue %#x)", c)
			}
			after := r.epStats(t, r.idA)
			if after.StaleRejected != before.StaleRejected+1 {
				t.Fatal("stale_rejected did not move")
			}
		})
		t.Run("UDP "+tc.name, func(t *testing.T) {
			dgram := udp(t, macA, macGW, tc.src, tc.dst)
			res := r.parent(t, dgram)
			wantRedirect(t, res, r.idA)
			pkt := gopacket.NewPacket(res.out, layers.LayerTypeEthernet, gopacket.Default)
			if tc.src.Is4() {
				ip := pkt.Layer(layers.LayerTypeIPv4).(*layers.IPv4)
				ic, ok := pkt.Layer(layers.LayerTypeICMPv4).(*layers.ICMPv4)
				if !ok || ic.TypeCode != layers.CreateICMPv4TypeCode(3, 3) {
					t.Fatalf("want ICMP port unreachable, got %v", pkt)
				}
				if netip.MustParseAddr(ip.SrcIP.String()) != tc.dst || netip.MustParseAddr(ip.DstIP.String()) != tc.src {
					t.Fatalf("ICMP %s -> %s", ip.SrcIP, ip.DstIP)
				}
				if inetChecksum(res.out[14:34]) != 0 || inetChecksum(res.out[34:]) != 0 {
					t.Fatal("bad checksum in ICMP answer")
				}
				// The quoted header is the original datagram's.
				if string(res.out[42:70]) != string(dgram[14:42]) {
					t.Fatal("ICMP does not quote the original IP header + 8 bytes")
				}
			} else {
				ic, ok := pkt.Layer(layers.LayerTypeICMPv6).(*layers.ICMPv6)
				if !ok || ic.TypeCode != layers.CreateICMPv6TypeCode(1, 4) {
					t.Fatalf("want ICMPv6 port unreachable, got %v", pkt)
				}
				body := res.out[54:]
				if c := inetChecksum(pseudoHeader(tc.dst, tc.src, 58, len(body)), body); c != 0 {
					t.Fatalf("ICMPv6 checksum is wrong (%#x)", c)
				}
				if string(res.out[62:110]) != string(dgram[14:62]) {
					t.Fatal("ICMPv6 does not quote the original header + 8 bytes")
				}
			}
		})
	}
	t.Run("non-SYN TCP is dropped", func(t *testing.T) {
		if res := r.parent(t, tcpSYN(t, macA, macGW, ipA, vipStale, "A")); res.verdict != actShot {
			t.Fatalf("verdict %d", res.verdict)
		}
	})
	t.Run("ping is dropped", func(t *testing.T) {
		if res := r.parent(t, icmpEcho(t, macA, macGW, ipA, vipStale)); res.verdict != actShot {
			t.Fatalf("verdict %d", res.verdict)
		}
	})
	t.Run("live VIP still steered", func(t *testing.T) {
		wantSteered(t, r.parent(t, tcpSYN(t, macA, macGW, ipA, vipLive, "S")), r.idA)
	})
}

// hostReachability: false cuts the host's own traffic with endpoints both
// ways; Services, steered host CIDRs and resolution keep working.
func TestHostReachabilityOff(t *testing.T) {
	r := newRig(t)
	r.setConfig(t, datapath.Config{ServicesSynced: true, HostReachable: false})
	for _, f := range [][]byte{
		icmpEcho(t, macParent, macA, ipHost, ipA),
		icmpEcho(t, macA, macParent, ipA, ipHost),
	} {
		before := r.epStats(t, r.idA)
		if res := r.parent(t, f); res.verdict != actShot {
			t.Fatalf("verdict %d, want drop", res.verdict)
		}
		if r.epStats(t, r.idA).Drops[loader.DropHostUnreachable] != before.Drops[loader.DropHostUnreachable]+1 {
			t.Fatal("host_unreachable not counted")
		}
	}
	// Services and steered host CIDRs are not host reachability.
	wantSteered(t, r.parent(t, tcpSYN(t, macA, macGW, ipA, vipLive, "S")), r.idA)
	wantSteered(t, r.parent(t, udp(t, macA, macGW, ipA, ipDNS)), r.idA)
	// Nor is resolution: the host must resolve a Service's backend pod.
	f := arp(t, layers.ARPRequest, macParent, macBcast, macParent, ipHost, ipA)
	if res := r.parent(t, f); res.verdict != actPass || res.trace.Kind != uint32(loader.TraceClone) {
		t.Fatalf("ARP with the host blocked: %+v", res)
	}
	// The wire is unaffected.
	f = icmpEcho(t, macA, macGW, ipA, ipRemote)
	wantPass(t, r.parent(t, f), f)
	// Stale VIPs are still dropped as stale.
	if res := r.parent(t, tcpSYN(t, macA, macGW, ipA, vipStale, "S")); res.verdict != actShot {
		t.Fatal("stale VIP passed with the host blocked")
	}

	r.setConfig(t, datapath.Config{ServicesSynced: true, HostReachable: true})
	wantRedirect(t, r.parent(t, icmpEcho(t, macParent, macA, ipHost, ipA)), r.idA)
}

// With hostReachability: false a Service flow that the host DNATs (or
// IPVS forwards) to a backend pod and masquerades reaches the backend as
// traffic from the host's address, and the backend answers that address.
// Both must pass, and only for that flow: the backend still cannot reach
// the host on its own.
func TestHostReachabilityOffKeepsServiceReplies(t *testing.T) {
	for _, tc := range []struct {
		name  string
		proto layers.IPProtocol
		host  netip.Addr
		pod   netip.Addr
	}{
		{"tcp", layers.IPProtocolTCP, ipHost, ipA},
		{"udp", layers.IPProtocolUDP, ipHost, ipA},
		{"sctp", layers.IPProtocolSCTP, ipHost, ipA},
		{"tcp6", layers.IPProtocolTCP, ipHost6, ipA6},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRig(t)
			r.setConfig(t, datapath.Config{ServicesSynced: true, HostReachable: false})
			masq := netip.AddrPortFrom(tc.host, 40000) // the host's masqueraded source
			backend := netip.AddrPortFrom(tc.pod, 8080)
			reply := segment(t, macA, macParent, backend, masq, tc.proto)

			wantHostUnreachable := func(what string, f []byte) {
				t.Helper()
				before := r.epStats(t, r.idA).Drops[loader.DropHostUnreachable]
				if res := r.parent(t, f); res.verdict != actShot {
					t.Fatalf("%s: verdict %d, want drop", what, res.verdict)
				}
				if r.epStats(t, r.idA).Drops[loader.DropHostUnreachable] != before+1 {
					t.Fatalf("%s: host_unreachable not counted", what)
				}
			}
			wantHostUnreachable("a reply before any flow", reply)

			// The host's own frame, even with the Service mark (a process
			// with SO_MARK), is not a forwarded flow.
			r.mark = loader.MarkSteered
			wantHostUnreachable("the host's own marked frame", segment(t, macParent, macA, masq, backend, tc.proto))

			// Forwarded and marked: kube-proxy's translation of a steered
			// flow, masqueraded (kube-proxy's own mark bit set too).
			r.ingress, r.mark = parentIfindex, loader.MarkSteered|0x4000
			wantRedirect(t, r.parent(t, segment(t, macParent, macA, masq, backend, tc.proto)), r.idA)
			r.ingress, r.mark = 0, 0
			before := r.epStats(t, r.idA)
			wantRedirect(t, r.parent(t, reply), r.idA)
			if got := r.epStats(t, r.idA).EpToHost.Packets; got != before.EpToHost.Packets+1 {
				t.Fatalf("the reply was not counted as endpoint -> host (%d, was %d)", got, before.EpToHost.Packets)
			}

			// Only that flow: another port of the host, or the same port
			// from another of the pod's ports, is still cut.
			wantHostUnreachable("another host port", segment(t, macA, macParent, backend, netip.AddrPortFrom(tc.host, 40001), tc.proto))
			wantHostUnreachable("another pod port", segment(t, macA, macParent, netip.AddrPortFrom(tc.pod, 8081), masq, tc.proto))

			// Forwarded but unmarked (routed from the wire, not a steered
			// Service flow): it passes as before, and opens nothing.
			r.ingress = parentIfindex
			other := netip.AddrPortFrom(tc.host, 40002)
			wantRedirect(t, r.parent(t, segment(t, macParent, macA, other, backend, tc.proto)), r.idA)
			r.ingress = 0
			wantHostUnreachable("a reply to an unmarked forwarded flow", segment(t, macA, macParent, backend, other, tc.proto))
		})
	}
}

func TestUplinkGuard(t *testing.T) {
	r := newRig(t)
	prog := r.dp.Programs.UplinkEgress
	for _, f := range [][]byte{
		icmpEcho(t, macParent, macGW, ipHost, ipRemote),
		tcpSYN(t, macParent, macGW, ipHost, vipLive, "S"),
		arp(t, layers.ARPRequest, macParent, macBcast, macParent, ipHost, ipA),
	} {
		wantPass(t, r.run(t, prog, f), f)
	}
	before := r.epStats(t, r.idA)
	// Forwarded by the host from pod A: it came in on A's parent.
	r.ingress = parentIfindex
	if res := r.run(t, prog, tcpSYN(t, macParent, macGW, ipA, vipStale, "S")); res.verdict != actShot {
		t.Fatalf("stale VIP on uplink: verdict %d", res.verdict)
	}
	r.ingress = 0
	if r.epStats(t, r.idA).StaleDropped != before.StaleDropped+1 {
		t.Fatal("forwarded pod traffic not attributed to the pod")
	}
	r.setConfig(t, datapath.Config{ServicesSynced: true, HostReachable: true, StaleReject: true})
	res := r.run(t, prog, tcpSYN(t, macParent, macGW, ipHost, vipStale, "S"))
	wantRedirect(t, res, 0)
	if got := res.out[0:6]; string(got) != string(macParent) {
		t.Fatalf("RST on uplink goes to %x, want the host's own MAC", got)
	}
}

// Truncated, garbage and mutated frames never crash, never redirect
// anywhere but the parent's own ingress, and never count for an endpoint
// that did not send or receive them.
func TestGarbage(t *testing.T) {
	r := newRig(t)
	r.setConfig(t, datapath.Config{ServicesSynced: true, HostReachable: true, StaleReject: true})
	seeds := [][]byte{
		icmpEcho(t, macParent, macA, ipHost, ipA),
		tcpSYN(t, macA, macGW, ipA, vipStale, "S"),
		udp(t, macA, macGW, ipA6, vip6Stale),
		arp(t, layers.ARPRequest, macParent, macBcast, macParent, ipHost, ipA),
		neighborSolicitation(t, macParent, ipHost6, ipA6),
	}
	rng := rand.New(rand.NewPCG(1, 2))
	ran, refused := 0, 0
	for i := 0; i < 3000; i++ {
		var f []byte
		switch i % 3 {
		case 0: // truncated
			s := seeds[rng.IntN(len(seeds))]
			f = append([]byte{}, s[:14+rng.IntN(len(s)-14)]...)
		case 1: // mutated
			s := seeds[rng.IntN(len(seeds))]
			f = append([]byte{}, s...)
			for j := 0; j < 1+rng.IntN(4); j++ {
				f[rng.IntN(len(f))] = byte(rng.Uint32())
			}
		default: // garbage
			f = make([]byte, 14+rng.IntN(200))
			for j := range f {
				f[j] = byte(rng.Uint32())
			}
		}
		for _, prog := range []*ebpf.Program{r.dp.Programs.ParentEgress, r.dp.Programs.UplinkEgress} {
			if r.runEgressAny(t, prog, f) {
				ran++
			} else {
				refused++
			}
		}
	}
	if ran < 5000 {
		t.Fatalf("only %d runs (%d refused by the kernel): the test lost its teeth", ran, refused)
	}
	t.Logf("%d runs, %d truncated frames refused by BPF_PROG_TEST_RUN", ran, refused)
}

// runEgressAny runs a parent or uplink egress program on any frame: it must
// pass, drop, or redirect only to the parent's own ingress, attributing the
// frame to no endpoint or a registered one. It returns false, and checks
// nothing, when the kernel's test run refused the frame: it refuses IP
// frames shorter than an IP header; on the wire they reach the program,
// which reads headers with bpf_skb_load_bytes and passes them.
func (r *rig) runEgressAny(tb testing.TB, prog *ebpf.Program, f []byte) bool {
	tb.Helper()
	res, err := r.tryRun(tb, prog, f)
	if errors.Is(err, unix.EINVAL) && truncatedL3(f) {
		return false
	}
	if err != nil {
		tb.Fatalf("run on % x: %v", f, err)
	}
	switch res.verdict {
	case actPass, actShot:
	case actRedirect:
		if res.trace.Ifindex != parentIfindex || res.trace.Flags != bpfFIngress {
			tb.Fatalf("frame % x redirected to %+v", f, res.trace)
		}
		if res.trace.EpId != 0 && res.trace.EpId != r.idA && res.trace.EpId != r.idB {
			tb.Fatalf("frame % x attributed to unknown endpoint %d", f, res.trace.EpId)
		}
	default:
		tb.Fatalf("frame % x: verdict %d", f, res.verdict)
	}
	return true
}

func truncatedL3(f []byte) bool {
	switch binary.BigEndian.Uint16(f[12:14]) {
	case 0x0800:
		return len(f) < 14+20
	case 0x86dd:
		return len(f) < 14+40
	}
	return false
}

func TestPinnedMapsHaveBTF(t *testing.T) {
	r := newRig(t)
	info, err := r.dp.Maps.Endpoints.Info()
	must(t, err)
	if _, ok := info.BTFID(); !ok {
		t.Fatal("endpoints map has no BTF: bpftool could not print field names")
	}
}
