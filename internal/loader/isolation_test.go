package loader_test

import (
	"encoding/binary"
	"net"
	"net/netip"
	"testing"

	"github.com/gopacket/gopacket/layers"

	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
)

// The isolation rules, frame by frame (see README "Isolation"): what a pod
// may send, checked at the parent where a pod that skipped its own egress
// hook (PACKET_QDISC_BYPASS, AF_XDP, tc filter del with NET_ADMIN) still
// passes, and at the receiving pod for what macvlan bridges between slaves.

var (
	linkLocalA  = netip.MustParseAddr("fe80::aa:ff:fe00:a") // EUI-64 of macA
	linkLocalGW = netip.MustParseAddr("fe80::1")
	slaacA      = netip.MustParseAddr("2001:db8:1::aaaa") // not from IPAM
)

func neighborAdvertFrom(tb testing.TB, smac net.HardwareAddr, src, target netip.Addr, tlla net.HardwareAddr) []byte {
	dst := netip.MustParseAddr("ff02::1")
	i6 := ip6(src, dst, layers.IPProtocolICMPv6)
	i6.HopLimit = 255
	ic := &layers.ICMPv6{TypeCode: layers.CreateICMPv6TypeCode(layers.ICMPv6TypeNeighborAdvertisement, 0)}
	ic.SetNetworkLayerForChecksum(i6)
	na := &layers.ICMPv6NeighborAdvertisement{Flags: 0x20, TargetAddress: target.AsSlice(),
		Options: layers.ICMPv6Options{{Type: layers.ICMPv6OptTargetAddress, Data: tlla}}}
	return serialize(tb, eth(smac, net.HardwareAddr{0x33, 0x33, 0, 0, 0, 1}, layers.EthernetTypeIPv6), i6, ic, na)
}

func routerAdvert(tb testing.TB, smac net.HardwareAddr, src netip.Addr) []byte {
	i6 := ip6(src, netip.MustParseAddr("ff02::1"), layers.IPProtocolICMPv6)
	i6.HopLimit = 255
	ic := &layers.ICMPv6{TypeCode: layers.CreateICMPv6TypeCode(layers.ICMPv6TypeRouterAdvertisement, 0)}
	ic.SetNetworkLayerForChecksum(i6)
	ra := &layers.ICMPv6RouterAdvertisement{HopLimit: 64, RouterLifetime: 1800}
	return serialize(tb, eth(smac, net.HardwareAddr{0x33, 0x33, 0, 0, 0, 1}, layers.EthernetTypeIPv6), i6, ic, ra)
}

// arpHW is an ARP request with another hardware type (6: IEEE 802).
func arpHW(tb testing.TB, smac net.HardwareAddr, spa, tpa netip.Addr) []byte {
	f := arp(tb, layers.ARPRequest, smac, macBcast, smac, spa, tpa)
	f[14], f[15] = 0, 6
	return f
}

// wantDrop runs frame through the parent program and checks it was dropped
// and counted for endpoint id under reason.
func (r *rig) wantDrop(tb testing.TB, frame []byte, id uint32, reason loader.DropReason) {
	tb.Helper()
	before := r.epStats(tb, id)
	if res := r.parent(tb, frame); res.verdict != actShot {
		tb.Fatalf("verdict %d, want drop (%s)", res.verdict, reason)
	}
	if d := r.epStats(tb, id).Drops[reason] - before.Drops[reason]; d != 1 {
		tb.Fatalf("%s drops of endpoint %d moved by %d, want 1", reason, id, d)
	}
}

