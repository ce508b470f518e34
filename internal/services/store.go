package services

import (
	"errors"
	"net/netip"

	"github.com/cilium/ebpf"

	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
)

// MapStore is the live_svcs map of a loaded datapath.
type MapStore struct{ Maps *loader.Maps }

func (s MapStore) Add(a netip.Addr) error    { return datapath.AddLiveService(s.Maps, a) }
func (s MapStore) Delete(a netip.Addr) error { return datapath.DeleteLiveService(s.Maps, a) }

// List reads the map in batches: with 10,000 services a key-by-key walk is
// 20,000 syscalls, and Manager.Reconcile lists on every GC tick.
func (s MapStore) List() (map[netip.Addr]bool, error) {
	const chunk = 4096
	out := map[netip.Addr]bool{}
	keys := make([]loader.IPKey, chunk)
	vals := make([]uint32, chunk)
	var cursor ebpf.MapBatchCursor
	for {
		n, err := s.Maps.LiveSvcs.BatchLookup(&cursor, keys, vals, nil)
		for _, k := range keys[:n] {
			out[datapath.AddrOf(k)] = true
		}
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return out, nil
		}
		if errors.Is(err, ebpf.ErrNotSupported) {
			return datapath.LiveServices(s.Maps) // kernels without batch ops
		}
		if err != nil {
			return nil, err
		}
	}
}
