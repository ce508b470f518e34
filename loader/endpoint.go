package loader

import (
	"errors"
	"fmt"
	"io/fs"
	"strconv"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// The endpoint programs and the constant that tells them their endpoint.
const (
	progEndpointIngress = "endpoint_ingress"
	progEndpointEgress  = "endpoint_egress"
	varEndpointID       = "endpoint_id"
)

// LoadEndpointPrograms loads endpoint_ingress and endpoint_egress with
// endpoint_id = id, sharing dp's maps. Each endpoint gets its own copy because
// the programs run inside the container netns, where the ifindex says
// nothing about which endpoint it is (ifindexes repeat across netns); the
// only per-endpoint state is the private .rodata holding the id. The caller
// owns the returned programs (an attachment keeps them alive after Close).
func LoadEndpointPrograms(dp *Datapath, id uint32) (ingress, egress *ebpf.Program, err error) {
	if id == 0 {
		return nil, nil, errors.New("load endpoint programs: endpoint id 0 means \"no endpoint\" to the programs")
	}
	spec, err := Spec()
	if err != nil {
		return nil, nil, err
	}
	for name := range spec.Programs {
		if name != progEndpointIngress && name != progEndpointEgress {
			delete(spec.Programs, name)
		}
	}
	// Without line info: a fifth less load time per pod (1.7 -> 1.4 ms on
	// the test VM), and the source lines of these two small programs are
	// in bpf/underpass.c (the datapath's own copies keep theirs).
	for _, p := range spec.Programs {
		for i := range p.Instructions {
			p.Instructions[i] = p.Instructions[i].WithSource(nil)
		}
	}
	v, ok := spec.Variables[varEndpointID]
	if !ok {
		return nil, nil, fmt.Errorf("load endpoint programs: build has no %s constant", varEndpointID)
	}
	if err := v.Set(id); err != nil {
		return nil, nil, fmt.Errorf("set %s: %w", varEndpointID, err)
	}

	// Only the maps the endpoint programs use are loaded (NewCollection
	// would create every map of the spec otherwise). Each is the pinned
	// one: the programs must count into and look up in the maps the agent
	// and the parent program see. Only the data sections (.rodata with
	// endpoint_id) are created per endpoint.
	used := map[string]bool{}
	for _, p := range spec.Programs {
		for _, ins := range p.Instructions {
			if ins.IsLoadFromMap() && ins.Reference() != "" {
				used[ins.Reference()] = true
			}
		}
	}
	maps := dp.maps()
	replacements := map[string]*ebpf.Map{}
	for name := range spec.Maps {
		if strings.HasPrefix(name, ".") {
			continue // data sections: small, and the variables need them
		}
		if !used[name] {
			delete(spec.Maps, name)
			continue
		}
		m, ok := maps[name]
		if !ok {
			return nil, nil, fmt.Errorf("load endpoint programs: datapath has no map %s open", name)
		}
		replacements[name] = m
	}
	coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{MapReplacements: replacements})
	if err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			return nil, nil, fmt.Errorf("load endpoint programs: %+v", ve)
		}
		return nil, nil, fmt.Errorf("load endpoint programs: %w", err)
	}
	defer coll.Close()
	ingress = coll.DetachProgram(progEndpointIngress)
	egress = coll.DetachProgram(progEndpointEgress)
	if ingress == nil || egress == nil {
		ingress.Close()
		egress.Close()
		return nil, nil, errors.New("load endpoint programs: build lacks the endpoint programs")
	}
	return ingress, egress, nil
}

// Endpoint programs are attached as cls_bpf filters on the slave's clsact
// hooks, also where tcx exists. A tcx attach or detach waits for an RCU grace
// period (measured 8-16 ms each on the 2-CPU test VM, longer on big busy
// nodes), and an endpoint needs two of them on ADD: that was two thirds of
// the plugin's ADD latency. A filter costs well under a millisecond, goes
// away with the interface, and lives in the pod's netns, where nothing but
// the pod's own interfaces can see or disturb it. The parent NIC keeps tcx:
// it is attached once per node, not per pod.

// endpointFilterPrefix starts the name of every endpoint filter; the id
// follows, so CHECK and underpassctl can tell whose programs run.
const endpointFilterPrefix = "underpass-endpoint"

func endpointFilterName(id uint32) string { return fmt.Sprintf("%s-%d", endpointFilterPrefix, id) }

// ErrNetnsGone says a netns path no longer names a network namespace.
var ErrNetnsGone = errors.New("netns gone")

