package loader_test

import (
	"encoding/binary"
	"net"
	"net/netip"
	"testing"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"

	"github.com/underpass-cni/underpass/internal/testutil"
	"github.com/underpass-cni/underpass/test/netenv"
)

// Frame builders and checkers for the program tests.

var (
	macParent = testutil.MACParent
	macGW     = net.HardwareAddr{0x02, 0, 0, 0, 0, 0xfe}
	macA      = testutil.MACA
	macB      = testutil.MACB
	macWire   = testutil.MACWire
	macBcast  = testutil.MACBcast

	ipHost   = testutil.IPHost
	ipHost6  = netip.MustParseAddr("2001:db8:1::2")
	ipA      = testutil.IPA
	ipA6     = testutil.IPA6
	ipB      = testutil.IPB
	ipGW     = netip.MustParseAddr("192.0.2.1")
	ipRemote = netip.MustParseAddr("198.51.100.7")
	ipDNS    = netip.MustParseAddr("169.254.20.10")

	// The labs' Services (test/netenv): a live and a stale VIP of each family.
	vipLive   = netenv.LiveVIP4
	vipStale  = netenv.StaleVIP4
	vip6Live  = netenv.LiveVIP6
	vip6Stale = netenv.StaleVIP6
)

// serialize builds a frame for a test run (testutil.Frame).
var serialize = testutil.Frame

func eth(src, dst net.HardwareAddr, t layers.EthernetType) *layers.Ethernet {
	return &layers.Ethernet{SrcMAC: src, DstMAC: dst, EthernetType: t}
}

func ip4(src, dst netip.Addr, proto layers.IPProtocol) *layers.IPv4 {
	return &layers.IPv4{Version: 4, IHL: 5, TTL: 64, Protocol: proto, SrcIP: src.AsSlice(), DstIP: dst.AsSlice()}
}

func ip6(src, dst netip.Addr, next layers.IPProtocol) *layers.IPv6 {
	return &layers.IPv6{Version: 6, HopLimit: 64, NextHeader: next, SrcIP: src.AsSlice(), DstIP: dst.AsSlice()}
}

// icmpEcho is an IPv4 or IPv6 ping from (smac, src) to (dmac, dst).
func icmpEcho(tb testing.TB, smac, dmac net.HardwareAddr, src, dst netip.Addr) []byte {
	payload := gopacket.Payload([]byte("underpass-test-payload"))
	if src.Is4() {
		return serialize(tb, eth(smac, dmac, layers.EthernetTypeIPv4), ip4(src, dst, layers.IPProtocolICMPv4),
			&layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(layers.ICMPv4TypeEchoRequest, 0), Id: 1, Seq: 1}, payload)
	}
	i6 := ip6(src, dst, layers.IPProtocolICMPv6)
	ic := &layers.ICMPv6{TypeCode: layers.CreateICMPv6TypeCode(layers.ICMPv6TypeEchoRequest, 0)}
	ic.SetNetworkLayerForChecksum(i6)
	return serialize(tb, eth(smac, dmac, layers.EthernetTypeIPv6), i6, ic, &layers.ICMPv6Echo{Identifier: 1, SeqNumber: 1}, payload)
}

func tcpSYN(tb testing.TB, smac, dmac net.HardwareAddr, src, dst netip.Addr, flags string) []byte {
	tcp := &layers.TCP{SrcPort: 40000, DstPort: 443, Seq: 1000, Window: 64240,
		Options: []layers.TCPOption{{OptionType: layers.TCPOptionKindMSS, OptionLength: 4, OptionData: []byte{0x05, 0xb4}}}}
	for _, f := range flags {
		switch f {
		case 'S':
			tcp.SYN = true
		case 'A':
			tcp.ACK = true
		}
	}
	if src.Is4() {
		i4 := ip4(src, dst, layers.IPProtocolTCP)
		tcp.SetNetworkLayerForChecksum(i4)
		return serialize(tb, eth(smac, dmac, layers.EthernetTypeIPv4), i4, tcp)
	}
	i6 := ip6(src, dst, layers.IPProtocolTCP)
	tcp.SetNetworkLayerForChecksum(i6)
	return serialize(tb, eth(smac, dmac, layers.EthernetTypeIPv6), i6, tcp)
}

// segment is a TCP SYN, a UDP datagram or an SCTP INIT between two ports.
func segment(tb testing.TB, smac, dmac net.HardwareAddr, src, dst netip.AddrPort, proto layers.IPProtocol) []byte {
	var l4 gopacket.SerializableLayer
	var ck interface {
		SetNetworkLayerForChecksum(gopacket.NetworkLayer) error
	}
	switch proto {
	case layers.IPProtocolTCP:
		t := &layers.TCP{SrcPort: layers.TCPPort(src.Port()), DstPort: layers.TCPPort(dst.Port()), Seq: 1, SYN: true, Window: 64240}
		l4, ck = t, t
	case layers.IPProtocolUDP:
		u := &layers.UDP{SrcPort: layers.UDPPort(src.Port()), DstPort: layers.UDPPort(dst.Port())}
		l4, ck = u, u
	case layers.IPProtocolSCTP:
		l4 = &layers.SCTP{SrcPort: layers.SCTPPort(src.Port()), DstPort: layers.SCTPPort(dst.Port()), VerificationTag: 0}
	default:
		tb.Fatalf("segment: protocol %v", proto)
	}
	payload := gopacket.Payload([]byte("sixteen bytes..."))
	if src.Addr().Is4() {
		i4 := ip4(src.Addr(), dst.Addr(), proto)
		if ck != nil {
			must(tb, ck.SetNetworkLayerForChecksum(i4))
		}
		return serialize(tb, eth(smac, dmac, layers.EthernetTypeIPv4), i4, l4, payload)
	}
	i6 := ip6(src.Addr(), dst.Addr(), proto)
	if ck != nil {
		must(tb, ck.SetNetworkLayerForChecksum(i6))
	}
	return serialize(tb, eth(smac, dmac, layers.EthernetTypeIPv6), i6, l4, payload)
}

