package attach

import (
	"errors"
	"fmt"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
)

// XDPMode is the agent's xdp setting.
type XDPMode string

const (
	XDPAuto    XDPMode = "auto" // native, else generic
	XDPNative  XDPMode = "native"
	XDPGeneric XDPMode = "generic"
	XDPOff     XDPMode = "off"
)

// XDPLinkPin is where the XDP link on parent ifindex is pinned.
func XDPLinkPin(dir string, ifindex int) string {
	return filepath.Join(dir, LinkDir, fmt.Sprintf("parent-xdp-%d", ifindex))
}

// XDPOptions name an XDP attachment: Program on the receive path of
// Ifindex in Mode, its link pinned under Dir.
type XDPOptions struct {
	Program *ebpf.Program
	Ifindex int
	Mode    XDPMode // "": XDPOff
	Dir     string  // the datapath's pin directory
}

// XDP attaches o.Program (parent_xdp) to the parent's receive path (frames
// from the wire: it counts them per endpoint and reports IP conflicts).
// Already attached: the program is swapped in place. XDPOff detaches.
// Returns the mode in effect.
func XDP(o XDPOptions) (XDPMode, error) {
	ifindex, mode := o.Ifindex, o.Mode
	if mode == XDPOff || mode == "" {
		return XDPOff, DetachXDP(o)
	}
	if o.Program == nil {
		return "", fmt.Errorf("attach xdp %s: no program", IfaceName(ifindex))
	}
	pin := XDPLinkPin(o.Dir, ifindex)
	// A link attached in another mode than the one asked for (xdp:
	// native -> generic) is replaced, not updated: an update keeps the
	// mode it was attached in. auto takes either.
	if cur := xdpAttachMode(ifindex); mode != XDPAuto && cur != "" && cur != mode {
		if err := DetachXDP(o); err != nil {
			return "", err
		}
	}
	if updatePinned(pin, o.Program) {
		// The kernel does not report the mode of an XDP link: for auto,
		// the caller learns only that it is attached.
		return mode, nil
	}

	try := []XDPMode{mode}
	if mode == XDPAuto {
		try = []XDPMode{XDPNative, XDPGeneric}
	}
	var errs []error
	for _, m := range try {
		flags := link.XDPDriverMode
		if m == XDPGeneric {
			flags = link.XDPGenericMode
		}
		l, err := link.AttachXDP(link.XDPOptions{Program: o.Program, Interface: ifindex, Flags: flags})
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", m, err))
			continue
		}
		if err := pinLink(l, pin); err != nil {
			return "", fmt.Errorf("pin xdp link of %s: %w", IfaceName(ifindex), err)
		}
		return m, nil
	}
	return "", fmt.Errorf("attach xdp %s: %w (set xdp: generic or off)", IfaceName(ifindex), errors.Join(errs...))
}

// DetachXDP removes the XDP link o names (only Ifindex and Dir count);
// absent is fine.
func DetachXDP(o XDPOptions) error {
	if err := unpinAndDetach(XDPLinkPin(o.Dir, o.Ifindex)); err != nil {
		return fmt.Errorf("detach xdp %s: %w", IfaceName(o.Ifindex), err)
	}
	return nil
}

// xdpAttachMode is the mode of the XDP program on ifindex, as netlink
// reports it: "" when none, or another (offloaded, several).
func xdpAttachMode(ifindex int) XDPMode {
	l, err := netlink.LinkByIndex(ifindex)
	if err != nil || l.Attrs().Xdp == nil || !l.Attrs().Xdp.Attached {
		return ""
	}
	switch l.Attrs().Xdp.AttachMode {
	case nl.XDP_ATTACHED_DRV:
		return XDPNative
	case nl.XDP_ATTACHED_SKB:
		return XDPGeneric
	}
	return ""
}
