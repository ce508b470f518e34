package testutil

import (
	"net"
	"net/netip"
	"testing"

	"github.com/gopacket/gopacket"
)

// Frame serializes the layers of a frame for a program's test run, lengths
// and checksums computed, and pads it with zeros to 60 bytes: the kernel's
// test run wants at least an Ethernet header plus a bit.
func Frame(tb testing.TB, ls ...gopacket.SerializableLayer) []byte {
	tb.Helper()
	buf := gopacket.NewSerializeBuffer()
	Must(tb, gopacket.SerializeLayers(buf, gopacket.SerializeOptions{ComputeChecksums: true, FixLengths: true}, ls...))
	out := buf.Bytes()
	for len(out) < 60 {
		out = append(out, 0)
	}
	return out
}

// The addresses the program test rigs (internal/loader, metrics, events)
// give the node and its endpoints, lo playing the parent: the parent's MAC
// and the host's address on it, endpoints A and B, a host on the wire, and
// the broadcast MAC.
var (
	MACParent = net.HardwareAddr{0x02, 0, 0, 0, 0, 0x01}
	MACA      = net.HardwareAddr{0x02, 0xaa, 0, 0, 0, 0x0a}
	MACB      = net.HardwareAddr{0x02, 0xbb, 0, 0, 0, 0x0b}
	MACWire   = net.HardwareAddr{0x02, 0xee, 0, 0, 0, 0xee}
	MACBcast  = net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}

	IPHost = netip.MustParseAddr("192.0.2.2")
	IPA    = netip.MustParseAddr("192.0.2.10")
	IPA6   = netip.MustParseAddr("2001:db8:1::10")
	IPB    = netip.MustParseAddr("192.0.2.11")
)
