// Package cidrs holds small net/netip helpers shared by the config, the agent
// and the CNI plugin: parsing address lists, overlap checks, and the
// IPv4-mapped encoding the datapath uses to keep both families in one LPM trie.
package cidrs

import (
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// mappedRange is ::ffff:0:0/96, where IPv4-mapped IPv6 addresses live.
var mappedRange = netip.PrefixFrom(netip.AddrFrom16([16]byte{10: 0xff, 11: 0xff}), 96)

// Canonical masks p and rewrites an IPv4-mapped IPv6 prefix
// (::ffff:a.b.c.d/96+n) as its IPv4 form (a.b.c.d/n). The datapath keys both
// spellings identically, so every comparison must see them as one family.
// An invalid prefix is returned unchanged.
func Canonical(p netip.Prefix) netip.Prefix {
	if !p.IsValid() {
		return p
	}
	p = p.Masked()
	if a := p.Addr(); a.Is4In6() && p.Bits() >= 96 {
		return netip.PrefixFrom(a.Unmap(), p.Bits()-96)
	}
	return p
}

// CoversIPv4 reports whether p is an IPv6 prefix that contains the whole
// IPv4-mapped range ::ffff:0:0/96 (for example ::/0 or ::/64). In the
// datapath's single trie such a prefix also matches every IPv4 address, which
// is almost certainly not what whoever wrote it meant.
func CoversIPv4(p netip.Prefix) bool {
	p = Canonical(p)
	return p.IsValid() && p.Addr().Is6() && p.Bits() <= 96 && p.Contains(mappedRange.Addr())
}

// Overlaps reports whether a and b share at least one address. Prefixes of
// different families never overlap (an IPv4-mapped IPv6 prefix counts as IPv4,
// see Canonical); invalid prefixes overlap nothing.
func Overlaps(a, b netip.Prefix) bool {
	if !a.IsValid() || !b.IsValid() {
		return false
	}
	a, b = Canonical(a), Canonical(b)
	if a.Addr().Is4() != b.Addr().Is4() {
		return false
	}
	return a.Overlaps(b)
}

// OverlapError says that a prefix of one set overlaps a prefix of another.
// Name1/Prefix1 is the side the message asks the user to change.
type OverlapError struct {
	Name1   string
	Prefix1 netip.Prefix
	Name2   string
	Prefix2 netip.Prefix
}

// Shared returns the addresses both prefixes contain. Two overlapping prefixes
// are always nested, so that is the longer (more specific) of the two.
func (e *OverlapError) Shared() netip.Prefix {
	a, b := Canonical(e.Prefix1), Canonical(e.Prefix2)
	if a.Bits() >= b.Bits() {
		return a
	}
	return b
}

func (e *OverlapError) Error() string {
	return fmt.Sprintf("%s %s overlaps %s %s: addresses in %s would count as both; pick a %s outside every %s",
		e.Name1, Canonical(e.Prefix1), e.Name2, Canonical(e.Prefix2), e.Shared(), e.Name1, e.Name2)
}

// CheckDisjoint returns one *OverlapError for every pair (p1 in set1, p2 in
// set2) that overlaps, joined with errors.Join, or nil when the sets are
// disjoint. name1 and name2 describe the sets in the message (for example
// "service CIDR" and "node subnet"); set1 is the one the message asks to move.
func CheckDisjoint(name1 string, set1 []netip.Prefix, name2 string, set2 []netip.Prefix) error {
	var errs []error
	for _, p1 := range set1 {
		for _, p2 := range set2 {
			if Overlaps(p1, p2) {
				errs = append(errs, &OverlapError{Name1: name1, Prefix1: p1, Name2: name2, Prefix2: p2})
			}
		}
	}
	return errors.Join(errs...)
}

// ParsePrefix parses a CIDR, or a bare address as a single-host prefix (/32 or
// /128), and returns it in Canonical form: host bits are cleared (as
// net.ParseCIDR callers expect) and IPv4-mapped IPv6 becomes IPv4.
func ParsePrefix(s string) (netip.Prefix, error) {
	if strings.Contains(s, "/") {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return netip.Prefix{}, fmt.Errorf("%q is not a CIDR (%s)", s, reason(err, s))
		}
		return Canonical(p), nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("%q is not a CIDR or IP address (%s)", s, reason(err, s))
	}
	if a.Zone() != "" {
		return netip.Prefix{}, zoneError(s, a)
	}
	a = a.Unmap()
	return netip.PrefixFrom(a, a.BitLen()), nil
}

// ParsePrefixes parses every entry with ParsePrefix. On failure it returns nil
// and every bad entry's error, joined, each naming the entry's index.
func ParsePrefixes(list []string) ([]netip.Prefix, error) {
	var (
		out  []netip.Prefix
		errs []error
	)
	for i, s := range list {
		p, err := ParsePrefix(s)
		if err != nil {
			errs = append(errs, fmt.Errorf("entry %d: %w", i, err))
			continue
		}
		out = append(out, p)
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return out, nil
}

// ParseAddr parses a single IP address without a zone and unmaps
// IPv4-mapped IPv6, so "::ffff:10.96.0.1" and "10.96.0.1" compare equal.
// Zones are refused because the datapath matches on bare addresses.
func ParseAddr(s string) (netip.Addr, error) {
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("%q is not an IP address (%s)", s, reason(err, s))
	}
	if a.Zone() != "" {
		return netip.Addr{}, zoneError(s, a)
	}
	return a.Unmap(), nil
}

func zoneError(s string, a netip.Addr) error {
	return fmt.Errorf("%q has an IPv6 zone; give the address without %%%s", s, a.Zone())
}

// reason strips netip's "netip.ParsePrefix("…"): ParseAddr("…"): " preamble
// so the detail does not repeat the input the caller already quoted. When the
// format differs (another Go release), the full message is kept.
func reason(err error, in string) string {
	msg := err.Error()
	for {
		var cut bool
		for _, fn := range []string{"netip.ParsePrefix", "ParseAddr"} {
			if after, ok := strings.CutPrefix(msg, fn+"("); ok {
				if i := strings.Index(after, "): "); i >= 0 {
					msg, cut = after[i+3:], true
				}
			}
		}
		if !cut {
			break
		}
	}
	if msg == "" {
		return "parse error in " + strconv.Quote(in)
	}
	return msg
}

// Mapped returns addr as 16 bytes, IPv4 as IPv4-mapped IPv6 (::ffff:a.b.c.d),
// the key format of the datapath's dual-family LPM tries. The zone is dropped;
// the zero Addr gives all zeros.
func Mapped(addr netip.Addr) [16]byte {
	if !addr.IsValid() {
		return [16]byte{}
	}
	return addr.As16()
}

// MappedPrefix returns p (masked) in the same encoding as Mapped: an IPv4 /n
// becomes ::ffff:a.b.c.d/(n+96), so one trie holds both families without an
// IPv4 prefix ever matching an IPv6 key. For an invalid prefix bits is -1, which
// no trie accepts, rather than 0, which would match everything.
func MappedPrefix(p netip.Prefix) (bits int, addr [16]byte) {
	if !p.IsValid() {
		return -1, [16]byte{}
	}
	p = p.Masked()
	bits = p.Bits()
	if p.Addr().Is4() {
		bits += 96
	}
	return bits, p.Addr().As16()
}