func udp(tb testing.TB, smac, dmac net.HardwareAddr, src, dst netip.Addr) []byte {
	u := &layers.UDP{SrcPort: 40001, DstPort: 53}
	payload := gopacket.Payload([]byte("a DNS query would be here, and then some padding"))
	if src.Is4() {
		i4 := ip4(src, dst, layers.IPProtocolUDP)
		u.SetNetworkLayerForChecksum(i4)
		return serialize(tb, eth(smac, dmac, layers.EthernetTypeIPv4), i4, u, payload)
	}
	i6 := ip6(src, dst, layers.IPProtocolUDP)
	u.SetNetworkLayerForChecksum(i6)
	return serialize(tb, eth(smac, dmac, layers.EthernetTypeIPv6), i6, u, payload)
}

func arp(tb testing.TB, op uint16, smac, dmac net.HardwareAddr, sha net.HardwareAddr, spa, tpa netip.Addr) []byte {
	tha := net.HardwareAddr{0, 0, 0, 0, 0, 0}
	if op == layers.ARPReply {
		tha = dmac
	}
	return serialize(tb, eth(smac, dmac, layers.EthernetTypeARP), &layers.ARP{
		AddrType: layers.LinkTypeEthernet, Protocol: layers.EthernetTypeIPv4, HwAddressSize: 6, ProtAddressSize: 4,
		Operation: op, SourceHwAddress: sha, SourceProtAddress: spa.AsSlice(), DstHwAddress: tha, DstProtAddress: tpa.AsSlice(),
	})
}

// solicitedNode returns the solicited-node multicast address and MAC of a.
func solicitedNode(a netip.Addr) (netip.Addr, net.HardwareAddr) {
	b := a.As16()
	m := netip.AddrFrom16([16]byte{0xff, 0x02, 11: 0x01, 12: 0xff, 13: b[13], 14: b[14], 15: b[15]})
	return m, net.HardwareAddr{0x33, 0x33, 0xff, b[13], b[14], b[15]}
}

func neighborSolicitation(tb testing.TB, smac net.HardwareAddr, src, target netip.Addr) []byte {
	return neighborSolicitationLL(tb, smac, smac, src, target)
}

// neighborSolicitationLL is a neighbour solicitation from smac whose
// source link-layer option says slla.
func neighborSolicitationLL(tb testing.TB, smac, slla net.HardwareAddr, src, target netip.Addr) []byte {
	dst, dmac := solicitedNode(target)
	i6 := ip6(src, dst, layers.IPProtocolICMPv6)
	i6.HopLimit = 255
	ic := &layers.ICMPv6{TypeCode: layers.CreateICMPv6TypeCode(layers.ICMPv6TypeNeighborSolicitation, 0)}
	ic.SetNetworkLayerForChecksum(i6)
	ns := &layers.ICMPv6NeighborSolicitation{TargetAddress: target.AsSlice(),
		Options: layers.ICMPv6Options{{Type: layers.ICMPv6OptSourceAddress, Data: slla}}}
	return serialize(tb, eth(smac, dmac, layers.EthernetTypeIPv6), i6, ic, ns)
}

func vlanTagged(tb testing.TB, smac, dmac net.HardwareAddr, src, dst netip.Addr) []byte {
	return serialize(tb, eth(smac, dmac, layers.EthernetTypeDot1Q),
		&layers.Dot1Q{VLANIdentifier: 100, Type: layers.EthernetTypeIPv4},
		ip4(src, dst, layers.IPProtocolICMPv4),
		&layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(layers.ICMPv4TypeEchoRequest, 0)})
}

// inetChecksum is the RFC 1071 sum; a segment with a correct checksum sums
// to zero together with its pseudo header.
func inetChecksum(parts ...[]byte) uint16 {
	var sum uint32
	for _, p := range parts {
		for i := 0; i+1 < len(p); i += 2 {
			sum += uint32(binary.BigEndian.Uint16(p[i:]))
		}
		if len(p)%2 == 1 {
			sum += uint32(p[len(p)-1]) << 8
		}
	}
	for sum > 0xffff {
		sum = (sum & 0xffff) + (sum >> 16)
	}
	return ^uint16(sum)
}

func pseudoHeader(src, dst netip.Addr, proto uint8, length int) []byte {
	if src.Is4() {
		b := append(src.AsSlice(), dst.AsSlice()...)
		return append(b, 0, proto, byte(length>>8), byte(length))
	}
	b := append(src.AsSlice(), dst.AsSlice()...)
	return append(b, 0, 0, byte(length>>8), byte(length), 0, 0, 0, proto)
}
