package datapath

import (
	"cmp"
	"errors"
	"fmt"
	"math"
	"net/netip"
	"slices"
	"time"

	"github.com/cilium/ebpf"

	"github.com/underpass-cni/underpass/internal/loader"
)

// Frontend is one Service port translated at the pod (services.mode: ebpf):
// a pod's flow to VIP:Port over Proto goes to one of Backends, chosen when
// the flow starts. No backends: the Service is stale (the drop/reject guard
// applies). The agent is the only writer of the frontend tables
// (svc_frontends, svc_slots, svc_backends); the programs write the flow
// state (svc_ct, svc_rev, svc_affinity).
type Frontend struct {
	VIP      netip.Addr
	Port     uint16
	Proto    uint8 // 6 TCP, 17 UDP, 132 SCTP
	Backends []netip.AddrPort
	// Affinity is sessionAffinity: ClientIP's timeout; 0: none.
	Affinity time.Duration
}

// The L4 protocols a frontend may have.
const (
	ProtoTCP  = 6
	ProtoUDP  = 17
	ProtoSCTP = 132
)

// maxSlots bounds a frontend's backends: the programs pick a slot in 16 bits.
const maxSlots = math.MaxUint16

func (f *Frontend) key() loader.SvcKey {
	return loader.SvcKey{Addr: f.VIP.As16(), Port: htons(f.Port), L4proto: f.Proto}
}

func (f *Frontend) check() error {
	switch {
	case !f.VIP.IsValid():
		return errors.New("no VIP")
	case f.Proto != ProtoTCP && f.Proto != ProtoUDP && f.Proto != ProtoSCTP:
		return fmt.Errorf("protocol %d: only TCP, UDP and SCTP", f.Proto)
	case len(f.Backends) > maxSlots:
		return fmt.Errorf("%d backends, at most %d", len(f.Backends), maxSlots)
	case f.Affinity < 0 || f.Affinity > math.MaxUint32*time.Second:
		return fmt.Errorf("affinity timeout %s out of range", f.Affinity)
	}
	for _, b := range f.Backends {
		if !b.IsValid() || b.Addr().Is4() != f.VIP.Unmap().Is4() {
			return fmt.Errorf("backend %s: not an address of the VIP's family", b)
		}
	}
	return nil
}

func (f *Frontend) String() string {
	return fmt.Sprintf("%s/%d", netip.AddrPortFrom(f.VIP, f.Port), f.Proto)
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

func backendKey(b netip.AddrPort) loader.Backend {
	return loader.Backend{Addr: b.Addr().As16(), Port: htons(b.Port())}
}

// frontendState is what the maps hold now.
type frontendState struct {
	svcs     map[loader.SvcKey]loader.Svc
	backends map[loader.Backend]uint32 // backend -> id
}

func readFrontends(m *loader.Maps) (*frontendState, error) {
	svcs, err := readAll(m.SvcFrontends, "service frontends", same[loader.SvcKey], same[loader.Svc])
	if err != nil {
		return nil, err
	}
	byID, err := readAll(m.SvcBackends, "service backends", same[uint32], same[loader.Backend])
	if err != nil {
		return nil, err
	}
	st := &frontendState{svcs: svcs, backends: make(map[loader.Backend]uint32, len(byID))}
	for id, b := range byID {
		st.backends[b] = id
	}
	return st, nil
}

// lowestFree is the smallest id from 1 not in used.
func lowestFree(used map[uint32]bool, next *uint32) uint32 {
	for used[*next] || *next == 0 {
		*next++
	}
	used[*next] = true
	return *next
}

// SyncFrontends makes the frontend tables hold exactly want. A frontend
// that changes never shows a packet half of it: its backends are written
// first, then its slots in the revision the programs do not read, then the
// frontend flips to that revision. Backends no frontend uses any more go
// last; a flow still on one picks another on its next packet.
func SyncFrontends(m *loader.Maps, want []Frontend) error {
	for i := range want {
		if err := want[i].check(); err != nil {
			return fmt.Errorf("frontend %s: %w", &want[i], err)
		}
	}
	st, err := readFrontends(m)
	if err != nil {
		return err
	}
	usedSvc, usedBe := map[uint32]bool{}, map[uint32]bool{}
	for _, s := range st.svcs {
		usedSvc[s.Id] = true
	}
	for _, id := range st.backends {
		usedBe[id] = true
	}
	var nextSvc, nextBe uint32 = 1, 1
	keep := map[loader.SvcKey]bool{}
	liveBe := map[uint32]bool{}
	var errs []error
	for i := range want {
		f := &want[i]
		ids := make([]uint32, 0, len(f.Backends))
		for _, b := range f.Backends {
			k := backendKey(b)
			id, ok := st.backends[k]
			if !ok {
				id = lowestFree(usedBe, &nextBe)
				if err := m.SvcBackends.Update(id, &k, ebpf.UpdateAny); err != nil {
					return fmt.Errorf("write backend %s: %w", b, err)
				}
				st.backends[k] = id
			}
			ids = append(ids, id)
			liveBe[id] = true
		}
		key := f.key()
		keep[key] = true
		cur, exists := st.svcs[key]
		svc := loader.Svc{Id: cur.Id, Rev: cur.Rev ^ 1, AffinitySec: uint32(f.Affinity / time.Second)}
		if !exists {
			svc = loader.Svc{Id: lowestFree(usedSvc, &nextSvc), AffinitySec: svc.AffinitySec}
		}
		if f.Affinity > 0 {
			svc.Flags = loader.SvcAffinity
			svc.AffinitySec = max(svc.AffinitySec, 1)
		}
		svc.Count = uint16(len(ids))
		if exists && cur.Count == svc.Count && cur.Flags == svc.Flags && cur.AffinitySec == svc.AffinitySec &&
			slotsEqual(m, cur.Id, cur.Rev, ids) {
			continue // unchanged: no flip
		}
		if err := writeSlots(m, svc.Id, svc.Rev, ids); err != nil {
			errs = append(errs, fmt.Errorf("frontend %s: %w", f, err))
			continue
		}
		if err := m.SvcFrontends.Update(&key, &svc, ebpf.UpdateAny); err != nil {
			errs = append(errs, fmt.Errorf("write frontend %s: %w", f, err))
		}
	}
	for key, s := range st.svcs {
		if keep[key] {
			continue
		}
		if err := m.SvcFrontends.Delete(&key); err != nil && !isNotExist(err) {
			errs = append(errs, fmt.Errorf("delete frontend %d: %w", s.Id, err))
			continue
		}
		errs = append(errs, deleteSlots(m, s.Id, 0, 0), deleteSlots(m, s.Id, 1, 0))
	}
	for b, id := range st.backends {
		if liveBe[id] {
			continue
		}
		if err := m.SvcBackends.Delete(id); err != nil && !isNotExist(err) {
			errs = append(errs, fmt.Errorf("delete backend %d (%x): %w", id, b.Addr, err))
		}
	}
	return errors.Join(errs...)
}

// writeSlots writes ids as the slots of (svc, rev) and removes the slots of
// that revision beyond them (left from an update before the last).
func writeSlots(m *loader.Maps, svc uint32, rev uint8, ids []uint32) error {
	for i, id := range ids {
		k := loader.SlotKey{SvcId: svc, Slot: uint16(i), Rev: rev}
		if err := m.SvcSlots.Update(&k, id, ebpf.UpdateAny); err != nil {
			return fmt.Errorf("write slot %d: %w", i, err)
		}
	}
	return deleteSlots(m, svc, rev, len(ids))
}

// deleteSlots deletes the slots of (svc, rev) from slot from on, up to the
// first missing one (slots are written densely).
func deleteSlots(m *loader.Maps, svc uint32, rev uint8, from int) error {
	for i := from; i <= maxSlots; i++ {
		k := loader.SlotKey{SvcId: svc, Slot: uint16(i), Rev: rev}
		err := m.SvcSlots.Delete(&k)
		if isNotExist(err) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("delete slot %d of frontend %d: %w", i, svc, err)
		}
	}
	return nil
}

