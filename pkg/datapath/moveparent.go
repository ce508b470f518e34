package datapath

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
	"github.com/underpass-cni/underpass/loader"
)

// MoveParent re-points every endpoint registered on parent ifindex from to
// ifindex to: what a parent NIC that was deleted and re-created (new
// ifindex, same name) needs, since the programs match endpoints by their
// parent's ifindex. The lookup refs are written before the endpoint record,
// so a reader never sees a record whose refs are not there yet. It returns
// how many endpoints moved.
func MoveParent(m *loader.Maps, from, to int) (int, error) {
	eps, err := Endpoints(m)
	if err != nil {
		return 0, err
	}
	moved := 0
	var errs []error
	for id, ep := range eps {
		if int(ep.ParentIfindex) != from {
			continue
		}
		ref := loader.EndpointRef{Id: id, ParentIfindex: uint32(to)}
		for _, a := range ep.Addrs {
			if a.Family == 0 {
				continue
			}
			k := loader.IPKey{Addr: a.Addr}
			errs = append(errs, updateRef(m.EpByIP, &k, id, ref))
		}
		mk := loader.MACKey{Mac: ep.Mac}
		errs = append(errs, updateRef(m.EpByMAC, &mk, id, ref))
		ep.ParentIfindex = uint32(to)
		// UpdateExist: an endpoint unregistered meanwhile stays gone.
		if err := m.Endpoints.Update(id, &ep, ebpf.UpdateExist); err != nil && !isNotExist(err) {
			errs = append(errs, fmt.Errorf("endpoint %d: %w", id, err))
			continue
		}
		moved++
	}
	if err := errors.Join(errs...); err != nil {
		return moved, fmt.Errorf("move endpoints from parent ifindex %d to %d: %w", from, to, err)
	}
	return moved, nil
}

// updateRef rewrites a ref that still belongs to endpoint id.
func updateRef(m *ebpf.Map, key any, id uint32, ref loader.EndpointRef) error {
	var cur loader.EndpointRef
	if err := m.Lookup(key, &cur); err != nil || cur.Id != id {
		return nil
	}
	if err := m.Update(key, &ref, ebpf.UpdateExist); err != nil && !isNotExist(err) {
		return fmt.Errorf("endpoint %d: %w", id, err)
	}
	return nil
}

// CountEndpoints counts registered endpoints by walking keys only (the
// records are large; a metrics scrape should not copy them all).
func CountEndpoints(m *loader.Maps) (int, error) {
	var key, next uint32
	n := 0
	var prev any // nil: start from the first key
	for {
		if err := m.Endpoints.NextKey(prev, &next); err != nil {
			if errors.Is(err, ebpf.ErrKeyNotExist) {
				return n, nil
			}
			return n, fmt.Errorf("count endpoints: %w", err)
		}
		n++
		key = next
		prev = &key
		if n > int(m.Endpoints.MaxEntries()) {
			// Keys deleted while walking can restart the walk; stop rather
			// than loop.
			return n, nil
		}
	}
}
