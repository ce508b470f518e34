package datapath_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/containernetworking/cni/pkg/utils"

	"github.com/underpass-cni/underpass/internal/attach"
	"github.com/underpass-cni/underpass/internal/cidrs"
	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
	"github.com/underpass-cni/underpass/internal/testutil"
)

// Fuzz targets for every encoder between Go values and map keys/values.
// The pure ones need no privileges; the ones that go through the kernel
// (Register, the CIDR sync, parents, config) load one datapath per fuzz
// process and reset what they wrote after each input, so every input starts
// from the same state and a crasher reproduces on its own.

// wantSize checks that a Go key or value type is exactly as large as the
// map's key or value in the embedded program build: a mismatch would make
// the kernel read past (or short of) what userspace wrote.
func wantSize(tb testing.TB, mapName string, key, value any) {
	tb.Helper()
	spec, err := loader.Spec()
	if err != nil {
		tb.Fatal(err)
	}
	ms := spec.Maps[mapName]
	if ms == nil {
		tb.Fatalf("no map %s in the build", mapName)
	}
	if key != nil {
		if n := binary.Size(key); n != int(ms.KeySize) {
			tb.Fatalf("%s: Go key %T is %d bytes, the map's key %d", mapName, key, n, ms.KeySize)
		}
	}
	if value != nil {
		if n := binary.Size(value); n != int(ms.ValueSize) {
			tb.Fatalf("%s: Go value %T is %d bytes, the map's value %d", mapName, value, n, ms.ValueSize)
		}
	}
}

// encode is what a key or value looks like on the wire to the kernel.
func encode(tb testing.TB, v any) []byte {
	tb.Helper()
	b, err := binary.Append(nil, binary.NativeEndian, v)
	if err != nil {
		tb.Fatalf("encode %T: %v", v, err)
	}
	return b
}

// mapped is the datapath's address form, spelled out byte by byte: IPv4 as
// ::ffff:a.b.c.d, IPv6 as is.
func mapped(a netip.Addr) [16]byte {
	if a.Is4() {
		v4 := a.As4()
		return [16]byte{10: 0xff, 11: 0xff, 12: v4[0], 13: v4[1], 14: v4[2], 15: v4[3]}
	}
	return a.As16()
}

// canonical is a prefix the way the tries key it: masked, and an IPv4-mapped
// IPv6 prefix in its IPv4 form (both spellings are one key).
func canonical(p netip.Prefix) netip.Prefix {
	p = p.Masked()
	if a := p.Addr(); a.Is4In6() && p.Bits() >= 96 {
		return netip.PrefixFrom(a.Unmap(), p.Bits()-96)
	}
	return p
}

// decodePrefixes turns fuzz bytes into at most max prefixes, host bits left
// in. Each prefix is one length byte then its address: 0..32 an IPv4 /n
// (4 bytes), 33..161 an IPv6 /(n-33) (16 bytes), 162..255 the IPv4-mapped
// IPv6 spelling ::ffff:a.b.c.d/(96+(n-162)%33) (4 bytes). A short tail is
// dropped.
func decodePrefixes(b []byte, max int) []netip.Prefix {
	var out []netip.Prefix
	for len(b) > 0 && len(out) < max {
		h := int(b[0])
		b = b[1:]
		switch {
		case h <= 32 || h >= 162:
			if len(b) < 4 {
				return out
			}
			a := netip.AddrFrom4([4]byte(b[:4]))
			b = b[4:]
			if h <= 32 {
				out = append(out, netip.PrefixFrom(a, h))
			} else {
				out = append(out, netip.PrefixFrom(netip.AddrFrom16(a.As16()), 96+(h-162)%33))
			}
		default:
			if len(b) < 16 {
				return out
			}
			out = append(out, netip.PrefixFrom(netip.AddrFrom16([16]byte(b[:16])), h-33))
			b = b[16:]
		}
	}
	return out
}

// lastAddr is the highest address of p.
func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Masked().Addr().AsSlice()
	for i := p.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}

// prefixBitsEqual compares the first n bits of a and b.
func prefixBitsEqual(a, b [16]byte, n int) bool {
	for i := 0; i < n; i++ {
		if a[i/8]&(0x80>>(i%8)) != b[i/8]&(0x80>>(i%8)) {
			return false
		}
	}
	return true
}

// trieLookup is what the kernel's LPM trie answers for a /128 lookup of
// addr: the value of the longest key whose first prefixlen bits match.
func trieLookup(entries map[loader.LPMKey]uint32, addr [16]byte) (uint32, bool) {
	best, val, found := -1, uint32(0), false
	for k, v := range entries {
		if int(k.Prefixlen) > best && prefixBitsEqual(k.Addr, addr, int(k.Prefixlen)) {
			best, val, found = int(k.Prefixlen), v, true
		}
	}
	return val, found
}

// maybeIn is maybe_in() of bpf/underpass.c, line by line: false means the
// program skips the trie and treats addr as outside the set.
func maybeIn(f *loader.Prefilter, addr [16]byte) bool {
	hi := binary.NativeEndian.Uint64(addr[:8])
	lo := binary.NativeEndian.Uint64(addr[8:])
	if hi == 0 && uint32(lo) == binary.NativeEndian.Uint32([]byte{0, 0, 0xff, 0xff}) {
		if f.Exact4 == 0 {
			return true
		}
		a := uint32(lo >> 32)
		for _, n := range f.V4 {
			if n.Valid != 0 && a&n.Mask == n.Addr {
				return true
			}
		}
		return false
	}
	if f.Exact6 == 0 {
		return true
	}
	for _, n := range f.V6 {
		if n.Valid != 0 && hi&n.Mask[0] == n.Addr[0] && lo&n.Mask[1] == n.Addr[1] {
			return true
		}
	}
	return false
}

