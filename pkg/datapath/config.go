package datapath

import (
	"fmt"
	"net"

	"github.com/cilium/ebpf"
	"github.com/underpass-cni/underpass/loader"
)

// Config is the datapath's view of the agent config: read on every packet.
type Config struct {
	HostReachable bool
	StaleReject   bool
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
		HostReachable: v.Flags&uint32(loader.ConfigHostBlocked) == 0,
		StaleReject:   v.Flags&uint32(loader.ConfigStaleReject) != 0,
	}, v.Generation, nil
}

// PutParent registers a parent NIC so its egress program hairpins.
func PutParent(m *loader.Maps, ifindex int, mac net.HardwareAddr, mode loader.Mode) error {
	var v loader.Parent
	copy(v.Mac[:], mac)
	v.Mode = uint8(mode)
	if err := m.Parents.Update(uint32(ifindex), &v, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("register parent ifindex %d: %w", ifindex, err)
	}
	return nil
}

// GetParent reads a parent's registration.
func GetParent(m *loader.Maps, ifindex int) (loader.Parent, error) {
	var v loader.Parent
	err := m.Parents.Lookup(uint32(ifindex), &v)
	return v, err
}

// DeleteParent forgets a parent; absent is fine.
func DeleteParent(m *loader.Maps, ifindex int) error {
	if err := m.Parents.Delete(uint32(ifindex)); err != nil && !isNotExist(err) {
		return fmt.Errorf("forget parent ifindex %d: %w", ifindex, err)
	}
	return nil
}

// Parents lists the registered parents by ifindex.
func Parents(m *loader.Maps) (map[int]loader.Parent, error) {
	out := map[int]loader.Parent{}
	var k uint32
	var v loader.Parent
	it := m.Parents.Iterate()
	for it.Next(&k, &v) {
		out[int(k)] = v
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list parents: %w", err)
	}
	return out, nil
}
