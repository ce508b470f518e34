package loader

import (
	"encoding/binary"
	"fmt"

	"github.com/cilium/ebpf"
)

// mapLayout is what a pinned map must look like to this build: the map
// type and the key and value types, which are the bpf2go types (C stays the
// definition). Open checks the pins against it instead of parsing the
// embedded ELF, which costs ~1.5 ms of CPU on every CNI call; Load, which
// parses anyway, checks with MapSpec.Compatible. TestMapABIMatchesELF holds
// the table to the ELF.
type mapLayout struct {
	typ        ebpf.MapType
	key, value any // nil: size 0 (ring buffer)
}

var mapABI = map[string]mapLayout{
	"config":     {ebpf.Array, uint32(0), Config{}},
	"parents":    {ebpf.Array, uint32(0), Parent{}},
	"ep_by_mac":  {ebpf.Hash, MACKey{}, EndpointRef{}},
	"ep_by_ip":   {ebpf.Hash, EpIPKey{}, EndpointRef{}},
	"ep_names":   {ebpf.Hash, AttachKey{}, uint32(0)},
	"wire_addrs": {ebpf.LRUHash, EpIPKey{}, uint64(0)},
	"svc_flows":  {ebpf.LRUHash, FlowKey{}, uint64(0)},
	"endpoints":  {ebpf.Hash, uint32(0), Endpoint{}},
	"ep_stats":   {ebpf.PerCPUHash, uint32(0), EndpointStats{}},
	"stats":      {ebpf.PerCPUArray, uint32(0), Counter{}},
	"drops":      {ebpf.PerCPUArray, uint32(0), Counter{}},
	"svc_cidrs":  {ebpf.LPMTrie, LPMKey{}, uint32(0)},
	"live_svcs":  {ebpf.Hash, IPKey{}, uint32(0)},
	"host_cidrs": {ebpf.LPMTrie, LPMKey{}, HostEntry{}},
	"trace":      {ebpf.PerCPUArray, uint32(0), Trace{}},
	"events":     {ebpf.RingBuf, nil, nil},
	"prefilter":  {ebpf.Array, uint32(0), Prefilter{}},
	"ep_progs":   {ebpf.ProgramArray, uint32(0), uint32(0)},

	"svc_frontends": {ebpf.Hash, SvcKey{}, Svc{}},
	"svc_slots":     {ebpf.Hash, SlotKey{}, uint32(0)},
	"svc_backends":  {ebpf.Hash, uint32(0), Backend{}},
	"svc_ct":        {ebpf.LRUHash, CtKey{}, Ct{}},
	"svc_rev":       {ebpf.LRUHash, RevKey{}, Rev{}},
	"svc_affinity":  {ebpf.LRUHash, AffinityKey{}, Affinity{}},
	"svc_stats":     {ebpf.PerCPUArray, uint32(0), Counter{}},
	"svc_counters":  {ebpf.PerCPUHash, uint32(0), SvcCounters{}},
	"svc_names":     {ebpf.Hash, uint32(0), SvcName{}},
	"svc_frags":     {ebpf.LRUHash, FragKey{}, Frag{}},
}

func abiSize(v any) uint32 {
	if v == nil {
		return 0
	}
	return uint32(binary.Size(v))
}

// checkABI says whether a pinned map fits this build's layout of name.
func checkABI(name string, m *ebpf.Map) error {
	l, ok := mapABI[name]
	if !ok {
		return fmt.Errorf("this build has no map %s", name)
	}
	if m.Type() != l.typ {
		return fmt.Errorf("type %s, this build has %s", m.Type(), l.typ)
	}
	if k := abiSize(l.key); m.KeySize() != k {
		return fmt.Errorf("key size %d, this build has %d", m.KeySize(), k)
	}
	if v := abiSize(l.value); m.ValueSize() != v {
		return fmt.Errorf("value size %d, this build has %d", m.ValueSize(), v)
	}
	return nil
}
