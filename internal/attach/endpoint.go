package attach

import (
	"errors"
	"fmt"
	"io/fs"
	"strconv"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Endpoint programs are attached as cls_bpf filters on the slave's clsact
// hooks, also where tcx exists. The filter's classid is the endpoint id:
// cls_bpf hands it to the program in skb->tc_classid, which is how one
// loaded program serves every endpoint. A tcx attach or detach waits for an RCU grace
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

// ErrNotANamespace is ErrNetnsGone for a path that is still there but is no
// namespace any more: a runtime unmounts a namespace before it removes the
// file.
var ErrNotANamespace = fmt.Errorf("path is no longer a namespace: %w", ErrNetnsGone)

// CheckNetns is the one rule for whether an endpoint's namespace lives: nil
// when path is a network namespace, an error wrapping ErrNetnsGone when it
// is not (any more), another error when it cannot tell. The plugin (a stale
// owner of an address), the agent's collector and the loader all ask this.
func CheckNetns(path string) error {
	if path == "" {
		return fmt.Errorf("no netns path: %w", ErrNetnsGone)
	}
	err := ns.IsNSorErr(path)
	var notExist ns.NSPathNotExistErr
	var notNS ns.NSPathNotNSErr
	switch {
	case errors.As(err, &notExist):
		return fmt.Errorf("netns %s: %w", path, ErrNetnsGone)
	case errors.As(err, &notNS):
		return fmt.Errorf("netns %s: %w", path, ErrNotANamespace)
	case err != nil:
		return fmt.Errorf("netns %s: %w", path, err)
	}
	return nil
}

// NetnsID is the device and inode of the namespace at path ("dev:ino"), if
// it is one: the same whatever path leads there (a pin, a process's
// /proc/<pid>/ns/net).
func NetnsID(path string) (string, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return "", err
	}
	if st.Type != unix.NSFS_MAGIC {
		return "", fmt.Errorf("%s: not a namespace", path)
	}
	var s unix.Stat_t
	if err := unix.Stat(path, &s); err != nil {
		return "", err
	}
	return fmt.Sprintf("%d:%d", s.Dev, s.Ino), nil
}

// Gone says whether err, from reaching an interface in a namespace, means
// that the namespace or the interface is gone.
func Gone(err error) bool { return errors.Is(err, ErrNetnsGone) || LinkGone(err) }