// A pod that skipped its own egress hook is vetted at the parent.
func TestParentVetsEndpointFrames(t *testing.T) {
	r := newRig(t)
	for _, tc := range []struct {
		name   string
		frame  []byte
		reason loader.DropReason
	}{
		{"another endpoint's IPv4", icmpEcho(t, macA, macGW, ipB, ipRemote), loader.DropSpoofedSource},
		{"the host's IPv6", icmpEcho(t, macA, macGW, ipHost6, ipRemote6), loader.DropSpoofedSource},
		{"the router's link-local", icmpEcho(t, macA, macGW, linkLocalGW, ipRemote6), loader.DropSpoofedSource},
		{"an unlearnt SLAAC address", icmpEcho(t, macA, macGW, slaacA, ipRemote6), loader.DropSpoofedSource},
		{"ARP with another sender MAC", arp(t, layers.ARPReply, macA, macGW, macB, ipA, ipGW), loader.DropSpoofedSource},
		{"ARP claiming another endpoint's address", arp(t, layers.ARPReply, macA, macGW, macA, ipB, ipGW), loader.DropSpoofedSource},
		{"ARP for IEEE 802 hardware", arpHW(t, macA, ipB, ipGW), loader.DropUnvetted},
		{"802.1Q tag around another address", vlanTagged(t, macA, macGW, ipB, ipRemote), loader.DropUnvetted},
		{"NA for an address it does not own", neighborAdvertFrom(t, macA, linkLocalA, netip.MustParseAddr("2001:db8:1::11"), macA), loader.DropSpoofedSource},
		{"NA override pointing at another MAC", neighborAdvertFrom(t, macA, linkLocalA, ipA6, macB), loader.DropSpoofedSource},
		{"a router advertisement", routerAdvert(t, macA, linkLocalA), loader.DropUnvetted},
		// It would fail B's own conflict detection (RFC 5227).
		{"ARP probe for another endpoint's address", arp(t, layers.ARPRequest, macA, macBcast, macA, netip.IPv4Unspecified(), ipB), loader.DropSpoofedSource},
		// RFC 7113: ND hidden behind more extension headers than the
		// parser walks.
		{"a router advertisement behind 5 extension headers", behindExtHeaders(t, routerAdvert(t, macA, linkLocalA), 5), loader.DropUnvetted},
		{"an NA for the router behind 5 extension headers", behindExtHeaders(t, neighborAdvertFrom(t, macA, linkLocalA, linkLocalGW, macA), 5), loader.DropUnvetted},
		// A first fragment that ends before its ICMPv6 header: the rest,
		// in the next fragment, could be an RA.
		{"a first fragment cut before its ICMPv6 header", firstFragmentOnly(t, macA, linkLocalA), loader.DropUnvetted},
	} {
		t.Run(tc.name, func(t *testing.T) { r.wantDrop(t, tc.frame, r.idA, tc.reason) })
	}
	for _, tc := range []struct {
		name  string
		frame []byte
	}{
		{"own IPv4", icmpEcho(t, macA, macGW, ipA, ipRemote)},
		{"own EUI-64 link-local", icmpEcho(t, macA, macGW, linkLocalA, linkLocalGW)},
		// What the kernel gives a slave with a dev_id (ipvlan slaves
		// sharing a MAC): dev_id 1 in the middle, and the universal/local
		// bit NOT flipped (addrconf_ifid_eui48). The strict source check
		// dropped these as spoofed_source until it knew that.
		{"own dev_id link-local", icmpEcho(t, macA, macGW, netip.MustParseAddr("fe80::2aa:0:100:a"), linkLocalGW)},
		{"own NA", neighborAdvertFrom(t, macA, linkLocalA, ipA6, macA)},
		{"ARP probe", arp(t, layers.ARPRequest, macA, macBcast, macA, netip.IPv4Unspecified(), netip.MustParseAddr("192.0.2.77"))},
		{"ARP probe for its own address", arp(t, layers.ARPRequest, macA, macBcast, macA, netip.IPv4Unspecified(), ipA)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if res := r.parent(t, tc.frame); res.verdict == actShot {
				t.Fatalf("own frame dropped")
			}
		})
	}
}

// The node routes nothing for a pod: a frame to the parent's MAC for an
// address that is not the host's, steered or a Service is dropped.
func TestNodeIsNotARouter(t *testing.T) {
	r := newRig(t)
	r.wantDrop(t, icmpEcho(t, macA, macParent, ipA, ipRemote), r.idA, loader.DropRouted)
	r.wantDrop(t, icmpEcho(t, macA, macParent, ipA6, ipRemote6), r.idA, loader.DropRouted)
	wantRedirect(t, r.parent(t, icmpEcho(t, macA, macParent, ipA, ipHost)), r.idA)
	wantRedirect(t, r.parent(t, icmpEcho(t, macA, macParent, linkLocalA, linkLocalGW)), r.idA)
	wantSteered(t, r.parent(t, tcpSYN(t, macA, macParent, ipA, vipLive, "S")), r.idA)
	wantRedirect(t, r.parent(t, arp(t, layers.ARPReply, macA, macParent, macA, ipA, ipHost)), r.idA)
}

