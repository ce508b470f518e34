package cidrs

import (
	"errors"
	"net/netip"
	"strings"
	"testing"

	"github.com/underpass-cni/underpass/internal/testutil"
)

func pfx(s string) netip.Prefix { return netip.MustParsePrefix(s) }

func pfxs(ss ...string) []netip.Prefix { return testutil.Parse(pfx, ss...) }

func TestCanonical(t *testing.T) {
	tests := []struct{ in, want string }{
		{"10.96.0.1/12", "10.96.0.0/12"},
		{"10.96.0.0/12", "10.96.0.0/12"},
		{"::ffff:10.96.0.0/108", "10.96.0.0/12"},
		{"::ffff:10.96.0.1/128", "10.96.0.1/32"},
		{"::ffff:0:0/96", "0.0.0.0/0"},
		{"::ffff:0:0/80", "::/80"}, // shorter than /96: a real IPv6 prefix
		{"fd00::1/64", "fd00::/64"},
	}
	for _, tt := range tests {
		if got := Canonical(pfx(tt.in)); got != pfx(tt.want) {
			t.Errorf("Canonical(%s) = %s, want %s", tt.in, got, tt.want)
		}
	}
	if got := Canonical(netip.Prefix{}); got.IsValid() {
		t.Errorf("Canonical(invalid) = %s, want invalid", got)
	}
}

func TestCoversIPv4(t *testing.T) {
	tests := []struct {
		in   string
		want bool
	}{
		{"::/0", true},
		{"::/64", true},
		{"::ffff:0:0/96", false}, // that is IPv4 0.0.0.0/0 itself, not an IPv6 prefix
		{"fd00::/8", false},
		{"2001:db8::/32", false},
		{"10.0.0.0/8", false},
		{"0.0.0.0/0", false},
	}
	for _, tt := range tests {
		if got := CoversIPv4(pfx(tt.in)); got != tt.want {
			t.Errorf("CoversIPv4(%s) = %v, want %v", tt.in, got, tt.want)
		}
	}
}

func TestOverlaps(t *testing.T) {
	tests := []struct {
		a, b string
		want bool
	}{
		{"10.96.0.0/12", "10.99.0.0/24", true},
		{"10.99.0.0/24", "10.96.0.0/12", true},
		{"10.96.0.0/16", "10.99.0.0/24", false},
		{"10.96.0.0/16", "10.96.0.0/16", true},
		{"10.96.0.5/16", "10.96.200.0/24", true}, // host bits ignored
		{"10.96.0.0/16", "10.97.0.0/16", false},
		{"0.0.0.0/0", "192.168.1.1/32", true},
		{"10.0.0.0/8", "::/0", false}, // mixed families never overlap
		{"10.0.0.0/8", "fd00::/8", false},
		{"::ffff:10.96.0.0/108", "10.99.0.0/24", true}, // IPv4-mapped counts as IPv4
		{"fd00::/64", "fd00::1/128", true},
		{"fd00::/64", "fd00:0:0:1::/64", false},
	}
	for _, tt := range tests {
		if got := Overlaps(pfx(tt.a), pfx(tt.b)); got != tt.want {
			t.Errorf("Overlaps(%s, %s) = %v, want %v", tt.a, tt.b, got, tt.want)
		}
	}
	if Overlaps(netip.Prefix{}, pfx("0.0.0.0/0")) {
		t.Error("an invalid prefix overlaps 0.0.0.0/0")
	}
}

