package datapath

import (
	"errors"
	"fmt"
	"net"

	"github.com/cilium/ebpf"
	"github.com/underpass-cni/underpass/internal/loader"
)

// Config is the datapath's view of the agent config: read on every packet.
type Config struct {
	HostReachable bool
	StaleReject   bool
	// ServicesSynced arms the stale guard: the live set has been synced
	// once. Until then nothing in a service CIDR is judged stale.
	ServicesSynced bool
	// ServicesEBPF translates pods' Service traffic in their own programs
	// (services.mode: ebpf) for the frontends in svc_frontends.
	ServicesEBPF bool
	// ServicesFromKube says that the live set ServicesSynced stands for
	// included the Kubernetes Services (the agent's alone: no program
	// reads it).
	ServicesFromKube bool
}

// SetConfig writes the config word; generation shows in bpftool which apply
// is in force.
func SetConfig(m *loader.Maps, c Config, generation uint64) error {
	var v loader.Config
	if !c.HostReachable {
		v.Flags |= uint32(loader.ConfigHostBlocked)
	}
	if c.StaleReject {
		v.Flags |= uint32(loader.ConfigStaleReject)
	}
	if c.ServicesSynced {
		v.Flags |= uint32(loader.ConfigSvcSynced)
	}
	if c.ServicesEBPF {
		v.Flags |= uint32(loader.ConfigSvcEBPF)
	}
	if c.ServicesFromKube {
		v.Flags |= uint32(loader.ConfigSvcKube)
	}
	v.Generation = generation
	if err := m.Config.Update(uint32(0), &v, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("write config: %w", err)
	}
	return nil
}

// GetConfig reads the config word.
func GetConfig(m *loader.Maps) (Config, uint64, error) {
	var v loader.Config
	if err := m.Config.Lookup(uint32(0), &v); err != nil {
		return Config{}, 0, fmt.Errorf("read config: %w", err)
	}
	return Config{
		HostReachable:    v.Flags&uint32(loader.ConfigHostBlocked) == 0,
		StaleReject:      v.Flags&uint32(loader.ConfigStaleReject) != 0,
		ServicesSynced:   v.Flags&uint32(loader.ConfigSvcSynced) != 0,
		ServicesEBPF:     v.Flags&uint32(loader.ConfigSvcEBPF) != 0,
		ServicesFromKube: v.Flags&uint32(loader.ConfigSvcKube) != 0,
	}, v.Generation, nil
}

// ErrNoParent means the ifindex is not a registered parent.
var ErrNoParent = errors.New("not a registered parent")

func checkParentIndex(ifindex int) error {
	if ifindex <= 0 || ifindex >= loader.MaxParentIfindex {
		return fmt.Errorf("parent ifindex %d is outside 1..%d, which the datapath supports: recreate the NIC (its index is assigned at creation)", ifindex, loader.MaxParentIfindex-1)
	}
	return nil
}

// PutParent registers a parent NIC so its egress program hairpins.
func PutParent(m *loader.Maps, ifindex int, mac net.HardwareAddr, mode loader.Mode) error {
	if err := checkParentIndex(ifindex); err != nil {
		return err
	}
	if mode == loader.ModeNone {
		return fmt.Errorf("register parent ifindex %d: no mode", ifindex)
	}
	var v loader.Parent
	copy(v.Mac[:], mac)
	v.Mode = uint8(mode)
	if err := m.Parents.Update(uint32(ifindex), &v, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("register parent ifindex %d: %w", ifindex, err)
	}
	return nil
}

// GetParent reads a parent's registration; ErrNoParent if there is none.
func GetParent(m *loader.Maps, ifindex int) (loader.Parent, error) {
	var v loader.Parent
	if err := checkParentIndex(ifindex); err != nil {
		return v, err
	}
	if err := m.Parents.Lookup(uint32(ifindex), &v); err != nil {
		return v, fmt.Errorf("look up parent ifindex %d: %w", ifindex, err)
	}
	if v.Mode == uint8(loader.ModeNone) {
		return v, fmt.Errorf("ifindex %d: %w", ifindex, ErrNoParent)
	}
	return v, nil
}

// DeleteParent forgets a parent; absent is fine.
func DeleteParent(m *loader.Maps, ifindex int) error {
	if checkParentIndex(ifindex) != nil {
		return nil
	}
	if err := m.Parents.Update(uint32(ifindex), &loader.Parent{}, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("forget parent ifindex %d: %w", ifindex, err)
	}
	return nil
}

// Parents lists the registered parents by ifindex, reading the array in
// batches (one syscall per 4096 slots, not one per slot).
func Parents(m *loader.Maps) (map[int]loader.Parent, error) {
	out := map[int]loader.Parent{}
	const chunk = 4096
	keys := make([]uint32, chunk)
	vals := make([]loader.Parent, chunk)
	var cursor ebpf.MapBatchCursor
	for {
		n, err := m.Parents.BatchLookup(&cursor, keys, vals, nil)
		for i := 0; i < n; i++ {
			if vals[i].Mode != uint8(loader.ModeNone) {
				out[int(keys[i])] = vals[i]
			}
		}
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return out, nil
		}
		if err != nil {
			return nil, fmt.Errorf("list parents: %w", err)
		}
	}
}