// SLAAC and privacy addresses are learnt from the pod's DAD, never one that
// someone else holds, and given up when the wire defends it.
func TestLearnFromDAD(t *testing.T) {
	r := newRig(t)
	m := &r.dp.Maps
	r.wantDrop(t, icmpEcho(t, macA, macGW, slaacA, ipRemote6), r.idA, loader.DropSpoofedSource)

	if res := r.parent(t, neighborSolicitation(t, macA, netip.IPv6Unspecified(), slaacA)); res.verdict == actShot {
		t.Fatal("DAD dropped")
	}
	if res := r.parent(t, icmpEcho(t, macA, macGW, slaacA, ipRemote6)); res.verdict == actShot {
		t.Fatal("traffic from the learnt address dropped")
	}
	ep, err := datapath.Lookup(m, r.idA)
	must(t, err)
	if got := datapath.LearnedAddrs(m, &ep); len(got) != 1 || got[0] != slaacA {
		t.Fatalf("learnt %v, want [%s]", got, slaacA)
	}
	// A's DAD for its own assigned address goes (its kernel runs it).
	if res := r.parent(t, neighborSolicitation(t, macA, netip.IPv6Unspecified(), ipA6)); res.verdict == actShot {
		t.Fatal("DAD for the pod's own address dropped")
	}
	// Pod B's DAD for A's addresses, learnt or assigned: dropped, as it
	// would fail A's own DAD for them (a pod squatting on the address IPAM
	// hands out next). Not learnt either.
	// A's EUI-64 SLAAC address under the router's prefix, which B can
	// work out from A's MAC before A's own DAD: refused too.
	eui64A := netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, linkLocalA.As16()[8], linkLocalA.As16()[9], linkLocalA.As16()[10], 0xff, 0xfe, linkLocalA.As16()[13], linkLocalA.As16()[14], linkLocalA.As16()[15]})
	for _, target := range []netip.Addr{slaacA, ipA6, linkLocalA, eui64A} {
		r.wantDrop(t, neighborSolicitation(t, macB, netip.IPv6Unspecified(), target), r.idB, loader.DropSpoofedSource)
		r.wantDrop(t, icmpEcho(t, macB, macGW, target, ipRemote6), r.idB, loader.DropSpoofedSource)
	}
	// A DAD for an IPv4-mapped or -compatible address (IPv4 addresses
	// share their keys): dropped, never learnt, so the pod does not get
	// the gateway's IPv4 address (and ARP for it) this way.
	for _, target := range []netip.Addr{netip.AddrFrom16(ipGW.As16()), netip.MustParseAddr("::c000:201"), netip.IPv6Loopback()} {
		r.wantDrop(t, neighborSolicitation(t, macB, netip.IPv6Unspecified(), target), r.idB, loader.DropSpoofedSource)
	}
	r.wantDrop(t, icmpEcho(t, macB, macGW, ipGW, ipRemote), r.idB, loader.DropSpoofedSource)
	r.wantDrop(t, arp(t, layers.ARPReply, macB, macBcast, macB, ipGW, ipGW), r.idB, loader.DropSpoofedSource)
	// B's DAD for the host's address or a Service's: not learnt.
	for _, target := range []netip.Addr{ipHost6, vip6Live} {
		r.parent(t, neighborSolicitation(t, macB, netip.IPv6Unspecified(), target))
		r.wantDrop(t, icmpEcho(t, macB, macGW, target, ipRemote6), r.idB, loader.DropSpoofedSource)
	}
	// The router's link-local, once seen on the wire, is never learnt.
	r.xdp(t, routerAdvert(t, macGW, linkLocalGW))
	r.parent(t, neighborSolicitation(t, macB, netip.IPv6Unspecified(), linkLocalGW))
	r.wantDrop(t, icmpEcho(t, macB, macGW, linkLocalGW, ipRemote6), r.idB, loader.DropSpoofedSource)

	// Someone on the wire defends A's learnt address: A gives it up.
	r.xdp(t, neighborAdvert(t, macWire, slaacA))
	if got := r.stats(t)[loader.StatUnlearned].Packets; got != 1 {
		t.Fatalf("unlearned %d, want 1", got)
	}
	r.wantDrop(t, icmpEcho(t, macA, macGW, slaacA, ipRemote6), r.idA, loader.DropSpoofedSource)

	// DEL removes what was learnt.
	r.parent(t, neighborSolicitation(t, macA, netip.IPv6Unspecified(), netip.MustParseAddr("2001:db8:1::bbbb")))
	must(t, datapath.Unregister(m, r.idA))
	k := datapath.EpIPKey(netip.MustParseAddr("2001:db8:1::bbbb"), parentIfindex)
	var ref loader.EndpointRef
	if err := m.EpByIp.Lookup(&k, &ref); err == nil {
		t.Fatalf("learnt address left behind after unregister: %+v", ref)
	}
}

