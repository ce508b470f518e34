package datapath

import (
	"errors"
	"fmt"
	"hash/fnv"
	"net/netip"

	"github.com/cilium/ebpf"
	"github.com/underpass-cni/underpass/internal/attach"
	"github.com/underpass-cni/underpass/internal/loader"
)

// ErrAddrInUse means an address is registered to another endpoint.
var ErrAddrInUse = errors.New("address registered to another endpoint")

// Endpoint ids are 16 bits: the endpoint programs learn whose frame they
// see from the classid of the filter that runs them, of which cls_bpf
// passes 16 bits (attach.MaxEndpointID). An id is claimed by linear probing
// from a hash of the attachment; the attachment is found again through
// ep_names, never by walking the probe chain, so a chain with holes (an
// endpoint in the middle deleted) loses nobody.
const (
	idMask    = attach.MaxEndpointID
	maxProbes = attach.MaxEndpointID
)

// EndpointID is where the probing for an attachment's id starts.
func EndpointID(containerID, ifname string) uint32 {
	return nonZero(attachmentHash(containerID, ifname) & idMask)
}

// attachmentHash is a variable so that tests can force every attachment
// onto one probe chain.
var attachmentHash = func(containerID, ifname string) uint32 {
	h := fnv.New32a()
	h.Write([]byte(containerID))
	h.Write([]byte{0})
	h.Write([]byte(ifname))
	return h.Sum32()
}

func nonZero(id uint32) uint32 {
	if id == 0 {
		return 1 // 0 means "no endpoint" to the programs
	}
	return id
}

func attachKey(containerID, ifname string) loader.AttachKey {
	var k loader.AttachKey
	cString(k.ContainerId[:], containerID)
	cString(k.Ifname[:], ifname)
	return k
}

// Find returns the id registered for an attachment, or 0.
func Find(m *loader.Maps, containerID, ifname string) (uint32, *Endpoint, error) {
	k := attachKey(containerID, ifname)
	var id uint32
	err := m.EpNames.Lookup(&k, &id)
	if isNotExist(err) {
		return 0, nil, nil
	}
	if err != nil {
		return 0, nil, fmt.Errorf("look up endpoint %s/%s: %w", containerID, ifname, err)
	}
	ep, err := Lookup(m, id)
	if errors.Is(err, ErrNoEndpoint) {
		return 0, nil, nil
	}
	if err != nil {
		return 0, nil, err
	}
	if ep.ContainerID != containerID || ep.IfName != ifname {
		return 0, nil, nil // a stale name entry: the id went to someone else
	}
	return id, &ep, nil
}

// ErrNoEndpoint means no endpoint has the id.
var ErrNoEndpoint = errors.New("no such endpoint")

// Lookup reads endpoint id.
func Lookup(m *loader.Maps, id uint32) (Endpoint, error) {
	var raw loader.Endpoint
	err := m.Endpoints.Lookup(id, &raw)
	if isNotExist(err) {
		return Endpoint{}, fmt.Errorf("endpoint %d: %w", id, ErrNoEndpoint)
	}
	if err != nil {
		return Endpoint{}, fmt.Errorf("look up endpoint %d: %w", id, err)
	}
	return Decode(&raw), nil
}

// Rename gives endpoint id another pod name (cut to fit, as Register
// does), in place: its programs, counters and entries stay as they are. An
// adopted container whose name became known after its adoption is renamed,
// not registered again, which would detach its programs for a moment and
// zero its counters. Call with the lock held.
//
// The record is read, changed and written back (MoveParent does the same).
// An address the endpoint's programs learn (its DAD) in the microseconds
// between is lost from its record, though not from ep_by_ip: it stays the
// endpoint's while it lives, but Unregister, which finds learnt refs
// through the record, leaves that ref behind, and until an assignment
// (Register) of that address overwrites it no other endpoint on the parent
// learns it. A rename happens at most once or twice in a container's life.
func Rename(m *loader.Maps, id uint32, podName string) error {
	var raw loader.Endpoint
	err := m.Endpoints.Lookup(id, &raw)
	if isNotExist(err) {
		return fmt.Errorf("endpoint %d: %w", id, ErrNoEndpoint)
	}
	if err != nil {
		return fmt.Errorf("look up endpoint %d: %w", id, err)
	}
	cString(raw.PodName[:], podName)
	// UpdateExist: an endpoint unregistered meanwhile stays gone.
	if err := m.Endpoints.Update(id, &raw, ebpf.UpdateExist); err != nil {
		if isNotExist(err) {
			return fmt.Errorf("endpoint %d: %w", id, ErrNoEndpoint)
		}
		return fmt.Errorf("rename endpoint %d: %w", id, err)
	}
	return nil
}

// nextID is the id after id on a probe chain whose ids wrap at mask.
func nextID(id, mask uint32) uint32 {
	return nonZero((id + 1) & mask)
}

// ErrTooLong means a name does not fit its field in the registry: stored
// cut short, DEL, CHECK and GC could not find the endpoint again.
var ErrTooLong = errors.New("too long for the endpoint registry")