// describe prints a prefilter as its flags and the prefixes it holds.
func describe(f *loader.Prefilter) string {
	var b strings.Builder
	fmt.Fprintf(&b, "exact4=%d exact6=%d [", f.Exact4, f.Exact6)
	for _, n := range f.V4 {
		if n.Valid != 0 {
			a := netip.AddrFrom4([4]byte(binary.NativeEndian.AppendUint32(nil, n.Addr)))
			fmt.Fprintf(&b, " %s/%d", a, bits.OnesCount32(n.Mask))
		}
	}
	for _, n := range f.V6 {
		if n.Valid != 0 {
			raw := binary.NativeEndian.AppendUint64(binary.NativeEndian.AppendUint64(nil, n.Addr[0]), n.Addr[1])
			fmt.Fprintf(&b, " %s/%d", netip.AddrFrom16([16]byte(raw)), bits.OnesCount64(n.Mask[0])+bits.OnesCount64(n.Mask[1]))
		}
	}
	b.WriteString(" ]")
	return b.String()
}

// probes are the addresses worth asking a set about: the fuzzed one, and
// the first and last address of every prefix (random addresses rarely land
// inside a prefix).
func probes(extra []byte, sets ...[]netip.Prefix) []netip.Addr {
	var out []netip.Addr
	if a, ok := netip.AddrFromSlice(extra); ok {
		out = append(out, a)
	}
	for _, set := range sets {
		for _, p := range set {
			out = append(out, p.Masked().Addr(), lastAddr(p))
		}
	}
	return out
}

// FuzzIPKey: an address survives IPKey/AddrOf (IPv4 stays IPv4, the zone is
// dropped), both spellings of an IPv4 address are one key, the key bytes are
// the documented ::ffff:a.b.c.d form, and every 16-byte key decodes to an
// address that encodes back to the same key (keys written by the programs
// are read back faithfully).
func FuzzIPKey(f *testing.F) {
	wantSize(f, "ep_by_ip", loader.EpIPKey{}, loader.EndpointRef{})
	wantSize(f, "live_svcs", loader.IPKey{}, nil)
	for _, s := range []string{"10.96.0.1", "0.0.0.0", "255.255.255.255", "::ffff:10.96.0.1", "fd00:96::1", "::", "::1", "fe80::1"} {
		f.Add(netip.MustParseAddr(s).AsSlice(), "")
	}
	f.Add(netip.MustParseAddr("fe80::1").AsSlice(), "eth0")
	f.Add([]byte{1, 2, 3}, "")
	f.Fuzz(func(t *testing.T, raw []byte, zone string) {
		if len(raw) >= 16 {
			var k loader.IPKey
			copy(k.Addr[:], raw)
			if back := datapath.IPKey(datapath.AddrOf(k)); back != k {
				t.Fatalf("key %x decodes to %s, which encodes to %x", k.Addr, datapath.AddrOf(k), back.Addr)
			}
		}
		a, ok := netip.AddrFromSlice(raw)
		if !ok {
			return
		}
		if a.Is6() {
			a = a.WithZone(zone)
		}
		k := datapath.IPKey(a)
		if k.Addr != mapped(a.Unmap()) {
			t.Fatalf("IPKey(%s) = %x, want %x", a, k.Addr, mapped(a.Unmap()))
		}
		if got := encode(t, k); !bytes.Equal(got, k.Addr[:]) {
			t.Fatalf("IPKey(%s) goes to the kernel as %x", a, got)
		}
		want := a.Unmap().WithZone("")
		got := datapath.AddrOf(k)
		if got != want {
			t.Fatalf("AddrOf(IPKey(%s)) = %s, want %s", a, got, want)
		}
		if got.Is4() != (a.Is4() || a.Is4In6()) {
			t.Fatalf("%s came back as %s: family changed", a, got)
		}
		if a.Is4() && datapath.IPKey(netip.AddrFrom16(a.As16())) != k {
			t.Fatalf("%s and its IPv4-mapped spelling are different keys", a)
		}
	})
}