func slotsEqual(m *loader.Maps, svc uint32, rev uint8, ids []uint32) bool {
	for i, want := range ids {
		var got uint32
		k := loader.SlotKey{SvcId: svc, Slot: uint16(i), Rev: rev}
		if m.SvcSlots.Lookup(&k, &got) != nil || got != want {
			return false
		}
	}
	return true
}

// Frontends reads the frontend tables back, sorted by VIP, port, protocol.
func Frontends(m *loader.Maps) ([]Frontend, error) {
	st, err := readFrontends(m)
	if err != nil {
		return nil, err
	}
	byID := make(map[uint32]loader.Backend, len(st.backends))
	for b, id := range st.backends {
		byID[id] = b
	}
	out := make([]Frontend, 0, len(st.svcs))
	for k, s := range st.svcs {
		f := Frontend{VIP: netip.AddrFrom16(k.Addr).Unmap(), Port: htons(k.Port), Proto: k.L4proto}
		if s.Flags&loader.SvcAffinity != 0 {
			f.Affinity = time.Duration(s.AffinitySec) * time.Second
		}
		for i := range int(s.Count) {
			var id uint32
			sk := loader.SlotKey{SvcId: s.Id, Slot: uint16(i), Rev: s.Rev}
			if err := m.SvcSlots.Lookup(&sk, &id); err != nil {
				return nil, fmt.Errorf("frontend %s slot %d: %w", &f, i, err)
			}
			b, ok := byID[id]
			if !ok {
				return nil, fmt.Errorf("frontend %s slot %d: backend %d missing", &f, i, id)
			}
			f.Backends = append(f.Backends, netip.AddrPortFrom(netip.AddrFrom16(b.Addr).Unmap(), htons(b.Port)))
		}
		out = append(out, f)
	}
	slices.SortFunc(out, func(a, b Frontend) int {
		return cmp.Or(a.VIP.Compare(b.VIP), cmp.Compare(a.Port, b.Port), cmp.Compare(a.Proto, b.Proto))
	})
	return out, nil
}

// ServiceStats reads the node-wide counters of Service translation, by
// loader.SvcStat.
func ServiceStats(m *loader.Maps) ([]loader.Counter, error) {
	return readCounters(m.SvcStats, int(loader.SvcStatMax))
}
