package datapath

import (
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"slices"

	"github.com/cilium/ebpf"
	"github.com/underpass-cni/underpass/internal/cidrs"
	"github.com/underpass-cni/underpass/internal/loader"
)

func isNotExist(err error) bool { return errors.Is(err, ebpf.ErrKeyNotExist) }

// SyncServiceCIDRs makes svc_cidrs hold exactly want.
func SyncServiceCIDRs(m *loader.Maps, want []netip.Prefix) error {
	vals := make(map[netip.Prefix]uint32, len(want))
	for _, p := range want {
		vals[cidrs.Canonical(p)] = 1
	}
	if err := syncFiltered(m, prefilterSvc, m.SvcCidrs, vals); err != nil {
		return fmt.Errorf("sync service CIDRs: %w", err)
	}
	return nil
}

// HostSet is what host_cidrs holds: the node's addresses (LOCAL: ARP/ND for
// them is cloned to the host) and hostCIDRs (STEER).
type HostSet map[netip.Prefix]loader.HostFlags

// Add merges flags for p; both spellings of an IPv4 prefix are one entry.
func (s HostSet) Add(p netip.Prefix, f loader.HostFlags) { s[cidrs.Canonical(p)] |= f }

// SyncHostCIDRs makes host_cidrs hold exactly want.
func SyncHostCIDRs(m *loader.Maps, want HostSet) error {
	vals := make(map[netip.Prefix]uint32, len(want))
	for p, f := range want {
		vals[cidrs.Canonical(p)] |= uint32(f) // a HostSet built by hand may hold both spellings
	}
	if err := syncFiltered(m, prefilterHost, m.HostCidrs, vals); err != nil {
		return fmt.Errorf("sync host CIDRs: %w", err)
	}
	return nil
}

// Indexes of the prefilter array, as in bpf/underpass.c.
const (
	prefilterSvc  = uint32(0)
	prefilterHost = uint32(1)
)

// syncFiltered syncs a trie and its prefilter so that the prefilter is a
// superset of the trie at every moment: first it covers old and new
// prefixes, then the trie changes, then it narrows to the new set.
func syncFiltered(m *loader.Maps, which uint32, trie *ebpf.Map, want map[netip.Prefix]uint32) error {
	have, err := LPMEntries(trie)
	if err != nil {
		return err
	}
	if maps.Equal(have, want) {
		// Rewrite the filter alone: cheap, and it repairs a zeroed one.
		return writePrefilter(m, which, slices.Collect(maps.Keys(want)))
	}
	union := make([]netip.Prefix, 0, len(have)+len(want))
	for p := range have {
		union = append(union, p)
	}
	for p := range want {
		if _, ok := have[p]; !ok {
			union = append(union, p)
		}
	}
	if err := writePrefilter(m, which, union); err != nil {
		return err
	}
	if err := syncLPM(trie, have, want); err != nil {
		return err
	}
	final := make([]netip.Prefix, 0, len(want))
	for p := range want {
		final = append(final, p)
	}
	return writePrefilter(m, which, final)
}

// BuildPrefilter lays prefixes out in the filter; more than fit of one family
// leaves that family inexact, so the program consults the trie for it.
func BuildPrefilter(prefixes []netip.Prefix) loader.Prefilter {
	var f loader.Prefilter
	n4, n6 := 0, 0
	f.Exact4, f.Exact6 = 1, 1
	addV4 := func(p netip.Prefix) {
		if n4 == loader.PrefilterV4 {
			f.Exact4 = 0
			return
		}
		b := p.Addr().As4()
		mask := net.CIDRMask(p.Bits(), 32)
		f.V4[n4] = loader.Net4{Addr: binary.NativeEndian.Uint32(b[:]), Mask: binary.NativeEndian.Uint32(mask), Valid: 1}
		n4++
	}
	for _, p := range prefixes {
		p = cidrs.Canonical(p)
		if !p.IsValid() {
			continue
		}
		a := p.Addr()
		if a.Is4() {
			addV4(p)
			continue
		}
		// An IPv6 prefix over ::ffff:0:0/96 matches every IPv4 address in
		// the trie (the config refuses such prefixes; a hand-made entry
		// may still hold one).
		if cidrs.CoversIPv4(p) {
			addV4(netip.PrefixFrom(netip.IPv4Unspecified(), 0))
		}
		if n6 == loader.PrefilterV6 {
			f.Exact6 = 0
			continue
		}
		b := a.As16()
		mask := net.CIDRMask(p.Bits(), 128)
		f.V6[n6] = loader.Net6{
			Addr:  [2]uint64{binary.NativeEndian.Uint64(b[:8]), binary.NativeEndian.Uint64(b[8:])},
			Mask:  [2]uint64{binary.NativeEndian.Uint64(mask[:8]), binary.NativeEndian.Uint64(mask[8:])},
			Valid: 1,
		}
		n6++
	}
	return f
}