// FuzzLPMKey: prefix keys are canonical (masked; IPv4 as /96+n of the mapped
// address), two prefixes get one key exactly when they mean the same set,
// PrefixOf undoes LPMKey up to that canonical form, the key agrees with
// internal/cidrs' encoding of the same format, and HostSet.Add merges the flags of
// prefixes that share a key.
func FuzzLPMKey(f *testing.F) {
	wantSize(f, "svc_cidrs", loader.LPMKey{}, uint32(0))
	wantSize(f, "host_cidrs", loader.LPMKey{}, loader.HostEntry{})
	seed := func(a string, abits int, b string, bbits int) {
		f.Add(netip.MustParseAddr(a).AsSlice(), uint8(abits), false, netip.MustParseAddr(b).AsSlice(), uint8(bbits), false)
	}
	seed("10.96.0.0", 12, "10.100.1.2", 12)
	seed("10.96.0.0", 12, "10.96.0.0", 16)
	seed("0.0.0.0", 0, "::", 0)
	seed("fd00:96::", 108, "fd00:96::1:2", 108)
	seed("169.254.20.10", 32, "2001:db8::1", 128)
	seed("10.1.2.3", 8, "10.200.0.0", 8)
	f.Add([]byte{10, 96, 0, 0}, uint8(12), true, []byte{10, 97, 0, 0}, uint8(16), true)
	f.Fuzz(func(t *testing.T, araw []byte, abits uint8, amapped bool, braw []byte, bbits uint8, bmapped bool) {
		p, ok1 := fuzzPrefix(araw, abits, amapped)
		q, ok2 := fuzzPrefix(braw, bbits, bmapped)
		if !ok1 || !ok2 {
			return
		}
		kp, kq := datapath.LPMKey(p), datapath.LPMKey(q)
		for _, c := range []struct {
			p netip.Prefix
			k loader.LPMKey
		}{{p, kp}, {q, kq}} {
			cp := canonical(c.p)
			wantBits := cp.Bits()
			if cp.Addr().Is4() {
				wantBits += 96
			}
			if c.k.Prefixlen != uint32(wantBits) || c.k.Addr != mapped(cp.Addr()) {
				t.Fatalf("LPMKey(%s) = /%d %x, want /%d %x", c.p, c.k.Prefixlen, c.k.Addr, wantBits, mapped(cp.Addr()))
			}
			if bits, addr := cidrs.MappedPrefix(c.p); uint32(bits) != c.k.Prefixlen || addr != c.k.Addr {
				t.Fatalf("%s: LPMKey says /%d %x, cidrs.MappedPrefix /%d %x", c.p, c.k.Prefixlen, c.k.Addr, bits, addr)
			}
			enc := encode(t, c.k)
			if binary.NativeEndian.Uint32(enc[:4]) != c.k.Prefixlen || !bytes.Equal(enc[4:], c.k.Addr[:]) {
				t.Fatalf("LPMKey(%s) goes to the kernel as %x", c.p, enc)
			}
			if back := datapath.PrefixOf(c.k); back != cp {
				t.Fatalf("PrefixOf(LPMKey(%s)) = %s, want %s", c.p, back, cp)
			}
		}
		if same := canonical(p) == canonical(q); same != (kp == kq) {
			t.Fatalf("%s and %s: same set %v, same key %v", p, q, same, kp == kq)
		}
		s := datapath.HostSet{}
		s.Add(p, loader.HostSteer)
		s.Add(q, loader.HostLocal)
		keys := map[loader.LPMKey]loader.HostFlags{}
		for sp, fl := range s {
			k := datapath.LPMKey(sp)
			if _, dup := keys[k]; dup {
				t.Fatalf("HostSet %v holds two entries for key /%d %x: SyncHostCIDRs would write them in random order", s, k.Prefixlen, k.Addr)
			}
			keys[k] = fl
		}
		if kp == kq && keys[kp] != loader.HostSteer|loader.HostLocal {
			t.Fatalf("%s and %s share a key but HostSet kept flags %v", p, q, keys[kp])
		}
	})
}

// fuzzPrefix makes a valid prefix of 4 or 16 address bytes and any length
// the family allows; mapped spells an IPv4 /n as ::ffff:a.b.c.d/(96+n).
func fuzzPrefix(raw []byte, bits uint8, mapped bool) (netip.Prefix, bool) {
	a, ok := netip.AddrFromSlice(raw)
	if !ok {
		return netip.Prefix{}, false
	}
	p := netip.PrefixFrom(a, int(bits)%(a.BitLen()+1))
	if mapped && a.Is4() {
		p = netip.PrefixFrom(netip.AddrFrom16(a.As16()), 96+p.Bits())
	}
	return p, true
}

// FuzzPrefixOf: LPMEntries decodes whatever a trie holds, and a trie can hold
// keys that LPMKey never writes (bpftool, another version). Every key the
// kernel accepts (prefixlen <= 128) must decode to a valid prefix that
// re-encodes to a key matching the same addresses (the key with its host
// bits cleared): otherwise the sync cannot delete it, or deletes the wrong one.
func FuzzPrefixOf(f *testing.F) {
	for _, s := range []string{"10.96.0.0/12", "fd00:96::/108", "0.0.0.0/0", "::/0", "169.254.20.10/32"} {
		k := datapath.LPMKey(netip.MustParsePrefix(s))
		f.Add(k.Prefixlen, k.Addr[:])
	}
	f.Add(uint32(104), netip.MustParseAddr("::ffff:10.1.2.3").AsSlice()) // host bits set
	f.Add(uint32(129), make([]byte, 16))
	f.Fuzz(func(t *testing.T, prefixlen uint32, raw []byte) {
		if len(raw) != 16 {
			return
		}
		k := loader.LPMKey{Prefixlen: prefixlen, Addr: [16]byte(raw)}
		p := datapath.PrefixOf(k) // must not panic, whatever the key
		if prefixlen > 128 {
			return // the kernel refuses such keys
		}
		if !p.IsValid() {
			t.Fatalf("key /%d %x (accepted by the kernel) decodes to an invalid prefix", prefixlen, raw)
		}
		var masked [16]byte
		for i := 0; i < int(prefixlen); i++ {
			masked[i/8] |= raw[i/8] & (0x80 >> (i % 8))
		}
		want := loader.LPMKey{Prefixlen: prefixlen, Addr: masked}
		if back := datapath.LPMKey(p); back != want {
			t.Fatalf("key /%d %x decodes to %s, which encodes to /%d %x, want /%d %x", prefixlen, raw, p, back.Prefixlen, back.Addr, want.Prefixlen, want.Addr)
		}
	})
}

