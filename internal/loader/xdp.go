package loader

import (
	"errors"
	"fmt"
	"path/filepath"

	"github.com/cilium/ebpf/link"
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
	return filepath.Join(dir, linkDir, fmt.Sprintf("parent-xdp-%d", ifindex))
}

// AttachXDP attaches parent_xdp to the parent's receive path (frames from
// the wire: it counts them per endpoint and reports IP conflicts). Already
// attached: the program is swapped in place. Returns the mode in effect.
func (dp *Datapath) AttachXDP(ifindex int, mode XDPMode) (XDPMode, error) {
	if mode == XDPOff || mode == "" {
		return XDPOff, dp.DetachXDP(ifindex)
	}
	pin := XDPLinkPin(dp.Dir, ifindex)
	if updatePinned(pin, dp.Programs.ParentXdp) {
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
		l, err := link.AttachXDP(link.XDPOptions{Program: dp.Programs.ParentXdp, Interface: ifindex, Flags: flags})
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

// DetachXDP removes parent_xdp from ifindex; absent is fine.
func (dp *Datapath) DetachXDP(ifindex int) error {
	if err := unpinAndDetach(XDPLinkPin(dp.Dir, ifindex)); err != nil {
		return fmt.Errorf("detach xdp %s: %w", IfaceName(ifindex), err)
	}
	return nil
}
