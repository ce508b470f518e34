// Package attach puts the loaded programs on interfaces and takes them off:
// tcx egress links on parents and uplinks (legacy clsact filters before
// Linux 6.6), XDP links on parents, cls_bpf filters on endpoint slaves in
// their netns. Every attachment is one call with an options struct, as in
// cilium/ebpf's link package; loader.Objects fills the options
// (EgressTarget, XDPTarget, EndpointTarget). Links are pinned under the
// datapath's pin directory, so they outlive the process that made them.
package attach

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

// LinkDir is the directory of link pins inside the pin directory.
const LinkDir = "links"

// Mode says how a program is attached.
type Mode string

const (
	TCX    Mode = "tcx"
	Legacy Mode = "legacy" // clsact qdisc + cls_bpf filter, before Linux 6.6
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
	Mode    Mode
	Pin     string // tcx link pin, empty for legacy
}

// EgressOptions name an egress attachment: Program, run as Role on the
// egress of Ifindex (in the caller's netns), its link pinned under Dir.
type EgressOptions struct {
	Program *ebpf.Program
	Role    Role
	Ifindex int
	Dir     string // the datapath's pin directory
}

func (o EgressOptions) pin() string { return LinkPin(o.Dir, o.Role, o.Ifindex) }

func (o EgressOptions) legacy() clsBPF { return parentFilter(o.Ifindex, o.Role) }

// LinkPin is where the tcx link of role on ifindex is pinned.
func LinkPin(dir string, role Role, ifindex int) string {
	return filepath.Join(dir, LinkDir, fmt.Sprintf("%s-egress-%d", role, ifindex))
}

// Egress attaches o.Program to the egress of o.Ifindex. If it is attached
// already, the program is replaced in place (link.Update for tcx, filter
// replace for legacy): no moment without a program, so re-running it is
// both idempotent and the upgrade path.
func Egress(o EgressOptions) (Attachment, error) {
	if o.Program == nil {
		return Attachment{}, fmt.Errorf("no program for role %q", o.Role)
	}
	ifindex, prog, pin := o.Ifindex, o.Program, o.pin()
	att := Attachment{Role: o.Role, Ifindex: ifindex, Mode: TCX, Pin: pin}

	if updatePinned(pin, prog) {
		return att, nil
	}

	l, err := link.AttachTCX(link.TCXOptions{Interface: ifindex, Program: prog, Attach: ebpf.AttachTCXEgress})
	if errors.Is(err, ebpf.ErrNotSupported) {
		if err := o.legacy().replace(prog); err != nil {
			return Attachment{}, fmt.Errorf("attach legacy tc egress %s: %w", IfaceName(ifindex), err)
		}
		return Attachment{Role: o.Role, Ifindex: ifindex, Mode: Legacy}, nil
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
	if err := o.legacy().remove(LegacyFilterName(o.Role)); err != nil {
		err = fmt.Errorf("remove the legacy tc egress filter beside the tcx link of %s: %w", IfaceName(ifindex), err)
		if uerr := unpinAndDetach(pin); uerr != nil {
			err = errors.Join(err, fmt.Errorf("roll back the tcx link: %w", uerr))
		}
		return Attachment{}, err
	}
	return att, nil
}

// DetachEgress removes the attachment o names (o.Program is not needed);
// absent is fine.
func DetachEgress(o EgressOptions) error {
	if err := unpinAndDetach(o.pin()); err != nil {
		return fmt.Errorf("detach tcx egress %s: %w", IfaceName(o.Ifindex), err)
	}
	if err := o.legacy().remove(LegacyFilterName(o.Role)); err != nil {
		return fmt.Errorf("detach legacy tc egress %s: %w", IfaceName(o.Ifindex), err)
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

// EgressPinned says whether o has a pinned tcx link: one stat, where List
// reads the whole link directory.
func EgressPinned(o EgressOptions) bool {
	_, err := os.Stat(o.pin())
	return err == nil
}

// EgressCurrent says whether the tcx link pinned for o is attached to
// o.Ifindex and runs o.Program already, so that attaching again would
// change nothing. The plugin asks on every ADD: a link update
// takes the RTNL lock, which every netlink change on the node waits for,
// and 100 pods starting at once would queue on it. False on any doubt
// (legacy TC, no pin, a defunct link): then attach.
func EgressCurrent(o EgressOptions) bool {
	prog, ifindex := o.Program, o.Ifindex
	if prog == nil {
		return false
	}
	l, err := link.LoadPinnedLink(o.pin(), nil)
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

// List lists the pinned tcx links in the pin directory dir (legacy filters
// are not pinned; ask the interface).
func List(dir string) ([]Attachment, error) {
	entries, err := os.ReadDir(filepath.Join(dir, LinkDir))
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
		out = append(out, Attachment{Role: Role(role), Ifindex: ifindex, Mode: TCX, Pin: filepath.Join(dir, LinkDir, e.Name())})
	}
	return out, nil
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
	return clsBPF{h: hostHandle, ifindex: ifindex, hook: netlink.HANDLE_MIN_EGRESS, name: LegacyFilterName(role)}
}

// LegacyFilterName is the name of role's cls_bpf filter on kernels
// without tcx.
func LegacyFilterName(role Role) string { return "underpass-" + string(role) }