// FuzzPrefilter: the prefilter BuildPrefilter lays out never says "not in
// the set" for an address the trie holds (superset), and when it claims to be
// exact for a family it is exact, so it is worth its place. Both answers are
// computed here in plain Go, the trie's from the LPM keys.
func FuzzPrefilter(f *testing.F) {
	wantSize(f, "prefilter", uint32(0), loader.Prefilter{})
	f.Add([]byte{12, 10, 96, 0, 0, 33 + 108, 0xfd, 0, 0, 0x96, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}, []byte{10, 96, 0, 1})
	f.Add([]byte{32, 169, 254, 20, 10, 32, 10, 0, 0, 1, 24, 192, 168, 1, 0}, []byte{192, 168, 1, 77})
	f.Add([]byte{0, 0, 0, 0, 0}, []byte{8, 8, 8, 8})                               // 0.0.0.0/0
	f.Add([]byte{162 + 8, 10, 0, 0, 0}, netip.MustParseAddr("10.1.1.1").AsSlice()) // ::ffff:10.0.0.0/104
	overflow := []byte{}
	for i := 0; i < loader.PrefilterV4+2; i++ {
		overflow = append(overflow, 16, 10, byte(100+i), 0, 0)
	}
	f.Add(overflow, []byte{10, 109, 0, 5})
	f.Fuzz(func(t *testing.T, data, probe []byte) {
		// An IPv6 prefix that covers ::ffff:0:0/96 (::/0, ::/64) is not
		// special here: the config refuses it (cidrs.CoversIPv4), but the
		// trie, if it holds one, matches IPv4 with it, so the filter must too.
		set := decodePrefixes(data, 2*(loader.PrefilterV4+loader.PrefilterV6))
		pf := datapath.BuildPrefilter(set)
		trie := map[loader.LPMKey]uint32{}
		n4, n6 := 0, 0
		for _, p := range set {
			trie[datapath.LPMKey(p)] = 1
			if canonical(p).Addr().Is4() {
				n4++
			} else {
				n6++
			}
		}
		if pf.Exact4 == 1 && n4 > loader.PrefilterV4 || pf.Exact6 == 1 && n6 > loader.PrefilterV6 {
			t.Fatalf("%v: %d IPv4 and %d IPv6 prefixes do not fit, yet exact4=%d exact6=%d", set, n4, n6, pf.Exact4, pf.Exact6)
		}
		// Worth its place: a set that fits is filtered exactly (the one
		// excuse for IPv4 being an IPv6 prefix that covers it).
		if n4 <= loader.PrefilterV4 && pf.Exact4 != 1 && !slices.ContainsFunc(set, cidrs.CoversIPv4) || n6 <= loader.PrefilterV6 && pf.Exact6 != 1 {
			t.Fatalf("%v: %d IPv4 and %d IPv6 prefixes fit, yet exact4=%d exact6=%d", set, n4, n6, pf.Exact4, pf.Exact6)
		}
		for i, n := range pf.V4 {
			if n.Valid != 0 && n.Addr&n.Mask != n.Addr {
				t.Fatalf("v4[%d] has host bits: %+v", i, n)
			}
		}
		for i, n := range pf.V6 {
			if n.Valid != 0 && (n.Addr[0]&n.Mask[0] != n.Addr[0] || n.Addr[1]&n.Mask[1] != n.Addr[1]) {
				t.Fatalf("v6[%d] has host bits: %+v", i, n)
			}
		}
		for _, a := range probes(probe, set) {
			k := datapath.IPKey(a)
			_, in := trieLookup(trie, k.Addr)
			maybe := maybeIn(&pf, k.Addr)
			if in && !maybe {
				t.Fatalf("%s is in %v but the prefilter says it is not: %s", a, set, describe(&pf))
			}
			exact := pf.Exact6 == 1
			if a.Unmap().Is4() {
				exact = pf.Exact4 == 1
			}
			if exact && maybe && !in {
				t.Fatalf("%s is not in %v but the exact prefilter says maybe: %s", a, set, describe(&pf))
			}
		}
	})
}

// FuzzMACKey: a 6-byte MAC is the key verbatim with the padding zero (the
// kernel hashes all 8 bytes); shorter addresses are zero-filled, longer ones
// cut to 6 bytes.
func FuzzMACKey(f *testing.F) {
	wantSize(f, "ep_by_mac", loader.MACKey{}, loader.EndpointRef{})
	f.Add([]byte{2, 0, 0, 0, 0, 1})
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	f.Add([]byte{})
	f.Add([]byte{2, 0, 0, 0, 0, 1, 0xaa, 0xbb})
	f.Fuzz(func(t *testing.T, mac []byte) {
		k := datapath.MACKey(mac, 0x01020304)
		var want [6]byte
		copy(want[:], mac)
		if k.Mac != want || k.Pad != 0 || k.ParentIfindex != 0x01020304 {
			t.Fatalf("MACKey(%x) = %x pad %d parent %d", mac, k.Mac, k.Pad, k.ParentIfindex)
		}
		if enc := encode(t, k); !bytes.Equal(enc, append(want[:], 0, 0, 4, 3, 2, 1)) {
			t.Fatalf("MACKey(%x) goes to the kernel as %x", mac, enc)
		}
		if len(mac) == 6 && net.HardwareAddr(k.Mac[:]).String() != net.HardwareAddr(mac).String() {
			t.Fatalf("MACKey(%s) prints as %s", net.HardwareAddr(mac), net.HardwareAddr(k.Mac[:]))
		}
	})
}

