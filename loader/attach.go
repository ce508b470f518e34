package loader

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// AttachMode says how a program is attached.
type AttachMode string

const (
	AttachTCX    AttachMode = "tcx"
	AttachLegacy AttachMode = "legacy" // clsact qdisc + cls_bpf filter, before Linux 6.6
)

// Role names what an attachment is for; it is part of the link pin name.
type Role string

const (
	RoleParent Role = "parent"
	RoleUplink Role = "uplink"
)

// legacyPrio/legacyHandle identify our cls_bpf filter, so that replacing it
// swaps the program in place and detaching removes only ours.
const (
	legacyPrio   = 0xc0de
	legacyHandle = 1
)

// Attachment describes one attached program.
type Attachment struct {
	Role    Role
	Ifindex int
	Mode    AttachMode
	Pin     string // tcx link pin, empty for legacy
}

func linkPin(dir string, role Role, ifindex int) string {
	return filepath.Join(dir, linkDir, fmt.Sprintf("%s-egress-%d", role, ifindex))
}

// AttachEgress attaches the program for role to the egress of ifindex (in the
// caller's netns). If it is attached already, the program is replaced in
// place (link.Update for tcx, filter replace for legacy): no moment without
// a program, so re-running it is both idempotent and the upgrade path.
func (dp *Datapath) AttachEgress(role Role, ifindex int) (Attachment, error) {
	prog, err := dp.program(role)
	if err != nil {
		return Attachment{}, err
	}
	name := ifaceName(ifindex)
	pin := linkPin(dp.Dir, role, ifindex)
	att := Attachment{Role: role, Ifindex: ifindex, Mode: AttachTCX, Pin: pin}

	if l, err := link.LoadPinnedLink(pin, nil); err == nil {
		defer l.Close()
		if err := l.Update(prog); err == nil {
			return att, nil
		}
		// The interface went away and came back with the same index: the
		// old link is defunct. Drop the pin and attach afresh.
		l.Unpin()
	} else if !errors.Is(err, fs.ErrNotExist) {
		os.Remove(pin)
	}

	l, err := link.AttachTCX(link.TCXOptions{Interface: ifindex, Program: prog, Attach: ebpf.AttachTCXEgress})
	if errors.Is(err, ebpf.ErrNotSupported) {
		if err := attachLegacy(ifindex, prog, role); err != nil {
			return Attachment{}, fmt.Errorf("attach legacy tc egress %s: %w", name, err)
		}
		return Attachment{Role: role, Ifindex: ifindex, Mode: AttachLegacy}, nil
	}
	if err != nil {
		return Attachment{}, fmt.Errorf("attach tcx egress %s: %w", name, err)
	}
	defer l.Close()
	if err := os.MkdirAll(filepath.Dir(pin), 0o700); err != nil {
		return Attachment{}, fmt.Errorf("create link dir: %w", err)
	}
	if err := l.Pin(pin); err != nil {
		return Attachment{}, fmt.Errorf("pin tcx link of %s: %w", name, err)
	}
	// A legacy filter left by an older kernel's run would run twice.
	_ = detachLegacy(ifindex, role)
	return att, nil
}

// DetachEgress removes the attachment of role from ifindex; absent is fine.
func (dp *Datapath) DetachEgress(role Role, ifindex int) error {
	pin := linkPin(dp.Dir, role, ifindex)
	l, err := link.LoadPinnedLink(pin, nil)
	switch {
	case err == nil:
		// Detach works even when other processes hold the link open.
		derr := l.Detach()
		l.Unpin()
		l.Close()
		if derr != nil && !errors.Is(derr, unix.ENOLINK) && !errors.Is(derr, ebpf.ErrNotSupported) {
			return fmt.Errorf("detach tcx egress %s: %w", ifaceName(ifindex), derr)
		}
	case errors.Is(err, fs.ErrNotExist):
	default:
		os.Remove(pin)
	}
	if err := detachLegacy(ifindex, role); err != nil {
		return fmt.Errorf("detach legacy tc egress %s: %w", ifaceName(ifindex), err)
	}
	return nil
}

// Attachments lists the pinned tcx links in dir (legacy filters are not
// pinned; ask the interface).
func Attachments(dir string) ([]Attachment, error) {
	entries, err := os.ReadDir(filepath.Join(dir, linkDir))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list links: %w", err)
	}
	var out []Attachment
	for _, e := range entries {
		var role string
		var ifindex int
		name := strings.Replace(e.Name(), "-egress-", " ", 1)
		if _, err := fmt.Sscanf(name, "%s %d", &role, &ifindex); err != nil {
			continue
		}
		out = append(out, Attachment{Role: Role(role), Ifindex: ifindex, Mode: AttachTCX, Pin: filepath.Join(dir, linkDir, e.Name())})
	}
	return out, nil
}

func (dp *Datapath) program(role Role) (*ebpf.Program, error) {
	switch role {
	case RoleParent:
		return dp.Programs.ParentEgress, nil
	case RoleUplink:
		return dp.Programs.UplinkEgress, nil
	}
	return nil, fmt.Errorf("unknown attachment role %q", role)
}

func ifaceName(ifindex int) string {
	if l, err := netlink.LinkByIndex(ifindex); err == nil {
		return fmt.Sprintf("%s (ifindex %d)", l.Attrs().Name, ifindex)
	}
	return fmt.Sprintf("ifindex %d", ifindex)
}

func legacyFilter(ifindex int, prog *ebpf.Program, role Role) *netlink.BpfFilter {
	f := &netlink.BpfFilter{
		FilterAttrs: netlink.FilterAttrs{
			LinkIndex: ifindex,
			Parent:    netlink.HANDLE_MIN_EGRESS,
			Handle:    legacyHandle,
			Protocol:  unix.ETH_P_ALL,
			Priority:  legacyPrio,
		},
		Name:         "underpass-" + string(role),
		DirectAction: true,
	}
	if prog != nil {
		f.Fd = prog.FD()
	}
	return f
}

func attachLegacy(ifindex int, prog *ebpf.Program, role Role) error {
	qdisc := &netlink.GenericQdisc{
		QdiscAttrs: netlink.QdiscAttrs{LinkIndex: ifindex, Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT},
		QdiscType:  "clsact",
	}
	// Add, not replace: replacing a clsact would drop other tools' filters.
	if err := netlink.QdiscAdd(qdisc); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("add clsact qdisc: %w", err)
	}
	// Replace swaps the program of an existing filter atomically.
	if err := netlink.FilterReplace(legacyFilter(ifindex, prog, role)); err != nil {
		return fmt.Errorf("replace cls_bpf filter: %w", err)
	}
	return nil
}

func detachLegacy(ifindex int, role Role) error {
	l, err := netlink.LinkByIndex(ifindex)
	if err != nil {
		return nil // interface gone: so is the filter
	}
	filters, err := netlink.FilterList(l, netlink.HANDLE_MIN_EGRESS)
	if err != nil {
		return nil // no clsact qdisc
	}
	for _, f := range filters {
		bf, ok := f.(*netlink.BpfFilter)
		if !ok || bf.Priority != legacyPrio || !strings.HasPrefix(bf.Name, "underpass-"+string(role)) {
			continue
		}
		if err := netlink.FilterDel(bf); err != nil && !errors.Is(err, unix.ENOENT) {
			return err
		}
	}
	return nil
}
