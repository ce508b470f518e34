package datapath

import (
	"fmt"

	"github.com/cilium/ebpf"
	"github.com/underpass-cni/underpass/internal/loader"
)

func zeroStats(m *loader.Maps, id uint32) error {
	zeros := make([]loader.EndpointStats, ebpf.MustPossibleCPU())
	if err := m.EpStats.Update(id, zeros, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("create counters of endpoint %d: %w", id, err)
	}
	return nil
}

// Sum adds per-CPU endpoint counters.
func Sum(per []loader.EndpointStats) loader.EndpointStats {
	var t loader.EndpointStats
	for _, s := range per {
		t.Rx.Add(s.Rx)
		t.Tx.Add(s.Tx)
		t.HostToEp.Add(s.HostToEp)
		t.EpToHost.Add(s.EpToHost)
		t.WireRx.Add(s.WireRx)
		t.StaleDropped += s.StaleDropped
		t.StaleRejected += s.StaleRejected
		for i := range t.Drops {
			t.Drops[i] += s.Drops[i]
		}
		t.IpConflicts += s.IpConflicts
	}
	return t
}

// EndpointStats reads one endpoint's counters, summed over CPUs.
func EndpointStats(m *loader.Maps, id uint32) (loader.EndpointStats, error) {
	var per []loader.EndpointStats
	if err := m.EpStats.Lookup(id, &per); err != nil {
		return loader.EndpointStats{}, fmt.Errorf("read counters of endpoint %d: %w", id, err)
	}
	return Sum(per), nil
}

// AllEndpointStats reads every endpoint's counters in one pass.
func AllEndpointStats(m *loader.Maps) (map[uint32]loader.EndpointStats, error) {
	return readAll(m.EpStats, "endpoint counters", same[uint32], Sum)
}

func readCounters(m *ebpf.Map, n int) ([]loader.Counter, error) {
	out := make([]loader.Counter, n)
	for i := 0; i < n; i++ {
		var per []loader.Counter
		if err := m.Lookup(uint32(i), &per); err != nil {
			return nil, err
		}
		for _, c := range per {
			out[i].Add(c)
		}
	}
	return out, nil
}

// GlobalStats reads the global counters, indexed by loader.Stat.
func GlobalStats(m *loader.Maps) ([]loader.Counter, error) {
	c, err := readCounters(m.Stats, int(loader.StatMax))
	if err != nil {
		return nil, fmt.Errorf("read global counters: %w", err)
	}
	return c, nil
}

// Drops reads the drop counters, indexed by loader.DropReason.
func Drops(m *loader.Maps) ([]loader.Counter, error) {
	c, err := readCounters(m.Drops, int(loader.DropMax))
	if err != nil {
		return nil, fmt.Errorf("read drop counters: %w", err)
	}
	return c, nil
}