// FuzzCString: CString always NUL-terminates, clears what it does not write
// (no stale bytes of a previous value reach the map), and GoString reads back
// the string up to the array size or the first NUL. GoString of any array
// stops at the first NUL.
func FuzzCString(f *testing.F) {
	f.Add("web-0", uint8(128))
	f.Add("0123456789abcdef", uint8(16))
	f.Add("eth0", uint8(0))
	f.Add("a\x00b", uint8(8))
	f.Add("\xff\xfe", uint8(3))
	f.Fuzz(func(t *testing.T, s string, n uint8) {
		dst := make([]int8, n)
		for i := range dst {
			dst[i] = 0x55 // what a previous value left
		}
		datapath.CString(dst, s)
		if n == 0 {
			return
		}
		copied := min(len(s), int(n)-1)
		for i, c := range dst {
			want := int8(0)
			if i < copied {
				want = int8(s[i])
			}
			if c != want {
				t.Fatalf("CString(%q) into %d bytes: byte %d is %d, want %d", s, n, i, c, want)
			}
		}
		want := s[:copied]
		if i := strings.IndexByte(want, 0); i >= 0 {
			want = want[:i]
		}
		if got := datapath.GoString(dst); got != want {
			t.Fatalf("GoString(CString(%q)) into %d bytes = %q, want %q", s, n, got, want)
		}
		src := make([]int8, len(s))
		for i := 0; i < len(s); i++ {
			src[i] = int8(s[i])
		}
		want, _, _ = strings.Cut(s, "\x00")
		if got := datapath.GoString(src); got != want {
			t.Fatalf("GoString(%q) = %q, want %q", s, got, want)
		}
	})
}

// FuzzEndpointID: ids are never 0 (the programs' "no endpoint") and fit in
// the 16 bits a filter's classid carries, whatever the attachment.
func FuzzEndpointID(f *testing.F) {
	f.Add("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef", "eth0")
	f.Add("", "")
	f.Add("a\x00b", "c")
	f.Fuzz(func(t *testing.T, containerID, ifname string) {
		id := datapath.EndpointID(containerID, ifname)
		if id == 0 || id > attach.MaxEndpointID {
			t.Fatalf("EndpointID(%q, %q) = %#x", containerID, ifname, id)
		}
		if again := datapath.EndpointID(containerID, ifname); again != id {
			t.Fatalf("EndpointID(%q, %q) is %#x, then %#x", containerID, ifname, id, again)
		}
	})
}

// FuzzEndpointAddrs: decoding the address slots of an endpoint value read
// from the map (written by any version) never panics, skips exactly the
// empty slots (family 0), and keeps each address's key: Unregister and the
// GC find ep_by_ip entries by it.
func FuzzEndpointAddrs(f *testing.F) {
	var ep loader.Endpoint
	ep.Addrs[0] = loader.EndpointAddr{Addr: mapped(netip.MustParseAddr("192.0.2.10")), Prefixlen: 24, Family: 4}
	ep.Addrs[2] = loader.EndpointAddr{Addr: mapped(netip.MustParseAddr("2001:db8::10")), Prefixlen: 64, Family: 6}
	f.Add(encode(f, ep.Addrs))
	f.Add(make([]byte, binary.Size(ep.Addrs)))
	f.Fuzz(func(t *testing.T, raw []byte) {
		var addrs [loader.MaxAddrs]loader.EndpointAddr
		if _, err := binary.Decode(raw, binary.NativeEndian, &addrs); err != nil {
			return
		}
		ep := loader.Endpoint{Addrs: addrs}
		got := datapath.Decode(&ep).Addrs
		i := 0
		for _, a := range addrs {
			if a.Family == 0 {
				continue
			}
			if i >= len(got) {
				t.Fatalf("%d addresses decoded, more slots are set: %+v", len(got), addrs)
			}
			if k := datapath.IPKey(got[i].Addr()); k.Addr != a.Addr {
				t.Fatalf("slot %+v decoded to %s (key %x)", a, got[i], k.Addr)
			}
			i++
		}
		if i != len(got) {
			t.Fatalf("%d slots set, %d addresses decoded", i, len(got))
		}
	})
}

// loadMaps loads a private datapath for one fuzz process.
func loadMaps(tb testing.TB) *loader.Maps {
	tb.Helper()
	return &testutil.LoadDatapath(tb).Maps
}

// requireEmpty fails unless every map holds no entry.
func requireEmpty(t *testing.T, what string, ms map[string]*ebpf.Map) {
	t.Helper()
	for name, m := range ms {
		k, err := m.NextKeyBytes(nil)
		if err != nil {
			t.Fatalf("%s: read %s: %v", what, name, err)
		}
		if k != nil {
			t.Fatalf("%s: %s still holds key %x", what, name, k)
		}
	}
}