// On a fresh datapath (node reboot) nothing is stale until the agent has
// synced the live set once: traffic in a service CIDR goes to the host.
func TestGuardBeforeFirstSync(t *testing.T) {
	r := newRig(t)
	r.setConfig(t, datapath.Config{HostReachable: true, StaleReject: true})
	wantSteered(t, r.parent(t, tcpSYN(t, macA, macGW, ipA, vipStale, "S")), r.idA)
	wantPass(t, r.run(t, r.dp.Programs.UplinkEgress, tcpSYN(t, macParent, macGW, ipHost, vipStale, "S")),
		tcpSYN(t, macParent, macGW, ipHost, vipStale, "S"))
	r.setConfig(t, datapath.Config{ServicesSynced: true, HostReachable: true})
	if res := r.parent(t, tcpSYN(t, macA, macGW, ipA, vipStale, "S")); res.verdict != actShot {
		t.Fatalf("synced: verdict %d, want drop", res.verdict)
	}
}

// A pod's broadcast request for the host goes in as a unicast to the
// parent's MAC: macvlan hands that to the host alone (as a broadcast, a
// private slave's copy came back to itself only).
func TestResolutionForTheHostIsUnicast(t *testing.T) {
	r := newRig(t)
	f := arp(t, layers.ARPRequest, macA, macBcast, macA, ipA, ipHost)
	res := r.parent(t, f)
	if res.verdict != actPass || res.trace.Kind != uint32(loader.TraceClone) {
		t.Fatalf("request for the host: %+v, want a clone and the original on", res)
	}
	if string(res.out[:6]) != string(macBcast) {
		t.Fatalf("the original's destination became %x", res.out[:6])
	}
}

// behindExtHeaders puts n Destination Options headers (PadN only) between
// the IPv6 header of frame and what it carries; the upper-layer checksum
// stays valid (its pseudo header does not change).
func behindExtHeaders(tb testing.TB, frame []byte, n int) []byte {
	tb.Helper()
	const l2, l3 = 14, 40
	if len(frame) < l2+l3 || frame[l2]>>4 != 6 {
		tb.Fatal("behindExtHeaders: not an IPv6 frame")
	}
	upper := frame[l2+6]
	out := append([]byte{}, frame[:l2+l3]...)
	out[l2+6] = 60 // Destination Options
	for i := range n {
		next := byte(60)
		if i == n-1 {
			next = upper
		}
		out = append(out, next, 0, 1, 4, 0, 0, 0, 0) // PadN of 4 bytes
	}
	out = append(out, frame[l2+l3:]...)
	binary.BigEndian.PutUint16(out[l2+4:], uint16(len(out)-l2-l3))
	return out
}

// firstFragmentOnly is the first fragment of an ICMPv6 message from src
// that holds nothing past its fragment header (more fragments follow).
func firstFragmentOnly(tb testing.TB, smac net.HardwareAddr, src netip.Addr) []byte {
	tb.Helper()
	f := routerAdvert(tb, smac, src)
	const l2, l3 = 14, 40
	out := append([]byte{}, f[:l2+l3]...)
	out[l2+6] = 44                                   // Fragment
	out = append(out, 58, 0, 0, 1, 0, 0, 0x12, 0x34) // next ICMPv6, offset 0, M=1, id
	binary.BigEndian.PutUint16(out[l2+4:], 8)
	return out
}