// netnsHandle opens a netlink handle inside the netns at path, so no thread
// has to switch namespaces for the requests.
func netnsHandle(path string) (*netlink.Handle, error) {
	if path == "" {
		return nil, fmt.Errorf("no netns path: %w", ErrNetnsGone)
	}
	// A runtime unmounts a namespace before it removes the file: what is
	// left is not a netns any more.
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); errors.Is(err, unix.ENOENT) {
		return nil, fmt.Errorf("netns %s: %w", path, ErrNetnsGone)
	} else if err != nil {
		return nil, fmt.Errorf("netns %s: %w", path, err)
	}
	if st.Type != unix.NSFS_MAGIC {
		return nil, fmt.Errorf("netns %s: not a namespace any more: %w", path, ErrNetnsGone)
	}
	h, err := netns.GetFromPath(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("netns %s: %w", path, ErrNetnsGone)
	}
	if err != nil {
		return nil, fmt.Errorf("open netns %s: %w", path, err)
	}
	defer h.Close()
	nh, err := netlink.NewHandleAt(h, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("netlink in netns %s: %w", path, err)
	}
	return nh, nil
}

func endpointFilters(h *netlink.Handle, ifindex int) [2]clsBPF {
	return [2]clsBPF{
		{h: h, ifindex: ifindex, hook: netlink.HANDLE_MIN_INGRESS},
		{h: h, ifindex: ifindex, hook: netlink.HANDLE_MIN_EGRESS},
	}
}

// AttachEndpoint loads the programs of endpoint id and attaches them to the
// ingress and egress of ifindex in the netns at netnsPath. Attaching again
// (a retried ADD) swaps the programs in place. On error nothing of this
// attachment is left.
func AttachEndpoint(dp *Datapath, id uint32, netnsPath string, ifindex int) error {
	ingress, egress, err := LoadEndpointPrograms(dp, id)
	if err != nil {
		return err
	}
	// The filters hold their own references.
	defer ingress.Close()
	defer egress.Close()
	return AttachEndpointPrograms(ingress, egress, id, netnsPath, ifindex)
}

// AttachEndpointPrograms is AttachEndpoint with programs LoadEndpointPrograms
// loaded for id already (the plugin loads them while IPAM runs). The caller
// keeps its references.
func AttachEndpointPrograms(ingress, egress *ebpf.Program, id uint32, netnsPath string, ifindex int) (err error) {
	h, err := netnsHandle(netnsPath)
	if err != nil {
		return fmt.Errorf("attach endpoint %d: %w", id, err)
	}
	defer h.Close()
	filters := endpointFilters(h, ifindex)
	defer func() {
		if err != nil {
			for _, f := range filters {
				_ = f.remove(endpointFilterPrefix)
			}
		}
	}()
	for i, prog := range []*ebpf.Program{ingress, egress} {
		f := filters[i]
		f.name = endpointFilterName(id)
		if err := f.replace(prog); err != nil {
			return fmt.Errorf("attach endpoint %d to ifindex %d in %s: %w", id, ifindex, netnsPath, err)
		}
	}
	return nil
}

// DetachEndpoint removes the filters of endpoint id (0: of any endpoint)
// from ifindex in the netns at netnsPath. A netns or interface that is gone
// took the filters with it: that is success.
func DetachEndpoint(netnsPath string, ifindex int, id uint32) error {
	h, err := netnsHandle(netnsPath)
	if errors.Is(err, ErrNetnsGone) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("detach endpoint %d: %w", id, err)
	}
	defer h.Close()
	prefix := endpointFilterPrefix
	if id != 0 {
		prefix = endpointFilterName(id)
	}
	var errs []error
	for _, f := range endpointFilters(h, ifindex) {
		// "underpass-endpoint-1" is a prefix of "…-12": match whole names.
		for _, bf := range f.find(prefix) {
			if id != 0 && bf.Name != prefix {
				continue
			}
			if err := h.FilterDel(bf); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.ENODEV) {
				errs = append(errs, fmt.Errorf("delete filter %s: %w", bf.Name, err))
			}
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("detach endpoint %d from ifindex %d in %s: %w", id, ifindex, netnsPath, err)
	}
	return nil
}

// EndpointFilters says whose programs are attached to an interface: the
// endpoint id of the ingress and of the egress filter, 0 where there is
// none (or one whose name carries no id).
type EndpointFilters struct {
	Ingress, Egress uint32
}

// AttachedEndpoint reads the endpoint filters of ifindex in the netns at
// netnsPath. ErrNetnsGone when the netns is gone.
func AttachedEndpoint(netnsPath string, ifindex int) (EndpointFilters, error) {
	h, err := netnsHandle(netnsPath)
	if err != nil {
		return EndpointFilters{}, err
	}
	defer h.Close()
	if _, err := h.LinkByIndex(ifindex); err != nil {
		return EndpointFilters{}, fmt.Errorf("ifindex %d in %s: %w", ifindex, netnsPath, err)
	}
	hooks := endpointFilters(h, ifindex)
	return EndpointFilters{Ingress: filterEndpointID(hooks[0]), Egress: filterEndpointID(hooks[1])}, nil
}

func filterEndpointID(f clsBPF) uint32 {
	for _, bf := range f.find(endpointFilterPrefix) {
		rest, _ := strings.CutPrefix(bf.Name, endpointFilterPrefix+"-")
		if id, err := strconv.ParseUint(rest, 10, 32); err == nil {
			return uint32(id)
		}
	}
	return 0
}