// FuzzRegister drives the endpoint spec -> map entries encoding through the
// kernel: what Register writes reads back as the spec (the attachment's
// identity exactly, so that Find, DEL and GC find it again; display
// metadata at most truncated), every address and the MAC (macvlan only)
// point to the endpoint, and Unregister leaves nothing behind.
func FuzzRegister(f *testing.F) {
	wantSize(f, "endpoints", uint32(0), loader.Endpoint{})
	wantSize(f, "ep_stats", uint32(0), loader.EndpointStats{})
	m := loadMaps(f)
	owned := map[string]*ebpf.Map{"endpoints": m.Endpoints, "ep_by_ip": m.EpByIp, "ep_by_mac": m.EpByMac, "ep_stats": m.EpStats, "ep_names": m.EpNames}

	v4v6 := []byte{24, 192, 0, 2, 10, 33 + 64, 0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10}
	cid := "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
	f.Add(cid, "eth0", "/var/run/netns/cni-1234", "web-0", "shop", "eth1", []byte{2, 1, 2, 3, 4, 5}, v4v6, uint8(loader.ModeMacvlan), uint16(2), uint16(7))
	f.Add("c1", "net1", "/proc/4242/ns/net", "", "", "bond0", []byte{2, 9, 9, 9, 9, 9}, []byte{32, 10, 0, 0, 5}, uint8(loader.ModeIPvlanL3S), uint16(3), uint16(2))
	f.Add("c2", "eth0", "/x", strings.Repeat("p", 200), strings.Repeat("n", 80), "eth0", []byte{}, []byte{}, uint8(loader.ModeIPvlanL2), uint16(65535), uint16(1))
	f.Add(strings.Repeat("c", 72), "eth0", "/x", "p", "n", "eth0", []byte{2, 0, 0, 0, 0, 1}, []byte{}, uint8(loader.ModeMacvlan), uint16(2), uint16(3))
	f.Add("c4", "eth0", "/"+strings.Repeat("n", 127), "p", "n", "eth0", []byte{2, 0, 0, 0, 0, 1}, []byte{}, uint8(loader.ModeMacvlan), uint16(2), uint16(3))
	f.Add("c3", "eth0", "/x", "p", "n", "eth0", []byte{2, 0, 0, 0, 0, 1}, bytes.Repeat([]byte{32, 10, 0, 0, 5}, loader.MaxAddrs+1), uint8(loader.ModeMacvlan), uint16(2), uint16(3))
	f.Fuzz(func(t *testing.T, containerID, ifname, netns, pod, namespace, parent string, mac, addrs []byte, mode uint8, parentIndex, ifindex uint16) {
		// Only what a runtime can pass: skel checks the container id and
		// ifname, and environment variables cannot hold a NUL.
		if utils.ValidateContainerID(containerID) != nil || utils.ValidateInterfaceName(ifname) != nil ||
			strings.ContainsRune(ifname+netns+pod+namespace+parent, 0) {
			return
		}
		spec := datapath.Endpoint{
			ContainerID: containerID, IfName: ifname, Netns: netns,
			ParentIfindex: int(parentIndex), ParentName: parent, Ifindex: int(ifindex),
			Mode: loader.Mode(mode), MAC: net.HardwareAddr(mac),
			Addrs: decodePrefixes(addrs, loader.MaxAddrs+1), PodName: pod, PodNamespace: namespace,
		}
		before := uint64(time.Now().Unix())
		id, err := datapath.Register(m, spec)
		after := uint64(time.Now().Unix())
		// Names that would not read back whole are refused, not cut.
		if datapath.CheckAttachment(containerID, ifname, netns, "") != nil {
			if !errors.Is(err, datapath.ErrTooLong) {
				t.Fatalf("container id %d bytes, ifname %d, netns %d: err %v, want ErrTooLong", len(containerID), len(ifname), len(netns), err)
			}
			requireEmpty(t, "refused register", owned)
			return
		}
		if len(spec.Addrs) > loader.MaxAddrs {
			if err == nil || !strings.Contains(err.Error(), "at most") {
				t.Fatalf("%d addresses: err %v", len(spec.Addrs), err)
			}
			requireEmpty(t, "refused register", owned)
			return
		}
		if err != nil {
			t.Fatalf("register %+v: %v", spec, err)
		}
		t.Cleanup(func() {
			if err := datapath.Unregister(m, id); err != nil {
				t.Errorf("unregister: %v", err)
			}
		})
		if want := datapath.EndpointID(containerID, ifname); id != want {
			t.Fatalf("id %d in an empty registry, want EndpointID %d", id, want)
		}

		eps, err := datapath.Endpoints(m)
		if err != nil {
			t.Fatal(err)
		}
		ep, ok := eps[id]
		if !ok || len(eps) != 1 {
			t.Fatalf("registered %d, the map holds %v", id, eps)
		}
		// Identity: compared against what the CNI passes on DEL, CHECK and
		// GC, and the netns path is opened; a cut value names another
		// attachment or nothing.
		for _, c := range []struct{ what, got, want string }{
			{"container id", ep.ContainerID, containerID},
			{"ifname", ep.IfName, ifname},
			{"netns", ep.Netns, netns},
		} {
			if c.got != c.want {
				t.Fatalf("%s %q (%d bytes) reads back as %q", c.what, c.want, len(c.want), c.got)
			}
		}
		// Display metadata may be cut to fit its array (with the NUL),
		// never otherwise altered.
		var raw loader.Endpoint
		for _, c := range []struct {
			what    string
			got, in string
			size    int
		}{
			{"pod", ep.PodName, pod, len(raw.PodName)},
			{"namespace", ep.PodNamespace, namespace, len(raw.PodNamespace)},
			{"parent", ep.ParentName, parent, len(raw.Parent)},
		} {
			want := c.in[:min(len(c.in), c.size-1)]
			if got := c.got; got != want {
				t.Fatalf("%s %q reads back as %q, want %q", c.what, c.in, got, want)
			}
		}
		var wantMAC [6]byte
		copy(wantMAC[:], mac)
		if created := uint64(ep.Created.Unix()); ep.ID != id || ep.ParentIfindex != int(parentIndex) || ep.Ifindex != int(ifindex) ||
			uint8(ep.Mode) != mode || [6]byte(ep.MAC) != wantMAC || created < before || created > after {
			t.Fatalf("spec %+v stored as %+v", spec, ep)
		}
		got := ep.Addrs
		if len(got) != len(spec.Addrs) {
			t.Fatalf("addresses %v read back as %v", spec.Addrs, got)
		}
		for i, p := range spec.Addrs {
			// ::ffff:a.b.c.d/96+n is stored as a.b.c.d/n: one spelling
			// per address (the datapath keys both alike).
			want := p
			if a := p.Addr(); a.Is4In6() && p.Bits() >= 96 {
				want = netip.PrefixFrom(a.Unmap(), p.Bits()-96)
			}
			if got[i] != want {
				t.Fatalf("addresses %v read back as %v, want %v", spec.Addrs, got, want)
			}
		}

		if fid, _, err := datapath.Find(m, containerID, ifname); err != nil || fid != id {
			t.Fatalf("Find(%q, %q) = %d, %v; registered %d", containerID, ifname, fid, err, id)
		}
		ref := loader.EndpointRef{Id: id}
		for _, p := range spec.Addrs {
			k := datapath.EpIPKey(p.Addr(), int(parentIndex))
			var r loader.EndpointRef
			if err := m.EpByIp.Lookup(&k, &r); err != nil || r != ref {
				t.Fatalf("ep_by_ip[%s] = %+v, %v; want %+v", p.Addr(), r, err, ref)
			}
		}
		k := datapath.MACKey(mac, int(parentIndex))
		var r loader.EndpointRef
		err = m.EpByMac.Lookup(&k, &r)
		if loader.Mode(mode) == loader.ModeMacvlan && (err != nil || r != ref) {
			t.Fatalf("ep_by_mac[%x] = %+v, %v; want %+v", mac, r, err, ref)
		}
		if loader.Mode(mode) != loader.ModeMacvlan && !errors.Is(err, ebpf.ErrKeyNotExist) {
			t.Fatalf("mode %s wrote ep_by_mac: %v", loader.Mode(mode), err)
		}
		if st, err := datapath.EndpointStats(m, id); err != nil || st != (loader.EndpointStats{}) {
			t.Fatalf("fresh counters %+v, %v", st, err)
		}

		if err := datapath.Unregister(m, id); err != nil {
			t.Fatal(err)
		}
		requireEmpty(t, "after unregister", owned)
	})
}

