package loader

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
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

func xdpPin(dir string, ifindex int) string {
	return filepath.Join(dir, linkDir, fmt.Sprintf("parent-xdp-%d", ifindex))
}

// AttachXDP attaches parent_xdp to the parent's receive path (frames from
// the wire: it counts them per endpoint and reports IP conflicts). Already
// attached: the program is swapped in place. Returns the mode in effect.
func (dp *Datapath) AttachXDP(ifindex int, mode XDPMode) (XDPMode, error) {
	if mode == XDPOff || mode == "" {
		return XDPOff, dp.DetachXDP(ifindex)
	}
	pin := xdpPin(dp.Dir, ifindex)
	if l, err := link.LoadPinnedLink(pin, nil); err == nil {
		defer l.Close()
		if err := l.Update(dp.Programs.ParentXDP); err == nil {
			return modeOf(l, mode), nil
		}
		l.Unpin()
	} else if !errors.Is(err, fs.ErrNotExist) {
		os.Remove(pin)
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
		l, err := link.AttachXDP(link.XDPOptions{Program: dp.Programs.ParentXDP, Interface: ifindex, Flags: flags})
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", m, err))
			continue
		}
		defer l.Close()
		if err := os.MkdirAll(filepath.Dir(pin), 0o700); err != nil {
			return "", fmt.Errorf("create link dir: %w", err)
		}
		if err := l.Pin(pin); err != nil {
			return "", fmt.Errorf("pin xdp link of %s: %w", ifaceName(ifindex), err)
		}
		return m, nil
	}
	return "", fmt.Errorf("attach xdp %s: %w (set xdp: generic or off)", ifaceName(ifindex), errors.Join(errs...))
}

func modeOf(l link.Link, want XDPMode) XDPMode {
	if want != XDPAuto {
		return want
	}
	info, err := l.Info()
	if err != nil {
		return want
	}
	if x := info.XDP(); x != nil {
		return XDPAuto // the kernel does not report the mode of an XDP link
	}
	return want
}

// DetachXDP removes parent_xdp from ifindex; absent is fine.
func (dp *Datapath) DetachXDP(ifindex int) error {
	pin := xdpPin(dp.Dir, ifindex)
	l, err := link.LoadPinnedLink(pin, nil)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		os.Remove(pin)
		return nil
	}
	defer l.Close()
	derr := l.Detach()
	l.Unpin()
	if derr != nil && !errors.Is(derr, ebpf.ErrNotSupported) {
		return fmt.Errorf("detach xdp %s: %w", ifaceName(ifindex), derr)
	}
	return nil
}
