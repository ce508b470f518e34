package datapath

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/cilium/ebpf"
	"github.com/underpass-cni/underpass/internal/loader"
)

// MoveParent re-points every endpoint registered on parent ifindex from to
// ifindex to: what a parent NIC that was deleted and re-created (new
// ifindex, same name) needs, since the programs match endpoints by their
// parent's ifindex. The lookup refs are written before the endpoint record,
// so a reader never sees a record whose refs are not there yet. It returns
// how many endpoints moved.
func MoveParent(m *loader.Maps, from, to int) (int, error) {
	eps, err := rawEndpoints(m)
	if err != nil {
		return 0, err
	}
	moved := 0
	var errs []error
	for id, ep := range eps {
		if int(ep.ParentIfindex) != from {
			continue
		}
		// The refs are keyed by parent: new keys first, the old ones go
		// after the record moved.
		old := refKeys(&ep)
		oldMAC := loader.MACKey{Mac: ep.Mac, ParentIfindex: ep.ParentIfindex}
		// A key another live endpoint holds on the new parent (one
		// registered there before the move, with the MAC or an address
		// this one has) is not taken from it, as Register would not:
		// this endpoint stays whole where it was, and the error says so.
		if err := heldOnNewParent(m, old, oldMAC, id, to); err != nil {
			errs = append(errs, fmt.Errorf("endpoint %d left on parent ifindex %d: %w", id, from, err))
			continue
		}
		for _, k := range old {
			nk := loader.EpIPKey{Addr: k.Addr, ParentIfindex: uint32(to)}
			errs = append(errs, moveRef(m.EpByIp, &k, &nk, id))
		}
		nmk := loader.MACKey{Mac: ep.Mac, ParentIfindex: uint32(to)}
		errs = append(errs, moveRef(m.EpByMac, &oldMAC, &nmk, id))
		ep.ParentIfindex = uint32(to)
		// UpdateExist: an endpoint unregistered meanwhile stays gone.
		if err := m.Endpoints.Update(id, &ep, ebpf.UpdateExist); err != nil && !isNotExist(err) {
			errs = append(errs, fmt.Errorf("endpoint %d: %w", id, err))
			continue
		}
		for _, k := range old {
			errs = append(errs, deleteRef(m.EpByIp, &k, id))
		}
		errs = append(errs, deleteRef(m.EpByMac, &oldMAC, id))
		moved++
	}
	if err := errors.Join(errs...); err != nil {
		return moved, fmt.Errorf("move endpoints from parent ifindex %d to %d: %w", from, to, err)
	}
	return moved, nil
}

// heldOnNewParent says which of endpoint id's keys (its addresses old and
// its MAC) another live endpoint holds under parent ifindex to.
func heldOnNewParent(m *loader.Maps, old []loader.EpIPKey, mac loader.MACKey, id uint32, to int) error {
	var cur loader.EndpointRef
	if m.EpByMac.Lookup(&mac, &cur) == nil && cur.Id == id {
		nk := loader.MACKey{Mac: mac.Mac, ParentIfindex: uint32(to)}
		if h := liveHolder(m, m.EpByMac, &nk, id); h != 0 {
			return fmt.Errorf("%w: MAC %s belongs to endpoint %d there", ErrAddrInUse, net.HardwareAddr(mac.Mac[:]), h)
		}
	}
	for _, k := range old {
		// Only the keys that move: a learnt slot whose address is no
		// longer this endpoint's is left, as moveRef leaves it.
		if m.EpByIp.Lookup(&k, &cur) != nil || cur.Id != id {
			continue
		}
		nk := loader.EpIPKey{Addr: k.Addr, ParentIfindex: uint32(to)}
		if h := liveHolder(m, m.EpByIp, &nk, id); h != 0 {
			return fmt.Errorf("%w: %s belongs to endpoint %d there", ErrAddrInUse, netip.AddrFrom16(k.Addr).Unmap(), h)
		}
	}
	return nil
}

// moveRef copies a ref that still belongs to endpoint id to a new key.
func moveRef(m *ebpf.Map, from, to any, id uint32) error {
	var cur loader.EndpointRef
	if err := m.Lookup(from, &cur); err != nil || cur.Id != id {
		return nil
	}
	if err := m.Update(to, &cur, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("endpoint %d: %w", id, err)
	}
	return nil
}

// CountEndpoints counts registered endpoints by walking keys only (the
// records are large; a metrics scrape should not copy them all).
func CountEndpoints(m *loader.Maps) (int, error) {
	var key, next uint32
	// A key deleted while walking restarts the walk from the first key:
	// count each key once, and stop rather than loop.
	seen := map[uint32]struct{}{}
	var prev any // nil: start from the first key
	for steps := 0; steps <= 2*int(m.Endpoints.MaxEntries()); steps++ {
		if err := m.Endpoints.NextKey(prev, &next); err != nil {
			if errors.Is(err, ebpf.ErrKeyNotExist) {
				return len(seen), nil
			}
			return len(seen), fmt.Errorf("count endpoints: %w", err)
		}
		seen[next] = struct{}{}
		key = next
		prev = &key
	}
	return len(seen), nil
}