// FuzzSyncCIDRs drives the CIDR sets through the kernel tries: after each
// sync (empty -> first -> second -> empty) LPMEntries reads back exactly the
// canonical set, the kernel's trie answers every probe as the plain-Go model
// of the LPM keys does (so the key encoding matches the kernel's matching),
// and the prefilter written next to it never hides a member.
func FuzzSyncCIDRs(f *testing.F) {
	m := loadMaps(f)
	f.Add([]byte{12, 10, 96, 0, 0, 33 + 108, 0xfd, 0, 0, 0x96, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}, []byte{16, 10, 96, 0, 0}, []byte{10, 96, 0, 1})
	f.Add([]byte{32, 169, 254, 20, 10}, []byte{32, 169, 254, 20, 10, 24, 169, 254, 20, 0}, []byte{169, 254, 20, 11})
	f.Add([]byte{8, 10, 1, 2, 3}, []byte{162 + 16, 10, 0, 0, 0}, netip.MustParseAddr("::ffff:10.0.0.1").AsSlice())
	overflow := []byte{}
	for i := 0; i < loader.PrefilterV4+2; i++ {
		overflow = append(overflow, 16, 10, byte(100+i), 0, 0)
	}
	f.Add(overflow, []byte{}, []byte{10, 109, 0, 5})
	f.Fuzz(func(t *testing.T, first, second, probe []byte) {
		a, b := decodePrefixes(first, 16), decodePrefixes(second, 16)
		ps := probes(probe, a, b)
		t.Cleanup(func() {
			// Normally a no-op: every input ends with both sets empty.
			if err := errors.Join(datapath.SyncServiceCIDRs(m, nil), datapath.SyncHostCIDRs(m, datapath.HostSet{})); err != nil {
				t.Errorf("reset: %v", err)
			}
		})
		for _, set := range [][]netip.Prefix{a, b, nil} {
			if err := datapath.SyncServiceCIDRs(m, set); err != nil {
				t.Fatal(err)
			}
			want := map[netip.Prefix]uint32{}
			for _, p := range set {
				want[canonical(p)] = 1
			}
			checkTrie(t, m, 0, m.SvcCidrs, want, ps)
		}
		// host_cidrs: the same, with flags merged per prefix.
		for _, set := range [][]netip.Prefix{b, a, nil} {
			hs := datapath.HostSet{}
			want := map[netip.Prefix]uint32{}
			for i, p := range set {
				fl := loader.HostSteer
				if i%2 == 1 {
					fl = loader.HostLocal
				}
				hs.Add(p, fl)
				want[canonical(p)] |= uint32(fl)
			}
			if err := datapath.SyncHostCIDRs(m, hs); err != nil {
				t.Fatal(err)
			}
			checkTrie(t, m, 1, m.HostCidrs, want, ps)
		}
	})
}

