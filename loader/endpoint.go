package loader

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// The endpoint programs and the constant that tells them their endpoint.
const (
	progEndpointIngress = "endpoint_ingress"
	progEndpointEgress  = "endpoint_egress"
	varEndpointID       = "endpoint_id"
)

// EndpointAttachment describes the programs of one endpoint.
type EndpointAttachment struct {
	ID      uint32
	Ifindex int // inside the endpoint's netns
	Mode    AttachMode
	// IngressPin and EgressPin are the tcx link pins; empty for legacy.
	IngressPin, EgressPin string
}

// EndpointLinkPin is where the tcx link of endpoint id in direction
// ("ingress" or "egress") is pinned.
func EndpointLinkPin(dir string, id uint32, direction string) string {
	return filepath.Join(dir, linkDir, fmt.Sprintf("ep-%d-%s", id, direction))
}

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

// AttachEndpoint loads the programs of endpoint id and attaches them to
// ifindex, in the caller's netns: call it on a thread inside the container
// netns. With tcx, the links are pinned at EndpointLinkPin so that
// DetachEndpoint finds them from anywhere, also after the netns is gone;
// on kernels without tcx, clsact + cls_bpf filters are used (they go away
// with the interface). A previous attachment of id is replaced. On error
// nothing of this attachment is left.
func AttachEndpoint(dp *Datapath, id uint32, ifindex int) (EndpointAttachment, error) {
	return attachEndpoint(dp, id, ifindex, false)
}

// AttachEndpointLegacy is AttachEndpoint with clsact + cls_bpf filters even
// where tcx exists: the path of kernels before 6.6, callable on any kernel
// (tests, and operators whose tooling only knows tc filters).
func AttachEndpointLegacy(dp *Datapath, id uint32, ifindex int) (EndpointAttachment, error) {
	return attachEndpoint(dp, id, ifindex, true)
}

func attachEndpoint(dp *Datapath, id uint32, ifindex int, legacy bool) (att EndpointAttachment, err error) {
	ingress, egress, err := LoadEndpointPrograms(dp, id)
	if err != nil {
		return EndpointAttachment{}, err
	}
	// The attachments hold their own references.
	defer ingress.Close()
	defer egress.Close()

	// An ADD retried by the runtime, or a stale pin of a dead netns: the old
	// links may point at another interface, so they are removed rather than
	// updated.
	if err := detachEndpointLinks(dp.Dir, id); err != nil {
		return EndpointAttachment{}, err
	}
	if legacy {
		if err := attachEndpointLegacy(ifindex, ingress, egress); err != nil {
			return EndpointAttachment{}, err
		}
		return EndpointAttachment{ID: id, Ifindex: ifindex, Mode: AttachLegacy}, nil
	}
	att = EndpointAttachment{ID: id, Ifindex: ifindex, Mode: AttachTCX}
	type dirProg struct {
		name   string
		prog   *ebpf.Program
		attach ebpf.AttachType
		pin    *string
	}
	var pinned []string
	defer func() {
		if err != nil {
			for _, p := range pinned {
				unpinAndDetach(p)
			}
		}
	}()
	for _, d := range []dirProg{
		{"ingress", ingress, ebpf.AttachTCXIngress, &att.IngressPin},
		{"egress", egress, ebpf.AttachTCXEgress, &att.EgressPin},
	} {
		l, err := link.AttachTCX(link.TCXOptions{Interface: ifindex, Program: d.prog, Attach: d.attach})
		if errors.Is(err, ebpf.ErrNotSupported) && len(pinned) == 0 {
			if err := attachEndpointLegacy(ifindex, ingress, egress); err != nil {
				return EndpointAttachment{}, err
			}
			return EndpointAttachment{ID: id, Ifindex: ifindex, Mode: AttachLegacy}, nil
		}
		if err != nil {
			return EndpointAttachment{}, fmt.Errorf("attach tcx %s of endpoint %d to ifindex %d: %w", d.name, id, ifindex, err)
		}
		pin := EndpointLinkPin(dp.Dir, id, d.name)
		if err := pinLink(l, pin); err != nil {
			return EndpointAttachment{}, fmt.Errorf("pin tcx %s link of endpoint %d: %w", d.name, id, err)
		}
		pinned = append(pinned, pin)
		*d.pin = pin
	}
	return att, nil
}

// DetachEndpoint removes the tcx links of endpoint id; absent is fine, and it
// works when the interface or its netns is gone already. Legacy filters are
// not pinned: they go with the interface, or use DetachEndpointLegacy.
func DetachEndpoint(dp *Datapath, id uint32) error {
	return detachEndpointLinks(dp.Dir, id)
}

func detachEndpointLinks(dir string, id uint32) error {
	var errs []error
	for _, d := range []string{"ingress", "egress"} {
		if err := unpinAndDetach(EndpointLinkPin(dir, id, d)); err != nil {
			errs = append(errs, fmt.Errorf("detach %s of endpoint %d: %w", d, id, err))
		}
	}
	return errors.Join(errs...)
}

// unpinAndDetach detaches the link pinned at pin and removes the pin.
func unpinAndDetach(pin string) error {
	l, err := link.LoadPinnedLink(pin, nil)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil
	case err != nil:
		// Not a link we can open (a half-written pin): the pin is all there is.
		if rerr := os.Remove(pin); rerr != nil && !errors.Is(rerr, fs.ErrNotExist) {
			return rerr
		}
		return nil
	}
	defer l.Close()
	// Detach works even when other processes hold the link open. A link
	// whose interface is gone is defunct already: ENOLINK.
	derr := l.Detach()
	if err := l.Unpin(); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	if derr != nil && !errors.Is(derr, unix.ENOLINK) && !errors.Is(derr, ebpf.ErrNotSupported) {
		return derr
	}
	return nil
}

