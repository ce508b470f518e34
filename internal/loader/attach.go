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

// Attachment describes one attached program.
type Attachment struct {
	Role    Role
	Ifindex int
	Mode    AttachMode
	Pin     string // tcx link pin, empty for legacy
}

// LinkPin is where the tcx link of role on ifindex is pinned.
func LinkPin(dir string, role Role, ifindex int) string {
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
	pin := LinkPin(dp.Dir, role, ifindex)
	att := Attachment{Role: role, Ifindex: ifindex, Mode: AttachTCX, Pin: pin}

	if updatePinned(pin, prog) {
		return att, nil
	}

	l, err := link.AttachTCX(link.TCXOptions{Interface: ifindex, Program: prog, Attach: ebpf.AttachTCXEgress})
	if errors.Is(err, ebpf.ErrNotSupported) {
		if err := parentFilter(ifindex, role).replace(prog); err != nil {
			return Attachment{}, fmt.Errorf("attach legacy tc egress %s: %w", IfaceName(ifindex), err)
		}
		return Attachment{Role: role, Ifindex: ifindex, Mode: AttachLegacy}, nil
	}
	if err != nil {
		return Attachment{}, fmt.Errorf("attach tcx egress %s: %w", IfaceName(ifindex), err)
	}
	if err := pinLink(l, pin); err != nil {
		return Attachment{}, fmt.Errorf("pin tcx link of %s: %w", IfaceName(ifindex), err)
	}
	// A legacy filter left by an older kernel's run would run twice: when
	// it cannot be removed, the new link goes again, so that a failed
	// attach leaves nothing behind and a retry attaches afresh.
	if err := parentFilter(ifindex, role).remove("underpass-" + string(role)); err != nil {
		err = fmt.Errorf("remove the legacy tc egress filter beside the tcx link of %s: %w", IfaceName(ifindex), err)
		if uerr := unpinAndDetach(pin); uerr != nil {
			err = errors.Join(err, fmt.Errorf("roll back the tcx link: %w", uerr))
		}
		return Attachment{}, err
	}
	return att, nil
}

// DetachEgress removes the attachment of role from ifindex; absent is fine.
func (dp *Datapath) DetachEgress(role Role, ifindex int) error {
	if err := unpinAndDetach(LinkPin(dp.Dir, role, ifindex)); err != nil {
		return fmt.Errorf("detach tcx egress %s: %w", IfaceName(ifindex), err)
	}
	if err := parentFilter(ifindex, role).remove("underpass-" + string(role)); err != nil {
		return fmt.Errorf("detach legacy tc egress %s: %w", IfaceName(ifindex), err)
	}
	return nil
}

// updatePinned swaps prog into the link pinned at pin, with no moment
// without a program. False when there is no usable link there: none, or a
// defunct one (its interface went away and came back with the same index),
// whose pin it removes; the caller attaches afresh.
func updatePinned(pin string, prog *ebpf.Program) bool {
	l, err := link.LoadPinnedLink(pin, nil)
	if errors.Is(err, fs.ErrNotExist) {
		return false
	}
	if err != nil {
		os.Remove(pin)
		return false
	}
	defer l.Close()
	if err := l.Update(prog); err == nil {
		return true
	}
	l.Unpin()
	return false
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

// pinLink pins a new link and drops this process's reference: from here on
// the pin keeps the attachment (closing an unpinned link detaches it).
func pinLink(l link.Link, pin string) error {
	defer l.Close()
	if err := os.MkdirAll(filepath.Dir(pin), 0o700); err != nil {
		return fmt.Errorf("create link dir: %w", err)
	}
	return l.Pin(pin)
}

// EgressPinned says whether role has a pinned tcx link on ifindex: one stat,
// where Attachments reads the whole link directory (two pins per pod).
func (dp *Datapath) EgressPinned(role Role, ifindex int) bool {
	_, err := os.Stat(LinkPin(dp.Dir, role, ifindex))
	return err == nil
}

// EgressCurrent says whether the tcx link pinned for role on ifindex is
// attached there and runs the pinned program already, so that attaching
// again would change nothing. The plugin asks on every ADD: a link update
// takes the RTNL lock, which every netlink change on the node waits for,
// and 100 pods starting at once would queue on it. False on any doubt
// (legacy TC, no pin, a defunct link): then attach.
func (dp *Datapath) EgressCurrent(role Role, ifindex int) bool {
	prog, err := dp.program(role)
	if err != nil {
		return false
	}
	l, err := link.LoadPinnedLink(LinkPin(dp.Dir, role, ifindex), nil)
	if err != nil {
		return false
	}
	defer l.Close()
	info, err := l.Info()
	if err != nil {
		return false
	}
	if tcx := info.TCX(); tcx == nil || int(tcx.Ifindex) != ifindex {
		return false // detached: its interface went away
	}
	pinfo, err := prog.Info()
	if err != nil {
		return false
	}
	id, ok := pinfo.ID()
	return ok && info.Program == id
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

// IfaceName names the host interface ifindex for messages: "eth0 (ifindex
// 2)", or "ifindex 2 (gone)".
func IfaceName(ifindex int) string {
	if l, err := netlink.LinkByIndex(ifindex); err == nil {
		return fmt.Sprintf("%s (ifindex %d)", l.Attrs().Name, ifindex)
	}
	return fmt.Sprintf("ifindex %d (gone)", ifindex)
}

// parentFilter is the legacy attachment of role on ifindex in the host netns.
func parentFilter(ifindex int, role Role) clsBPF {
	return clsBPF{h: hostHandle, ifindex: ifindex, hook: netlink.HANDLE_MIN_EGRESS, name: "underpass-" + string(role)}
}
