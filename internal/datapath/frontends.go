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
	// Draining backends keep the flows they have but get no new one: a
	// terminating pod still serving its connections, as kube-proxy keeps
	// them (its conntrack entries stay).
	Draining []netip.AddrPort
	// Affinity is sessionAffinity: ClientIP's timeout; 0: none.
	Affinity time.Duration
	// Service ("namespace/name") and PortName (the port's name, or its
	// number) say which Service port this is: the per-Service metrics and
	// underpassctl show them (svc_names). Empty: unnamed.
	Service, PortName string
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
	for _, b := range slices.Concat(f.Backends, f.Draining) {
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

// FrontendTable writes the frontend tables incrementally: it reads them
// once, then keeps the ids in use and how many frontends use each backend,
// so that changing one Service costs that Service's entries, not a walk of
// all of them. One writer: the agent.
type FrontendTable struct {
	m        *loader.Maps
	svcs     map[loader.SvcKey]loader.Svc
	backends map[loader.Backend]uint32 // backend -> id
	byID     map[uint32]loader.Backend // id -> backend
	refs     map[uint32]int            // backend id -> frontends using it
	uses     map[loader.SvcKey][]uint32
	names    map[uint32]loader.SvcName // frontend id -> svc_names
	usedSvc  map[uint32]bool
	usedBe   map[uint32]bool
	// Ids and generations only grow (from above what the maps hold;
	// frontend ids from above those the flow and affinity state holds
	// too): the programs'
	// flow and affinity state, which outlives a frontend or a backend,
	// must never find its id on something else.
	nextSvc uint32
	nextBe  uint32
	gen     uint32
}

// OpenFrontendTable reads the frontend tables, as a previous run may have
// left them, for their one writer: it tidies them (see tidyLabels).
func OpenFrontendTable(m *loader.Maps) (*FrontendTable, error) {
	t, err := readFrontendTable(m)
	if err != nil {
		return nil, err
	}
	// Flows and affinity entries outlive their frontends (svc_ct and
	// svc_affinity are the programs'), and a flow whose frontend's id and
	// gen are those it started with does not look its backend up
	// (up_ct.gen), nor an affinity entry of the frontend's gen: a frontend
	// id either holds is never handed out again. (Gens need no such care:
	// a frontend's only grow.)
	err = walkEntries(m.SvcCt, func(_ *loader.CtKey, ct *loader.Ct) {
		t.nextSvc = max(t.nextSvc, ct.SvcId+1)
	})
	if err != nil {
		return nil, fmt.Errorf("list service flows: %w", err)
	}
	err = walkEntries(m.SvcAffinity, func(k *loader.AffinityKey, _ *loader.Affinity) {
		t.nextSvc = max(t.nextSvc, k.SvcId+1)
	})
	if err != nil {
		return nil, fmt.Errorf("list service affinity: %w", err)
	}
	if err := t.tidyLabels(); err != nil {
		return nil, err
	}
	return t, nil
}

// readFrontendTable reads the frontend tables and writes nothing: what a
// reader may do while the agent writes (tidyLabels there would take a
// new frontend's counters, written just before its frontend, for an
// orphan's).
func readFrontendTable(m *loader.Maps) (*FrontendTable, error) {
	svcs, err := readAll(m.SvcFrontends, "service frontends", same[loader.SvcKey], same[loader.Svc])
	if err != nil {
		return nil, err
	}
	byID, err := readAll(m.SvcBackends, "service backends", same[uint32], same[loader.Backend])
	if err != nil {
		return nil, err
	}
	names, err := readAll(m.SvcNames, "service names", same[uint32], same[loader.SvcName])
	if err != nil {
		return nil, err
	}
	t := &FrontendTable{m: m, svcs: svcs, backends: make(map[loader.Backend]uint32, len(byID)),
		byID: make(map[uint32]loader.Backend, len(byID)), refs: map[uint32]int{}, uses: map[loader.SvcKey][]uint32{}, usedSvc: map[uint32]bool{},
		names: names, usedBe: map[uint32]bool{}, nextSvc: 1, nextBe: 1}
	for id, b := range byID {
		t.backends[b] = id
		t.byID[id] = b
		t.usedBe[id] = true
		t.nextBe = max(t.nextBe, id+1)
	}
	for k, s := range svcs {
		t.usedSvc[s.Id] = true
		t.nextSvc = max(t.nextSvc, s.Id+1)
		t.gen = max(t.gen, s.Gen)
		ids, err := t.slots(s)
		if err != nil {
			return nil, err
		}
		t.uses[k] = ids
		for _, id := range ids {
			t.refs[id]++
		}
	}
	return t, nil
}

// slots reads the backend ids of s's current revision.
func (t *FrontendTable) slots(s loader.Svc) ([]uint32, error) {
	ids := make([]uint32, 0, s.Count)
	for i := range int(s.Count) {
		var id uint32
		k := loader.SlotKey{SvcId: s.Id, Slot: uint16(i), Rev: s.Rev}
		if err := t.m.SvcSlots.Lookup(&k, &id); err != nil {
			return nil, fmt.Errorf("frontend %d slot %d: %w", s.Id, i, err)
		}
		ids = append(ids, id)
	}
	return ids, nil
}

// takeID is the next id from *next on not in used (0 is no id), taken.
func takeID(used map[uint32]bool, next *uint32) uint32 {
	for used[*next] || *next == 0 {
		*next++
	}
	id := *next
	used[id] = true
	*next++
	return id
}

// Put makes f's frontend hold f. A frontend that changes never shows a
// packet half of it: its new backends are written first, then its slots in
// the revision the programs do not read, then the frontend flips to that
// revision. Backends it no longer uses go last (when no other frontend uses
// them); a flow still on one picks another on its next packet.
func (t *FrontendTable) Put(f Frontend) error {
	if err := f.check(); err != nil {
		return fmt.Errorf("frontend %s: %w", &f, err)
	}
	// The slots' backends, then the draining ones (referenced, no slot).
	ids := make([]uint32, 0, len(f.Backends)+len(f.Draining))
	for _, b := range slices.Concat(f.Backends, f.Draining) {
		id, err := t.backendID(b)
		if err != nil {
			t.release(ids)
			return err
		}
		ids = append(ids, id)
	}
	key := f.key()
	cur, exists := t.svcs[key]
	n := uint16(len(f.Backends))
	svc := loader.Svc{Id: cur.Id, Rev: cur.Rev ^ 1, Count: n, Gen: t.gen + 1}
	if !exists {
		svc = loader.Svc{Id: takeID(t.usedSvc, &t.nextSvc), Count: n, Gen: t.gen + 1}
	}
	if f.Affinity > 0 {
		svc.Flags = loader.SvcAffinity
		svc.AffinitySec = max(uint32(f.Affinity/time.Second), 1)
	}
	old := t.uses[key]
	if exists && cur.Count == svc.Count && cur.Flags == svc.Flags && cur.AffinitySec == svc.AffinitySec && slices.Equal(old, ids) {
		t.release(ids) // taken again by backendID
		return t.label(cur.Id, &f, false)
	}
	fail := func(err error) error {
		if !exists { // nothing refers to the new id: free it, its slots and labels
			delete(t.usedSvc, svc.Id)
			err = errors.Join(err, deleteSlots(t.m, svc.Id, svc.Rev, 0), t.unlabel(svc.Id))
		}
		return errors.Join(err, t.release(ids))
	}
	// Counters and name first: the frontend's first packet counts.
	if err := t.label(svc.Id, &f, !exists); err != nil {
		return fail(fmt.Errorf("frontend %s: %w", &f, err))
	}
	if err := writeSlots(t.m, svc.Id, svc.Rev, ids[:n]); err != nil {
		return fail(fmt.Errorf("frontend %s: %w", &f, err))
	}
	if err := t.m.SvcFrontends.Update(&key, &svc, ebpf.UpdateAny); err != nil {
		return fail(fmt.Errorf("write frontend %s: %w", &f, err))
	}
	t.gen = svc.Gen
	t.svcs[key], t.uses[key] = svc, ids
	return t.release(old)
}

// Delete removes the frontend of VIP:port/proto; absent is fine.
func (t *FrontendTable) Delete(vip netip.Addr, port uint16, proto uint8) error {
	f := Frontend{VIP: vip, Port: port, Proto: proto}
	key := f.key()
	s, ok := t.svcs[key]
	if !ok {
		return nil
	}
	if err := t.m.SvcFrontends.Delete(&key); err != nil && !isNotExist(err) {
		return fmt.Errorf("delete frontend %s: %w", &f, err)
	}
	old := t.uses[key]
	delete(t.svcs, key)
	delete(t.uses, key)
	delete(t.usedSvc, s.Id)
	return errors.Join(deleteSlots(t.m, s.Id, 0, 0), deleteSlots(t.m, s.Id, 1, 0), t.unlabel(s.Id), t.release(old))
}

// label gives a fresh frontend id its svc_counters entry, zeroed (an
// existing frontend has its own: OpenFrontendTable saw to it), and any
// frontend its name in svc_names. The programs only bump an entry that
// exists, so the counters map never outgrows the frontends.
func (t *FrontendTable) label(id uint32, f *Frontend, fresh bool) error {
	if fresh {
		zeros := make([]loader.SvcCounters, ebpf.MustPossibleCPU())
		if err := t.m.SvcCounters.Update(id, zeros, ebpf.UpdateAny); err != nil {
			return fmt.Errorf("write counters: %w", err)
		}
	}
	var n loader.SvcName
	cString(n.Service[:], f.Service)
	cString(n.Port[:], f.PortName)
	if cur, ok := t.names[id]; ok && cur == n {
		return nil
	}
	if err := t.m.SvcNames.Update(id, &n, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("write name: %w", err)
	}
	t.names[id] = n
	return nil
}

// unlabel removes frontend id's counters and name; absent is fine.
func (t *FrontendTable) unlabel(id uint32) error {
	delete(t.names, id)
	var errs []error
	for _, m := range []*ebpf.Map{t.m.SvcCounters, t.m.SvcNames} {
		if err := m.Delete(id); err != nil && !isNotExist(err) {
			errs = append(errs, fmt.Errorf("delete %s of frontend %d: %w", m, id, err))
		}
	}
	return errors.Join(errs...)
}

// tidyLabels removes counters and names no frontend has (a run that died
// between writing them and its frontend), and gives every frontend its
// counters (frontends a build without them wrote).
func (t *FrontendTable) tidyLabels() error {
	var errs []error
	for id := range t.names {
		if !t.usedSvc[id] {
			errs = append(errs, t.unlabel(id))
		}
	}
	var id uint32
	var per []loader.SvcCounters
	var orphans []uint32
	it := t.m.SvcCounters.Iterate()
	for it.Next(&id, &per) {
		if !t.usedSvc[id] {
			orphans = append(orphans, id)
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("list service counters: %w", err)
	}
	for _, id := range orphans {
		errs = append(errs, t.unlabel(id))
	}
	zeros := make([]loader.SvcCounters, ebpf.MustPossibleCPU())
	for _, s := range t.svcs {
		if err := t.m.SvcCounters.Update(s.Id, zeros, ebpf.UpdateNoExist); err != nil && !errors.Is(err, ebpf.ErrKeyExist) {
			errs = append(errs, fmt.Errorf("write counters of frontend %d: %w", s.Id, err))
		}
	}
	return errors.Join(errs...)
}

// Sync makes the tables hold exactly want. Backends nothing refers to
// (draining ones a previous run kept, which a table opened afresh cannot
// tell from garbage) go at the end.
func (t *FrontendTable) Sync(want []Frontend) error {
	keep := map[loader.SvcKey]bool{}
	var errs []error
	for i := range want {
		keep[want[i].key()] = true
		errs = append(errs, t.Put(want[i]))
	}
	for k := range t.svcs {
		if !keep[k] {
			errs = append(errs, t.Delete(netip.AddrFrom16(k.Addr).Unmap(), htons(k.Port), k.L4proto))
		}
	}
	var orphans []uint32
	for _, id := range t.backends {
		if t.refs[id] == 0 {
			t.refs[id] = 1 // release takes it to 0 and deletes
			orphans = append(orphans, id)
		}
	}
	errs = append(errs, t.release(orphans))
	return errors.Join(errs...)
}

// backendID is b's id, written into svc_backends if new; the caller holds
// a reference.
func (t *FrontendTable) backendID(b netip.AddrPort) (uint32, error) {
	k := backendKey(b)
	id, ok := t.backends[k]
	if !ok {
		id = takeID(t.usedBe, &t.nextBe)
		if err := t.m.SvcBackends.Update(id, &k, ebpf.UpdateAny); err != nil {
			delete(t.usedBe, id)
			return 0, fmt.Errorf("write backend %s: %w", b, err)
		}
		t.backends[k] = id
		t.byID[id] = k
	}
	t.refs[id]++
	return id, nil
}

// release drops a reference to each of ids, deleting the backends no
// frontend uses any more.
func (t *FrontendTable) release(ids []uint32) error {
	var errs []error
	for _, id := range ids {
		if t.refs[id]--; t.refs[id] > 0 {
			continue
		}
		delete(t.refs, id)
		if err := t.m.SvcBackends.Delete(id); err != nil && !isNotExist(err) {
			errs = append(errs, fmt.Errorf("delete backend %d: %w", id, err))
			continue
		}
		delete(t.backends, t.byID[id])
		delete(t.byID, id)
		delete(t.usedBe, id)
	}
	return errors.Join(errs...)
}

// SyncFrontends is OpenFrontendTable and Sync, for a one-off writer.
func SyncFrontends(m *loader.Maps, want []Frontend) error {
	t, err := OpenFrontendTable(m)
	if err != nil {
		return err
	}
	return t.Sync(want)
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

// Frontends reads the frontend tables back, sorted by VIP, port, protocol,
// and writes nothing (underpassctl reads them while the agent writes).
func Frontends(m *loader.Maps) ([]Frontend, error) {
	t, err := readFrontendTable(m)
	if err != nil {
		return nil, err
	}
	byID := t.byID
	out := make([]Frontend, 0, len(t.svcs))
	for k, s := range t.svcs {
		n := t.names[s.Id]
		f := Frontend{VIP: netip.AddrFrom16(k.Addr).Unmap(), Port: htons(k.Port), Proto: k.L4proto,
			Service: goString(n.Service[:]), PortName: goString(n.Port[:])}
		if s.Flags&loader.SvcAffinity != 0 {
			f.Affinity = time.Duration(s.AffinitySec) * time.Second
		}
		for i, id := range t.uses[k] {
			b, ok := byID[id]
			if !ok {
				return nil, fmt.Errorf("frontend %s slot %d: backend %d missing", &f, i, id)
			}
			ap := netip.AddrPortFrom(netip.AddrFrom16(b.Addr).Unmap(), htons(b.Port))
			if i < int(s.Count) {
				f.Backends = append(f.Backends, ap)
			} else {
				f.Draining = append(f.Draining, ap)
			}
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