// CheckAttachment says whether an attachment's names fit the registry; the
// plugin asks before it creates anything.
func CheckAttachment(containerID, ifname, netns, network string) error {
	var ep loader.Endpoint
	for _, f := range []struct {
		what, v string
		max     int
	}{
		{"container id", containerID, len(ep.ContainerId) - 1},
		{"interface name", ifname, len(ep.Ifname) - 1},
		{"netns path", netns, len(ep.Netns) - 1},
		{"network name", network, len(ep.Network) - 1},
	} {
		if len(f.v) > f.max {
			return fmt.Errorf("%s %q is %d bytes, at most %d fit: %w", f.what, f.v, len(f.v), f.max, ErrTooLong)
		}
	}
	return nil
}

// Register writes every entry of an endpoint. An attachment registered
// already is replaced (ADD retried by the runtime). On error nothing of the
// new registration is left behind. The pod name and namespace are cut to fit
// (they only label metrics); every other name must fit (CheckAttachment).
func Register(m *loader.Maps, s Endpoint) (id uint32, err error) {
	if err := CheckAttachment(s.ContainerID, s.IfName, s.Netns, s.Network); err != nil {
		return 0, err
	}
	if len(s.Addrs) > loader.MaxAddrs {
		return 0, fmt.Errorf("endpoint has %d addresses, at most %d are supported", len(s.Addrs), loader.MaxAddrs)
	}
	if old, _, err := Find(m, s.ContainerID, s.IfName); err != nil {
		return 0, err
	} else if old != 0 {
		if err := Unregister(m, old); err != nil {
			return 0, err
		}
	}

	ep := s.encode()
	if id, err = claimID(m, &ep, EndpointID(s.ContainerID, s.IfName)); err != nil {
		return 0, err
	}
	// Roll back by the claimed id: the error returns below zero id.
	claimed := id
	defer func() {
		if err != nil {
			Unregister(m, claimed)
		}
	}()
	if err := writeRefs(m, s, id); err != nil {
		return 0, err
	}
	if err := zeroStats(m, id); err != nil {
		return 0, err
	}
	return id, nil
}

// claimID inserts ep under the first free id of the probe chain that
// starts at id: inserting with NoExist is the lock.
func claimID(m *loader.Maps, ep *loader.Endpoint, id uint32) (uint32, error) {
	for i := 0; ; i++ {
		ep.Id = id
		err := m.Endpoints.Update(id, ep, ebpf.UpdateNoExist)
		if err == nil {
			return id, nil
		}
		if !errors.Is(err, ebpf.ErrKeyExist) || i == maxProbes-1 {
			return 0, fmt.Errorf("register endpoint: %w", err)
		}
		id = nextID(id, idMask)
	}
}

// liveHolder is the endpoint other than id whose ref is k in lookup map mp
// (ep_by_mac, ep_by_ip) and whose record is still there, or 0: a ref left
// by an endpoint that is gone holds nothing.
func liveHolder(m *loader.Maps, mp *ebpf.Map, k any, id uint32) uint32 {
	var ref loader.EndpointRef
	var holder loader.Endpoint
	if mp.Lookup(k, &ref) == nil && ref.Id != id && m.Endpoints.Lookup(ref.Id, &holder) == nil {
		return ref.Id
	}
	return 0
}

// writeRefs points the name, the addresses and (macvlan) the MAC of s at
// endpoint id.
func writeRefs(m *loader.Maps, s Endpoint, id uint32) error {
	// Another live endpoint's MAC is refused (evictStaleOwners says
	// whose) before anything is written; an entry left by an endpoint
	// that is gone is taken.
	if s.Mode == loader.ModeMacvlan {
		k := MACKey(s.MAC, s.ParentIfindex)
		if h := liveHolder(m, m.EpByMac, &k, id); h != 0 {
			return fmt.Errorf("%w: MAC %s belongs to endpoint %d", ErrAddrInUse, s.MAC, h)
		}
	}
	nk := attachKey(s.ContainerID, s.IfName)
	if err := m.EpNames.Update(&nk, id, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("register the name of endpoint %d: %w", id, err)
	}
	ref := loader.EndpointRef{Id: id}
	for _, p := range s.Addrs {
		k := EpIPKey(p.Addr(), s.ParentIfindex)
		var other loader.EndpointRef
		if err := m.EpByIp.Lookup(&k, &other); err == nil && other.Id != id {
			if other.Flags&uint32(loader.RefLearned) == 0 {
				return fmt.Errorf("%w: %s belongs to endpoint %d", ErrAddrInUse, p.Addr(), other.Id)
			}
			// Another endpoint only learnt it (its DAD raced IPAM): the
			// assignment wins, the learner's traffic from it stops.
		}
		if err := m.EpByIp.Update(&k, &ref, ebpf.UpdateAny); err != nil {
			return fmt.Errorf("register %s: %w", p.Addr(), err)
		}
	}
	if s.Mode == loader.ModeMacvlan {
		k := MACKey(s.MAC, s.ParentIfindex)
		if err := m.EpByMac.Update(&k, &ref, ebpf.UpdateAny); err != nil {
			return fmt.Errorf("register %s: %w", s.MAC, err)
		}
	}
	return nil
}

