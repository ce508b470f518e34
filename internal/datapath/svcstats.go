package datapath

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/cilium/ebpf"

	"github.com/underpass-cni/underpass/internal/loader"
)

// ServiceCounter is one frontend's traffic, summed over the CPUs.
type ServiceCounter struct {
	VIP               netip.Addr
	Port              uint16
	Proto             uint8
	Service, PortName string
	// ToBackend: the clients' frames translated; FromBackend: the replies
	// given the VIP back.
	ToBackend, FromBackend loader.Counter
	Flows                  uint64 // flows that picked a backend
	Failures               uint64 // frames with no backend to give
}

// ServiceCounters reads every frontend's counters (svc_counters) with its
// name (svc_names). A frontend without counters is left out.
func ServiceCounters(m *loader.Maps) ([]ServiceCounter, error) {
	svcs, err := readAll(m.SvcFrontends, "service frontends", same[loader.SvcKey], same[loader.Svc])
	if err != nil {
		return nil, err
	}
	out := make([]ServiceCounter, 0, len(svcs))
	for k, s := range svcs {
		var per []loader.SvcCounters
		if err := m.SvcCounters.Lookup(s.Id, &per); err != nil {
			if isNotExist(err) { // removed since, or written by an older build
				continue
			}
			return nil, fmt.Errorf("read counters of frontend %d: %w", s.Id, err)
		}
		c := ServiceCounter{VIP: netip.AddrFrom16(k.Addr).Unmap(), Port: htons(k.Port), Proto: k.L4proto}
		var n loader.SvcName
		if err := m.SvcNames.Lookup(s.Id, &n); err == nil {
			c.Service, c.PortName = goString(n.Service[:]), goString(n.Port[:])
		}
		for _, p := range per {
			c.ToBackend.Add(p.ToBackend)
			c.FromBackend.Add(p.FromBackend)
			c.Flows += p.Flows
			c.Failures += p.Failures
		}
		out = append(out, c)
	}
	return out, nil
}

// TableUsage is how full one of the programs' flow tables is. They are LRU
// maps: when full, a new flow evicts the least recently used one, which
// then picks a backend afresh (a TCP connection on it is reset by the new
// backend). Entries near Capacity is the warning.
type TableUsage struct {
	Name              string
	Entries, Capacity int
}

// FlowTableUsage counts the entries of the Service flow tables (svc_ct,
// svc_rev, svc_affinity) in batches: a full svc_ct (131,072 flows) is read
// in about 32 system calls.
func FlowTableUsage(m *loader.Maps) ([]TableUsage, error) {
	ct, err := countEntries[loader.CtKey, loader.Ct](m.SvcCt)
	if err != nil {
		return nil, fmt.Errorf("count svc_ct: %w", err)
	}
	rev, err := countEntries[loader.RevKey, loader.Rev](m.SvcRev)
	if err != nil {
		return nil, fmt.Errorf("count svc_rev: %w", err)
	}
	aff, err := countEntries[loader.AffinityKey, loader.Affinity](m.SvcAffinity)
	if err != nil {
		return nil, fmt.Errorf("count svc_affinity: %w", err)
	}
	return []TableUsage{
		{"svc_ct", ct, int(m.SvcCt.MaxEntries())},
		{"svc_rev", rev, int(m.SvcRev.MaxEntries())},
		{"svc_affinity", aff, int(m.SvcAffinity.MaxEntries())},
	}, nil
}

// countEntries counts m's entries (see walkEntries).
func countEntries[K, V any](m *ebpf.Map) (int, error) {
	n := 0
	err := walkEntries(m, func(*K, *V) { n++ })
	return n, err
}

// walkEntries calls fn on each of m's entries, read with batch lookups, or
// one by one where the kernel has no batch operations for m's type.
func walkEntries[K, V any](m *ebpf.Map, fn func(*K, *V)) error {
	const chunk = 4096
	keys, vals := make([]K, chunk), make([]V, chunk)
	var cursor ebpf.MapBatchCursor
	for {
		n, err := m.BatchLookup(&cursor, keys, vals, nil)
		for i := range n {
			fn(&keys[i], &vals[i])
		}
		switch {
		case errors.Is(err, ebpf.ErrKeyNotExist):
			return nil
		case errors.Is(err, ebpf.ErrNotSupported):
			var k K
			var v V
			it := m.Iterate()
			for it.Next(&k, &v) {
				fn(&k, &v)
			}
			return it.Err()
		case err != nil:
			return err
		}
	}
}
