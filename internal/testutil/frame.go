package testutil

import (
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
