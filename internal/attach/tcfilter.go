package attach

import (
	"errors"
	"fmt"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// legacyPrio/legacyHandle identify our cls_bpf filters, so that replacing
// one swaps the program in place and detaching removes only ours. One filter
// per hook: parents and uplinks use egress, endpoints both directions.
const (
	legacyPrio   = 0xc0de
	legacyHandle = 1
)

// clsBPF is one of our cls_bpf filters: on a clsact hook (HANDLE_MIN_INGRESS
// or HANDLE_MIN_EGRESS) of ifindex, in the netns h works in. The name says
// whose it is ("underpass-parent", "underpass-endpoint-7", …).
type clsBPF struct {
	h       tcNetlink
	ifindex int
	hook    uint32
	name    string
	classid uint32 // endpoints: the endpoint id, see AttachEndpoint
}

// tcNetlink is the part of a *netlink.Handle that cls_bpf attachment uses
// (a test fakes it to make a dump fail).
type tcNetlink interface {
	LinkByIndex(index int) (netlink.Link, error)
	QdiscAdd(qdisc netlink.Qdisc) error
	FilterList(link netlink.Link, parent uint32) ([]netlink.Filter, error)
	FilterReplace(filter netlink.Filter) error
	FilterDel(filter netlink.Filter) error
}

func (c clsBPF) filter(prog *ebpf.Program) *netlink.BpfFilter {
	f := &netlink.BpfFilter{
		FilterAttrs: netlink.FilterAttrs{
			LinkIndex: c.ifindex,
			Parent:    c.hook,
			Handle:    legacyHandle,
			Protocol:  unix.ETH_P_ALL,
			Priority:  legacyPrio,
		},
		Name:         c.name,
		ClassId:      c.classid,
		DirectAction: true,
	}
	if prog != nil {
		f.Fd = prog.FD()
	}
	return f
}

// replace installs prog, creating the clsact qdisc if needed; an existing
// filter of ours on the hook has its program swapped atomically.
func (c clsBPF) replace(prog *ebpf.Program) error {
	if err := c.ensureClsact(); err != nil {
		return err
	}
	return c.replaceFilter(prog)
}

// ensureClsact adds the clsact qdisc (both hooks) unless there is one.
func (c clsBPF) ensureClsact() error {
	qdisc := &netlink.GenericQdisc{
		QdiscAttrs: netlink.QdiscAttrs{LinkIndex: c.ifindex, Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT},
		QdiscType:  "clsact",
	}
	// Add, not replace: replacing a clsact would drop other tools' filters.
	if err := c.h.QdiscAdd(qdisc); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("add clsact qdisc: %w", err)
	}
	return nil
}

// replaceFilter is replace on a link that has its clsact qdisc.
func (c clsBPF) replaceFilter(prog *ebpf.Program) error {
	if err := c.h.FilterReplace(c.filter(prog)); err != nil {
		return fmt.Errorf("replace cls_bpf filter %s: %w", c.name, err)
	}
	return nil
}

// find returns our filters on the hook whose name starts with prefix. An
// interface that is gone took its filters with it, and a link without a
// clsact qdisc dumps none: both mean none. Any other failure is an error,
// never "none": a detach that could not look must not report success.
func (c clsBPF) find(prefix string) ([]*netlink.BpfFilter, error) {
	l, err := c.h.LinkByIndex(c.ifindex)
	if LinkGone(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("find ifindex %d: %w", c.ifindex, err)
	}
	filters, err := c.h.FilterList(l, c.hook)
	if LinkGone(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list the filters of %s: %w", l.Attrs().Name, err)
	}
	var out []*netlink.BpfFilter
	for _, f := range filters {
		if IsLegacyFilter(f, prefix) {
			out = append(out, f.(*netlink.BpfFilter))
		}
	}
	return out, nil
}

// LinkGone says whether err, from a netlink link lookup, means that the
// interface does not exist (any more).
func LinkGone(err error) bool {
	var nf netlink.LinkNotFoundError
	return errors.As(err, &nf) || errors.Is(err, unix.ENODEV)
}

// remove deletes our filters on the hook whose name starts with prefix;
// absent is fine.
func (c clsBPF) remove(prefix string) error {
	found, err := c.find(prefix)
	if err != nil {
		return err
	}
	for _, f := range found {
		if err := c.h.FilterDel(f); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.ENODEV) {
			return fmt.Errorf("delete cls_bpf filter %s: %w", f.Name, err)
		}
	}
	return nil
}

// IsLegacyFilter says whether f is one of our cls_bpf filters whose name
// starts with prefix ("underpass-parent", "underpass-endpoint", …).
func IsLegacyFilter(f netlink.Filter, prefix string) bool {
	bf, ok := f.(*netlink.BpfFilter)
	return ok && bf.Priority == legacyPrio && strings.HasPrefix(bf.Name, prefix)
}

// hostHandle works in the caller's netns, like the netlink package
// functions.
var hostHandle = &netlink.Handle{}
