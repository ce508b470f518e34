// Package datapath is the API over the pinned datapath, used by the plugin
// and the agent alike: typed access to the pinned maps (the endpoint
// registry, the steering and service sets, the config word, the counters),
// the one endpoint type (Endpoint), and the one way an endpoint enters and
// leaves (AddEndpoint, RemoveEndpoint), which attaches its programs through
// internal/attach. It never loads programs (that is package loader).
package datapath

import (
	"fmt"
	"net"
	"net/netip"

	"github.com/cilium/ebpf"

	"github.com/underpass-cni/underpass/internal/cidrs"
	"github.com/underpass-cni/underpass/internal/loader"
)

// IPKey encodes an address the way the programs look it up: IPv4 as
// IPv4-mapped IPv6.
func IPKey(a netip.Addr) loader.IPKey {
	return loader.IPKey{Addr: a.As16()}
}

// EpIPKey encodes an endpoint address on a parent, as ep_by_ip is keyed.
func EpIPKey(a netip.Addr, parentIfindex int) loader.EpIPKey {
	return loader.EpIPKey{Addr: a.As16(), ParentIfindex: uint32(parentIfindex)}
}

// AddrOf decodes an IPKey.
func AddrOf(k loader.IPKey) netip.Addr {
	return netip.AddrFrom16(k.Addr).Unmap()
}

// LPMKey encodes a prefix for the LPM tries (IPv4 as /96+len).
func LPMKey(p netip.Prefix) loader.LPMKey {
	p = p.Masked()
	bits := p.Bits()
	if p.Addr().Is4() {
		bits += 96
	}
	return loader.LPMKey{Prefixlen: uint32(bits), Addr: p.Addr().As16()}
}

// PrefixOf decodes an LPMKey in canonical form (cidrs.Canonical): host
// bits cleared, IPv4 as IPv4. Keys written by hand (bpftool) may carry host
// bits or put an IPv4-mapped address under a /96-or-shorter prefix, which
// is an IPv6 prefix then.
func PrefixOf(k loader.LPMKey) netip.Prefix {
	return cidrs.Canonical(netip.PrefixFrom(netip.AddrFrom16(k.Addr), int(k.Prefixlen)))
}

// MACKey encodes a MAC address on a parent, as ep_by_mac is keyed.
func MACKey(mac net.HardwareAddr, parentIfindex int) loader.MACKey {
	k := loader.MACKey{ParentIfindex: uint32(parentIfindex)}
	copy(k.Mac[:], mac)
	return k
}

// cString fills a fixed C char array, truncating and NUL-terminating.
func cString(dst []int8, s string) {
	for i := range dst {
		dst[i] = 0
	}
	for i := 0; i < len(s) && i < len(dst)-1; i++ {
		dst[i] = int8(s[i])
	}
}

// goString reads a C char array.
func goString(src []int8) string {
	b := make([]byte, 0, len(src))
	for _, c := range src {
		if c == 0 {
			break
		}
		b = append(b, byte(c))
	}
	return string(b)
}

// readAll reads every entry of m into a map keyed by key(k), the value by
// val(v) (identity for most maps; a per-CPU map sums). what names the map
// in the error.
func readAll[K comparable, V any, OK comparable, OV any](m *ebpf.Map, what string, key func(K) OK, val func(V) OV) (map[OK]OV, error) {
	out := map[OK]OV{}
	var k K
	var v V
	it := m.Iterate()
	for it.Next(&k, &v) {
		out[key(k)] = val(v)
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list %s: %w", what, err)
	}
	return out, nil
}

func same[T any](v T) T { return v }