// Unregister removes every entry of endpoint id; absent entries are fine, and
// entries that now belong to another endpoint are left alone.
func Unregister(m *loader.Maps, id uint32) error {
	var ep loader.Endpoint
	err := m.Endpoints.Lookup(id, &ep)
	if isNotExist(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("look up endpoint %d: %w", id, err)
	}
	var errs []error
	for _, k := range refKeys(&ep) {
		errs = append(errs, deleteRef(m.EpByIp, &k, id))
	}
	errs = append(errs, sweepLearned(m, id))
	mk := loader.MACKey{Mac: ep.Mac, ParentIfindex: ep.ParentIfindex}
	errs = append(errs, deleteRef(m.EpByMac, &mk, id))
	nk := loader.AttachKey{ContainerId: ep.ContainerId, Ifname: ep.Ifname}
	var named uint32
	if m.EpNames.Lookup(&nk, &named) == nil && named == id {
		if err := m.EpNames.Delete(&nk); err != nil && !isNotExist(err) {
			errs = append(errs, err)
		}
	}
	if err := m.EpStats.Delete(id); err != nil && !isNotExist(err) {
		errs = append(errs, err)
	}
	if err := m.Endpoints.Delete(id); err != nil && !isNotExist(err) {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("unregister endpoint %d: %w", id, err)
	}
	return nil
}

// sweepLearned deletes the addresses id learnt that its record does not
// list: two DADs on two CPUs can pick one free slot at once (the programs
// take no lock), and the loser's entry is left without one. Left behind,
// it would go to the next endpoint that gets id.
func sweepLearned(m *loader.Maps, id uint32) error {
	var orphan []loader.EpIPKey
	err := walkEntries(m.EpByIp, func(k *loader.EpIPKey, ref *loader.EndpointRef) {
		if ref.Id == id && ref.Flags&uint32(loader.RefLearned) != 0 {
			orphan = append(orphan, *k)
		}
	})
	if err != nil {
		return fmt.Errorf("walk ep_by_ip: %w", err)
	}
	var errs []error
	for _, k := range orphan {
		errs = append(errs, deleteRef(m.EpByIp, &k, id))
	}
	return errors.Join(errs...)
}

// refKeys are the ep_by_ip keys of an endpoint: its registered addresses
// and those it learnt.
func refKeys(ep *loader.Endpoint) []loader.EpIPKey {
	var out []loader.EpIPKey
	for _, a := range ep.Addrs {
		if a.Family != 0 {
			out = append(out, loader.EpIPKey{Addr: a.Addr, ParentIfindex: ep.ParentIfindex})
		}
	}
	for _, l := range ep.Learned {
		if l.LearnedNs != 0 {
			out = append(out, loader.EpIPKey{Addr: l.Addr, ParentIfindex: ep.ParentIfindex})
		}
	}
	return out
}

// deleteRef deletes a ref that still belongs to endpoint id.
func deleteRef(m *ebpf.Map, key any, id uint32) error {
	var ref loader.EndpointRef
	if m.Lookup(key, &ref) != nil || ref.Id != id {
		return nil
	}
	if err := m.Delete(key); err != nil && !isNotExist(err) {
		return err
	}
	return nil
}

// LearnedAddrs decodes the addresses an endpoint learnt from its DAD that
// are still its own (a conflict from the wire takes one back).
func LearnedAddrs(m *loader.Maps, ep *Endpoint) []netip.Addr {
	var out []netip.Addr
	for _, a := range ep.Learned {
		k := EpIPKey(a, ep.ParentIfindex)
		var ref loader.EndpointRef
		if m.EpByIp.Lookup(&k, &ref) == nil && ref.Id == ep.ID {
			out = append(out, a)
		}
	}
	return out
}

// Endpoints lists the registered endpoints by id.
func Endpoints(m *loader.Maps) (map[uint32]Endpoint, error) {
	raw, err := rawEndpoints(m)
	if err != nil {
		return nil, err
	}
	out := make(map[uint32]Endpoint, len(raw))
	for id, v := range raw {
		out[id] = Decode(&v)
	}
	return out, nil
}

// rawEndpoints lists the endpoints map's values by id, for those that
// rewrite a whole record.
func rawEndpoints(m *loader.Maps) (map[uint32]loader.Endpoint, error) {
	return readAll(m.Endpoints, "endpoints", same[uint32], same[loader.Endpoint])
}

// unmapAddr writes an interface address given as ::ffff:a.b.c.d/96+n as
// a.b.c.d/n: the datapath keys both spellings alike, and reading the
// registration back must give one of them.
func unmapAddr(p netip.Prefix) netip.Prefix {
	if a := p.Addr(); a.Is4In6() && p.Bits() >= 96 {
		return netip.PrefixFrom(a.Unmap(), p.Bits()-96)
	}
	return p
}

func family(a netip.Addr) uint8 {
	if a.Is4() {
		return 4
	}
	return 6
}