// writePrefilter replaces set which's prefilter so that no reader ever
// trusts slots that are half-written. An array map update is a plain copy:
// a program on another CPU can read a mix of the old and the new value. So
// the slots are never changed under exact = 1: first the old slots lose
// their trust, then the new slots are written untrusted (exact = 0 sends
// every lookup to the trie, which is right whatever the slots hold), then
// they are trusted. Any mix of two consecutive writes is safe; a reader
// would have to span three map updates (it runs for well under a
// microsecond, in softirq) to see anything else.
func writePrefilter(m *loader.Maps, which uint32, prefixes []netip.Prefix) error {
	f := BuildPrefilter(slices.SortedFunc(slices.Values(prefixes), comparePrefix))
	var cur loader.Prefilter
	if err := m.Prefilter.Lookup(which, &cur); err == nil && cur == f {
		return nil
	}
	for _, v := range prefilterSteps(cur, f) {
		if err := prefilterUpdate(m, which, &v); err != nil {
			return fmt.Errorf("write prefilter: %w", err)
		}
	}
	return nil
}

// prefilterSteps are the values written to go from cur to f.
func prefilterSteps(cur, f loader.Prefilter) []loader.Prefilter {
	distrust := func(p loader.Prefilter) loader.Prefilter {
		p.Exact4, p.Exact6 = 0, 0
		return p
	}
	return []loader.Prefilter{distrust(cur), distrust(f), f}
}

// prefilterUpdate is the one write of a prefilter value (a test records it).
var prefilterUpdate = func(m *loader.Maps, which uint32, v *loader.Prefilter) error {
	return m.Prefilter.Update(which, v, ebpf.UpdateAny)
}

// syncLPM moves a trie from have (its current entries) to want. It adds and
// updates before it deletes, so a prefix that stays is never missing for a
// moment.
func syncLPM(m *ebpf.Map, have, want map[netip.Prefix]uint32) error {
	for p, val := range want {
		if old, ok := have[p]; ok && old == val {
			continue
		}
		key := LPMKey(p)
		if err := m.Update(&key, &val, ebpf.UpdateAny); err != nil {
			return fmt.Errorf("add %s: %w", p, err)
		}
	}
	for p := range have {
		if _, ok := want[p]; ok {
			continue
		}
		key := LPMKey(p)
		if err := m.Delete(&key); err != nil && !isNotExist(err) {
			return fmt.Errorf("delete %s: %w", p, err)
		}
	}
	return nil
}

// LPMEntries reads an LPM map (svc_cidrs or host_cidrs).
func LPMEntries(m *ebpf.Map) (map[netip.Prefix]uint32, error) {
	return readAll(m, "prefixes", PrefixOf, same[uint32])
}

// AddLiveService marks a VIP live.
func AddLiveService(m *loader.Maps, a netip.Addr) error {
	k := IPKey(a)
	if err := m.LiveSvcs.Update(&k, uint32(1), ebpf.UpdateAny); err != nil {
		return fmt.Errorf("add live service %s: %w", a, err)
	}
	return nil
}

// DeleteLiveService makes a VIP stale; absent is fine.
func DeleteLiveService(m *loader.Maps, a netip.Addr) error {
	k := IPKey(a)
	if err := m.LiveSvcs.Delete(&k); err != nil && !isNotExist(err) {
		return fmt.Errorf("delete live service %s: %w", a, err)
	}
	return nil
}

// LiveServices lists the live VIPs.
func LiveServices(m *loader.Maps) (map[netip.Addr]bool, error) {
	return readAll(m.LiveSvcs, "live services", AddrOf, func(uint32) bool { return true })
}

// SyncLiveServices makes live_svcs hold exactly want: additions first, then
// removals, so a VIP that stays live never looks stale in between.
func SyncLiveServices(m *loader.Maps, want map[netip.Addr]bool) (added, removed int, err error) {
	have, err := LiveServices(m)
	if err != nil {
		return 0, 0, err
	}
	for a := range want {
		if have[a] {
			continue
		}
		if err := AddLiveService(m, a); err != nil {
			return added, removed, err
		}
		added++
	}
	for a := range have {
		if want[a] {
			continue
		}
		if err := DeleteLiveService(m, a); err != nil {
			return added, removed, err
		}
		removed++
	}
	return added, removed, nil
}

// comparePrefix orders prefixes by address, then length: the same set is
// laid out the same way every time.
func comparePrefix(a, b netip.Prefix) int {
	if c := a.Addr().Compare(b.Addr()); c != 0 {
		return c
	}
	return a.Bits() - b.Bits()
}