// checkTrie compares a synced trie and its prefilter with want.
func checkTrie(t *testing.T, m *loader.Maps, which uint32, trie *ebpf.Map, want map[netip.Prefix]uint32, ps []netip.Addr) {
	t.Helper()
	have, err := datapath.LPMEntries(trie)
	if err != nil {
		t.Fatal(err)
	}
	if len(have) != len(want) {
		t.Fatalf("trie %d holds %v, want %v", which, have, want)
	}
	model := map[loader.LPMKey]uint32{}
	for p, v := range want {
		if have[p] != v {
			t.Fatalf("trie %d holds %v, want %v", which, have, want)
		}
		model[datapath.LPMKey(p)] = v
	}
	var pf loader.Prefilter
	if err := m.Prefilter.Lookup(which, &pf); err != nil {
		t.Fatal(err)
	}
	for _, a := range ps {
		k := datapath.IPKey(a)
		wantV, wantIn := trieLookup(model, k.Addr)
		var v uint32
		err := trie.Lookup(&loader.LPMKey{Prefixlen: 128, Addr: k.Addr}, &v)
		if in := err == nil; in != wantIn || (in && v != wantV) {
			t.Fatalf("trie %d: kernel says %s -> %v (%d, %v), the keys say %v (%d); set %v", which, a, in, v, err, wantIn, wantV, want)
		}
		if wantIn && !maybeIn(&pf, k.Addr) {
			t.Fatalf("prefilter %d hides %s, which is in %v: %s", which, a, want, describe(&pf))
		}
	}
}

// FuzzParent: PutParent refuses exactly the ifindexes outside the parents
// array and the empty mode, and GetParent reads back what it wrote;
// DeleteParent makes it ErrNoParent again.
func FuzzParent(f *testing.F) {
	wantSize(f, "parents", uint32(0), loader.Parent{})
	m := loadMaps(f)
	f.Add(int64(2), []byte{2, 0, 0, 0, 0, 1}, uint8(loader.ModeMacvlan))
	f.Add(int64(loader.MaxParentIfindex-1), []byte{2, 0, 0, 0, 0, 1}, uint8(loader.ModeIPvlanL3))
	f.Add(int64(loader.MaxParentIfindex), []byte{}, uint8(loader.ModeMacvlan))
	f.Add(int64(0), []byte{}, uint8(loader.ModeMacvlan))
	f.Add(int64(-1), []byte{}, uint8(loader.ModeMacvlan))
	f.Add(int64(5), []byte{2, 0, 0, 0, 0, 1}, uint8(loader.ModeNone))
	f.Add(int64(1)<<32+2, []byte{2, 0, 0, 0, 0, 1}, uint8(loader.ModeMacvlan)) // wraps to 2 as a uint32
	f.Fuzz(func(t *testing.T, index int64, mac []byte, mode uint8) {
		ifindex := int(index)
		err := datapath.PutParent(m, ifindex, mac, loader.Mode(mode))
		inRange := ifindex > 0 && ifindex < loader.MaxParentIfindex
		if !inRange || loader.Mode(mode) == loader.ModeNone {
			if err == nil {
				t.Fatalf("PutParent(%d, mode %d) accepted", ifindex, mode)
			}
			// Nothing written, not even at the index a uint32 cast
			// would wrap to.
			if wrapped := int(uint32(ifindex)); wrapped > 0 && wrapped < loader.MaxParentIfindex {
				if _, err := datapath.GetParent(m, wrapped); !errors.Is(err, datapath.ErrNoParent) {
					t.Fatalf("refused PutParent(%d) left parent %d: %v", ifindex, wrapped, err)
				}
			}
			return
		}
		if err != nil {
			t.Fatalf("PutParent(%d, %x, %d): %v", ifindex, mac, mode, err)
		}
		p, err := datapath.GetParent(m, ifindex)
		var wantMAC [6]byte
		copy(wantMAC[:], mac)
		if err != nil || p.Mac != wantMAC || p.Mode != mode {
			t.Fatalf("parent %d read back as %+v, %v", ifindex, p, err)
		}
		if ps, err := datapath.Parents(m); err != nil || len(ps) != 1 || ps[ifindex] != p {
			t.Fatalf("Parents() = %v, %v; want only %d", ps, err, ifindex)
		}
		if err := datapath.DeleteParent(m, ifindex); err != nil {
			t.Fatal(err)
		}
		if _, err := datapath.GetParent(m, ifindex); !errors.Is(err, datapath.ErrNoParent) {
			t.Fatalf("deleted parent %d: %v", ifindex, err)
		}
	})
}

// FuzzConfig: the config word round-trips through the map.
func FuzzConfig(f *testing.F) {
	wantSize(f, "config", uint32(0), loader.Config{})
	m := loadMaps(f)
	f.Add(true, false, uint64(1))
	f.Add(false, true, uint64(1)<<63)
	f.Fuzz(func(t *testing.T, hostReachable, staleReject bool, gen uint64) {
		want := datapath.Config{HostReachable: hostReachable, StaleReject: staleReject}
		if err := datapath.SetConfig(m, want, gen); err != nil {
			t.Fatal(err)
		}
		got, g, err := datapath.GetConfig(m)
		if err != nil || got != want || g != gen {
			t.Fatalf("config %+v gen %d read back as %+v gen %d, %v", want, gen, got, g, err)
		}
	})
}