func TestCheckDisjoint(t *testing.T) {
	tests := []struct {
		name       string
		set1, set2 []netip.Prefix
		want       []string // substrings, one per expected error line
	}{
		{
			name: "disjoint",
			set1: pfxs("10.96.0.0/16"),
			set2: pfxs("10.99.0.0/24", "fd00::/64"),
		},
		{
			name: "empty sets",
		},
		{
			name: "service range contains node subnet",
			set1: pfxs("10.96.0.0/12"),
			set2: pfxs("10.99.0.0/24"),
			want: []string{"service CIDR 10.96.0.0/12 overlaps node subnet 10.99.0.0/24: addresses in 10.99.0.0/24 would count as both; pick a service CIDR outside every node subnet"},
		},
		{
			name: "node subnet contains service range",
			set1: pfxs("10.99.128.0/20"),
			set2: pfxs("10.99.0.0/16"),
			want: []string{"service CIDR 10.99.128.0/20 overlaps node subnet 10.99.0.0/16: addresses in 10.99.128.0/20 would"},
		},
		{
			name: "every pair is reported",
			set1: pfxs("10.96.0.0/12", "fd00:96::/108"),
			set2: pfxs("10.99.0.0/24", "10.100.0.0/24", "fd00:96::/64"),
			want: []string{
				"10.96.0.0/12 overlaps node subnet 10.99.0.0/24",
				"10.96.0.0/12 overlaps node subnet 10.100.0.0/24",
				"fd00:96::/108 overlaps node subnet fd00:96::/64",
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := CheckDisjoint("service CIDR", tt.set1, "node subnet", tt.set2)
			testutil.WantErrorLines(t, err, tt.want)
			if len(tt.want) == 0 {
				return
			}
			var oe *OverlapError
			if !errors.As(err, &oe) {
				t.Fatalf("%T is not an *OverlapError", err)
			}
			if oe.Name1 != "service CIDR" || oe.Name2 != "node subnet" {
				t.Errorf("names = %q, %q", oe.Name1, oe.Name2)
			}
		})
	}
}

func TestParsePrefix(t *testing.T) {
	tests := []parseCase{
		{in: "10.96.0.0/12", want: "10.96.0.0/12"},
		{in: "10.96.0.1/12", want: "10.96.0.0/12"},
		{in: "10.96.0.10", want: "10.96.0.10/32"},
		{in: "fd00::10", want: "fd00::10/128"},
		{in: "fd00::/64", want: "fd00::/64"},
		{in: "::ffff:10.96.0.10", want: "10.96.0.10/32"},
		{in: "::ffff:10.96.0.0/112", want: "10.96.0.0/16"},
		{in: "10.0.0.300/32", wantErr: `"10.0.0.300/32" is not a CIDR (IPv4 field has value >255)`},
		{in: "10.0.0.0/33", wantErr: `"10.0.0.0/33" is not a CIDR (prefix length out of range)`},
		{in: "10.0.0.0/", wantErr: `"10.0.0.0/" is not a CIDR (bad bits after slash: "")`},
		{in: "fe80::1%eth0/64", wantErr: `is not a CIDR (IPv6 zones cannot be present in a prefix)`},
		{in: "10.0.0.300", wantErr: `"10.0.0.300" is not a CIDR or IP address`},
		{in: "", wantErr: `"" is not a CIDR or IP address (unable to parse IP)`},
		{in: "eth0", wantErr: `"eth0" is not a CIDR or IP address`},
		{in: "fe80::1%eth0", wantErr: `has an IPv6 zone`},
		{in: " 10.0.0.1", wantErr: `" 10.0.0.1" is not`},
	}
	checkParse(t, "ParsePrefix", ParsePrefix, pfx, tests)
}

// parseCase is a parser's input and the value (as a string) or the error
// text it should give.
type parseCase = struct{ in, want, wantErr string }

// checkParse runs parse (called name) on each case: its error must contain
// wantErr, or its value be the one wantOf makes of want.
func checkParse[T comparable](t *testing.T, name string, parse func(string) (T, error), wantOf func(string) T, tests []parseCase) {
	t.Helper()
	for _, tt := range tests {
		got, err := parse(tt.in)
		if tt.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("%s(%q) error = %v, want it to contain %q", name, tt.in, err, tt.wantErr)
			}
			continue
		}
		if err != nil || got != wantOf(tt.want) {
			t.Errorf("%s(%q) = %v, %v; want %s", name, tt.in, got, err, tt.want)
		}
	}
}

func TestParsePrefixes(t *testing.T) {
	got, err := ParsePrefixes([]string{"10.96.0.0/16", "169.254.20.10", "fd00::/108"})
	if err != nil {
		t.Fatal(err)
	}
	want := pfxs("10.96.0.0/16", "169.254.20.10/32", "fd00::/108")
	if len(got) != len(want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("entry %d = %s, want %s", i, got[i], want[i])
		}
	}

	if got, err := ParsePrefixes(nil); err != nil || got != nil {
		t.Errorf("ParsePrefixes(nil) = %v, %v", got, err)
	}

	got, err = ParsePrefixes([]string{"10.0.0.0/8", "10.0.0.300/32", "x/y"})
	if err == nil {
		t.Fatalf("no error, got %v", got)
	}
	if got != nil {
		t.Errorf("got %v alongside an error", got)
	}
	msg := err.Error()
	for _, w := range []string{`entry 1: "10.0.0.300/32" is not a CIDR`, `entry 2: "x/y" is not a CIDR`} {
		if !strings.Contains(msg, w) {
			t.Errorf("error %q does not contain %q", msg, w)
		}
	}
	if strings.Contains(msg, "entry 0") {
		t.Errorf("error %q blames the good entry 0", msg)
	}
}