// NetnsHandle opens a netlink handle inside the netns at path, so no thread
// has to switch namespaces for the requests. A namespace that is gone is
// an error wrapping ErrNetnsGone (ErrNotANamespace for a path that is no
// namespace any more), as CheckNetns says.
func NetnsHandle(path string) (*netlink.Handle, error) {
	if err := CheckNetns(path); err != nil {
		return nil, err
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

// MaxEndpointID is the largest endpoint id a filter can carry: cls_bpf
// passes 16 bits of its classid to the program.
const MaxEndpointID = 0xffff

// EndpointOptions name an endpoint's attachment: the programs of endpoint
// ID on the ingress and egress of Ifindex in the netns at Netns ("": the
// calling thread's, for a caller inside ns.Do already, such as the CNI
// plugin, which is there anyway to configure the interface).
type EndpointOptions struct {
	ID              uint32
	Ifindex         int
	Netns           string
	Ingress, Egress *ebpf.Program // endpoint_ingress, endpoint_egress
}

// handle opens a netlink handle in o's netns: one socket for the few
// requests (the package-level netlink functions open one per request).
func (o EndpointOptions) handle() (*netlink.Handle, error) {
	if o.Netns == "" {
		h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
		if err != nil {
			return nil, fmt.Errorf("netlink: %w", err)
		}
		return h, nil
	}
	return NetnsHandle(o.Netns)
}

func (o EndpointOptions) where() string {
	if o.Netns == "" {
		return fmt.Sprintf("ifindex %d", o.Ifindex)
	}
	return fmt.Sprintf("ifindex %d in %s", o.Ifindex, o.Netns)
}

// Endpoint attaches the endpoint programs for endpoint o.ID to the ingress
// and egress of o.Ifindex. Attaching again (a retried ADD) swaps the
// filters in place. On error nothing of this attachment is left, and an
// interface that had filters of ours before is quarantined
// (attachFilters).
func Endpoint(o EndpointOptions) error {
	h, err := o.handle()
	if err != nil {
		return fmt.Errorf("attach endpoint %d: %w", o.ID, err)
	}
	defer h.Close()
	if err := attachEndpoint(h, o); err != nil {
		return fmt.Errorf("attach endpoint %d to %s: %w", o.ID, o.where(), err)
	}
	return nil
}

func attachEndpoint(h *netlink.Handle, o EndpointOptions) (err error) {
	if id := o.ID; id == 0 || id > MaxEndpointID {
		return fmt.Errorf("endpoint id %d out of range 1-%d", id, MaxEndpointID)
	}
	return attachFilters(h, o)
}

// quarantineName names the filters QuarantineEndpoint puts in place.
const quarantineName = endpointFilterPrefix + "-quarantined"

// QuarantineEndpoint swaps the endpoint filters on o.Ifindex (o.ID is not
// used) for ones that run as endpoint 0, which is never registered: the
// egress program then drops every frame, as for any filter whose endpoint
// is gone, and can never vet them as an endpoint that gets an id later.
// For an interface that is still there but no longer the registered one
// (its MAC changed): detaching instead would leave it unguarded, sending
// as anyone to its bridged neighbours (a pod's ingress vets only
// registered senders). A registration of the interface later swaps them
// back (Endpoint); DetachEndpoint with ID 0 removes them.
func QuarantineEndpoint(o EndpointOptions) error {
	h, err := o.handle()
	if err != nil {
		return fmt.Errorf("quarantine %s: %w", o.where(), err)
	}
	defer h.Close()
	// No rollback: whatever a failure leaves (the old filters or these)
	// drops what an unregistered interface sends, where none would not.
	if err := putFilters(h, o, quarantineName, 0); err != nil {
		return fmt.Errorf("quarantine %s: %w", o.where(), err)
	}
	return nil
}

// attachFilters puts endpoint o.ID's filters on both hooks of o.Ifindex,
// replacing ours there in place. On error none of this attachment is
// left. An interface that had no filter of ours is bare again; one that
// had (an earlier registration's, or a quarantine) was guarded and is left
// quarantined: never bare, nor running as an id its caller is about to
// free.
func attachFilters(h *netlink.Handle, o EndpointOptions) (err error) {
	filters := endpointFilters(h, o.Ifindex)
	had, err := filters[1].find(endpointFilterPrefix)
	if err != nil {
		return err
	}
	defer func() {
		if err == nil {
			return
		}
		// Egress is the guard: quarantined there, the interface sends
		// nothing, whatever its ingress runs; ingress loses ours. Should
		// the quarantine fail, egress keeps the filter of ours it has,
		// which fails closed once its id is unregistered: never bare.
		rollback := filters[:]
		if len(had) > 0 && o.Egress != nil {
			q := filters[1]
			q.name, q.classid = quarantineName, 0
			if qerr := q.replaceFilter(o.Egress); qerr != nil {
				err = errors.Join(err, fmt.Errorf("roll back to quarantine: %w", qerr))
			}
			rollback = filters[:1]
		}
		for _, f := range rollback {
			if rerr := f.remove(endpointFilterPrefix); rerr != nil {
				err = errors.Join(err, fmt.Errorf("roll back: %w", rerr))
			}
		}
	}()
	return putFilters(h, o, endpointFilterName(o.ID), o.ID)
}

// putFilters puts o's programs on both hooks of o.Ifindex as filters named
// name with classid (the endpoint id they run as), replacing ours there in
// place: egress first, the hook that guards what the interface sends.
func putFilters(h *netlink.Handle, o EndpointOptions, name string, classid uint32) error {
	if o.Ingress == nil || o.Egress == nil {
		return errors.New("datapath has no endpoint programs open")
	}
	filters := endpointFilters(h, o.Ifindex)
	if err := filters[0].ensureClsact(); err != nil {
		return err
	}
	for _, i := range []int{1, 0} {
		f := filters[i]
		f.name, f.classid = name, classid
		if err := f.replaceFilter([]*ebpf.Program{o.Ingress, o.Egress}[i]); err != nil {
			return err
		}
	}
	return nil
}

// DetachEndpoint removes the filters of endpoint o.ID (0: of any endpoint)
// from o.Ifindex; the programs need not be set. A netns or interface that
// is gone took the filters with it: that is success.
func DetachEndpoint(o EndpointOptions) error {
	ifindex, id := o.Ifindex, o.ID
	h, err := o.handle()
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
		found, err := f.find(prefix)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		// "underpass-endpoint-1" is a prefix of "…-12": match whole names.
		for _, bf := range found {
			if id != 0 && bf.Name != prefix {
				continue
			}
			if err := h.FilterDel(bf); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.ENODEV) {
				errs = append(errs, fmt.Errorf("delete filter %s: %w", bf.Name, err))
			}
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("detach endpoint %d from %s: %w", id, o.where(), err)
	}
	return nil
}

// EndpointFilters says whose programs are attached to an interface: the
// endpoint id of the ingress and of the egress filter, 0 where there is
// none (or one whose name carries no id).
type EndpointFilters struct {
	Ingress, Egress uint32
	// Quarantined: the filters run as no endpoint (QuarantineEndpoint).
	Quarantined bool `json:",omitempty"`
}

// InspectEndpoint reads the endpoint filters of ifindex in the netns at
// netnsPath. ErrNetnsGone when the netns is gone.
func InspectEndpoint(netnsPath string, ifindex int) (EndpointFilters, error) {
	h, err := NetnsHandle(netnsPath)
	if err != nil {
		return EndpointFilters{}, err
	}
	defer h.Close()
	if _, err := h.LinkByIndex(ifindex); err != nil {
		return EndpointFilters{}, fmt.Errorf("ifindex %d in %s: %w", ifindex, netnsPath, err)
	}
	var out EndpointFilters
	for i, f := range endpointFilters(h, ifindex) {
		id, quarantined, err := filterEndpointID(f)
		if err != nil {
			return EndpointFilters{}, fmt.Errorf("ifindex %d in %s: %w", ifindex, netnsPath, err)
		}
		if i == 0 {
			out.Ingress = id
		} else {
			out.Egress = id
		}
		out.Quarantined = out.Quarantined || quarantined
	}
	return out, nil
}

func filterEndpointID(f clsBPF) (id uint32, quarantined bool, err error) {
	found, err := f.find(endpointFilterPrefix)
	if err != nil {
		return 0, false, err
	}
	for _, bf := range found {
		if bf.Name == quarantineName {
			return 0, true, nil
		}
		rest, _ := strings.CutPrefix(bf.Name, endpointFilterPrefix+"-")
		if id, err := strconv.ParseUint(rest, 10, 32); err == nil {
			return uint32(id), false, nil
		}
	}
	return 0, false, nil
}