// EndpointLinks lists the endpoint ids that have a pinned link in dir, for
// garbage collection of links whose endpoint is gone.
func EndpointLinks(dir string) (map[uint32][]string, error) {
	entries, err := os.ReadDir(filepath.Join(dir, linkDir))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list links: %w", err)
	}
	out := map[uint32][]string{}
	for _, e := range entries {
		rest, ok := strings.CutPrefix(e.Name(), "ep-")
		if !ok {
			continue
		}
		num, _, ok := strings.Cut(rest, "-")
		if !ok {
			continue
		}
		id, err := strconv.ParseUint(num, 10, 32)
		if err != nil {
			continue
		}
		out[uint32(id)] = append(out[uint32(id)], filepath.Join(dir, linkDir, e.Name()))
	}
	return out, nil
}

// DetachEndpointLinkPins removes the given pins (from EndpointLinks).
func DetachEndpointLinkPins(pins []string) error {
	var errs []error
	for _, p := range pins {
		if err := unpinAndDetach(p); err != nil {
			errs = append(errs, fmt.Errorf("detach %s: %w", filepath.Base(p), err))
		}
	}
	return errors.Join(errs...)
}

const legacyEndpointName = "underpass-endpoint"

func endpointLegacyFilter(ifindex int, parent uint32, prog *ebpf.Program) *netlink.BpfFilter {
	f := &netlink.BpfFilter{
		FilterAttrs: netlink.FilterAttrs{
			LinkIndex: ifindex,
			Parent:    parent,
			Handle:    legacyHandle,
			Protocol:  unix.ETH_P_ALL,
			Priority:  legacyPrio,
		},
		Name:         legacyEndpointName,
		DirectAction: true,
	}
	if prog != nil {
		f.Fd = prog.FD()
	}
	return f
}

func attachEndpointLegacy(ifindex int, ingress, egress *ebpf.Program) (err error) {
	qdisc := &netlink.GenericQdisc{
		QdiscAttrs: netlink.QdiscAttrs{LinkIndex: ifindex, Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT},
		QdiscType:  "clsact",
	}
	if err := netlink.QdiscAdd(qdisc); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("attach legacy tc to ifindex %d: add clsact qdisc: %w", ifindex, err)
	}
	defer func() {
		if err != nil {
			_ = DetachEndpointLegacy(ifindex)
		}
	}()
	if err := netlink.FilterReplace(endpointLegacyFilter(ifindex, netlink.HANDLE_MIN_INGRESS, ingress)); err != nil {
		return fmt.Errorf("attach legacy tc ingress to ifindex %d: %w", ifindex, err)
	}
	if err := netlink.FilterReplace(endpointLegacyFilter(ifindex, netlink.HANDLE_MIN_EGRESS, egress)); err != nil {
		return fmt.Errorf("attach legacy tc egress to ifindex %d: %w", ifindex, err)
	}
	return nil
}

// DetachEndpointLegacy removes the endpoint's legacy cls_bpf filters from
// ifindex in the caller's netns; a missing interface or qdisc is fine.
func DetachEndpointLegacy(ifindex int) error {
	l, err := netlink.LinkByIndex(ifindex)
	if err != nil {
		return nil
	}
	var errs []error
	for _, parent := range []uint32{netlink.HANDLE_MIN_INGRESS, netlink.HANDLE_MIN_EGRESS} {
		filters, err := netlink.FilterList(l, parent)
		if err != nil {
			continue // no clsact qdisc
		}
		for _, f := range filters {
			if !IsLegacyFilter(f, legacyEndpointName) {
				continue
			}
			if err := netlink.FilterDel(f); err != nil && !errors.Is(err, unix.ENOENT) {
				errs = append(errs, err)
			}
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("detach legacy tc of ifindex %d: %w", ifindex, err)
	}
	return nil
}

// EndpointLinkIfindex reports the interface the pinned tcx link of endpoint
// id in direction is attached to: 0 when the link is defunct (its interface
// was deleted), fs.ErrNotExist when there is no pin.
func EndpointLinkIfindex(dir string, id uint32, direction string) (int, error) {
	l, err := link.LoadPinnedLink(EndpointLinkPin(dir, id, direction), nil)
	if err != nil {
		return 0, err
	}
	defer l.Close()
	info, err := l.Info()
	if err != nil {
		return 0, fmt.Errorf("link info: %w", err)
	}
	if tcx := info.TCX(); tcx != nil {
		return int(tcx.Ifindex), nil
	}
	return 0, fmt.Errorf("pinned link %d of endpoint %d is a %v link, not tcx", info.ID, id, info.Type)
}

// EndpointLegacyAttached reports whether ifindex (in the caller's netns)
// carries both endpoint filters of the legacy attachment.
func EndpointLegacyAttached(ifindex int) (bool, error) {
	l, err := netlink.LinkByIndex(ifindex)
	if err != nil {
		return false, err
	}
	for _, parent := range []uint32{netlink.HANDLE_MIN_INGRESS, netlink.HANDLE_MIN_EGRESS} {
		filters, err := netlink.FilterList(l, parent)
		if err != nil {
			return false, nil
		}
		found := false
		for _, f := range filters {
			if IsLegacyFilter(f, legacyEndpointName) {
				found = true
			}
		}
		if !found {
			return false, nil
		}
	}
	return true, nil
}