func TestParseAddr(t *testing.T) {
	tests := []parseCase{
		{in: "10.96.0.1", want: "10.96.0.1"},
		{in: "::ffff:10.96.0.1", want: "10.96.0.1"},
		{in: "fd00::a", want: "fd00::a"},
		{in: "10.96.0.0/24", wantErr: `"10.96.0.0/24" is not an IP address`},
		{in: "fe80::1%eth0", wantErr: `"fe80::1%eth0" has an IPv6 zone; give the address without %eth0`},
	}
	checkParse(t, "ParseAddr", ParseAddr, netip.MustParseAddr, tests)
}

func TestMapped(t *testing.T) {
	tests := []struct {
		in   string
		want [16]byte
	}{
		{"10.96.0.1", [16]byte{10: 0xff, 11: 0xff, 12: 10, 13: 96, 14: 0, 15: 1}},
		{"::ffff:10.96.0.1", [16]byte{10: 0xff, 11: 0xff, 12: 10, 13: 96, 14: 0, 15: 1}},
		{"fd00::1", [16]byte{0: 0xfd, 15: 1}},
		{"fe80::1%eth0", [16]byte{0: 0xfe, 1: 0x80, 15: 1}},
	}
	for _, tt := range tests {
		if got := Mapped(netip.MustParseAddr(tt.in)); got != tt.want {
			t.Errorf("Mapped(%s) = % x, want % x", tt.in, got, tt.want)
		}
	}
	if got := Mapped(netip.Addr{}); got != [16]byte{} {
		t.Errorf("Mapped(zero) = % x", got)
	}
}

func TestMappedPrefix(t *testing.T) {
	tests := []struct {
		in       string
		wantBits int
		wantAddr [16]byte
	}{
		{"10.96.0.0/12", 108, [16]byte{10: 0xff, 11: 0xff, 12: 10, 13: 96}},
		{"10.96.0.1/12", 108, [16]byte{10: 0xff, 11: 0xff, 12: 10, 13: 96}}, // masked
		{"169.254.20.10/32", 128, [16]byte{10: 0xff, 11: 0xff, 12: 169, 13: 254, 14: 20, 15: 10}},
		{"0.0.0.0/0", 96, [16]byte{10: 0xff, 11: 0xff}},
		{"::ffff:10.96.0.0/108", 108, [16]byte{10: 0xff, 11: 0xff, 12: 10, 13: 96}}, // same key as the IPv4 form
		{"fd00::/64", 64, [16]byte{0: 0xfd}},
		{"::/0", 0, [16]byte{}},
	}
	for _, tt := range tests {
		bits, addr := MappedPrefix(pfx(tt.in))
		if bits != tt.wantBits || addr != tt.wantAddr {
			t.Errorf("MappedPrefix(%s) = %d, % x; want %d, % x", tt.in, bits, addr, tt.wantBits, tt.wantAddr)
		}
	}
	if bits, _ := MappedPrefix(netip.Prefix{}); bits != -1 {
		t.Errorf("MappedPrefix(invalid) bits = %d, want -1", bits)
	}
}

// TestMappedPrefixContainsMapped checks the property the datapath relies on:
// an IPv4 prefix's mapped form contains exactly the mapped forms of its
// addresses, so an LPM lookup on Mapped(addr) finds it.
func TestMappedPrefixContainsMapped(t *testing.T) {
	p := pfx("10.96.0.0/12")
	bits, key := MappedPrefix(p)
	mp := netip.PrefixFrom(netip.AddrFrom16(key), bits)
	for _, s := range []string{"10.96.0.0", "10.111.255.255", "10.99.1.2", "10.112.0.0", "10.95.255.255"} {
		a := netip.MustParseAddr(s)
		if got, want := mp.Contains(netip.AddrFrom16(Mapped(a))), p.Contains(a); got != want {
			t.Errorf("%s: mapped containment %v, IPv4 containment %v", s, got, want)
		}
	}
}
