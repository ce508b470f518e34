package ctl

import (
	"errors"
	"math"
	"os"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/features"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/underpass-cni/underpass/internal/attach"
)

// Attachment states, as shown. "defunct" is a pinned tcx link whose
// interface was deleted: the pin outlives it until underpassd cleans up.
// Endpoints show "tc", "none" or "wrong-endpoint".
const (
	attachTCX     = "tcx"
	attachLegacy  = "legacy"
	attachNone    = "none"
	attachDefunct = "defunct"
	attachTC      = "tc"             // endpoint filters
	attachWrong   = "wrong-endpoint" // filters of another endpoint id
)

// egressMode tells how role's program is attached to ifindex's egress.
func egressMode(dir string, role attach.Role, ifindex int) string {
	if mode, ok := tcxMode(attach.LinkPin(dir, role, ifindex)); ok {
		return mode
	}
	if legacyFilter(nil, ifindex, netlink.HANDLE_MIN_EGRESS, "underpass-"+string(role)) {
		return attachLegacy
	}
	return attachNone
}

// tcxMode reads a pinned tcx link: ok is false when there is no pin.
func tcxMode(pin string) (string, bool) {
	l, err := link.LoadPinnedLink(pin, nil)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return "", false
		}
		return attachDefunct, true
	}
	defer l.Close()
	info, err := l.Info()
	if err != nil {
		return attachDefunct, true
	}
	if tcx := info.TCX(); tcx == nil || tcx.Ifindex == 0 {
		return attachDefunct, true
	}
	return attachTCX, true
}

// legacyFilter reports whether ifindex has a cls_bpf filter named with
// prefix under parent (h nil: the caller's netns).
func legacyFilter(h *netlink.Handle, ifindex int, parent uint32, prefix string) bool {
	if h == nil {
		h = &netlink.Handle{}
	}
	l, err := h.LinkByIndex(ifindex)
	if err != nil {
		return false
	}
	filters, err := h.FilterList(l, parent)
	if err != nil {
		return false
	}
	for _, f := range filters {
		if attach.IsLegacyFilter(f, prefix) {
			return true
		}
	}
	return false
}

// xdpMode tells how parent_xdp runs on ifindex: the kernel reports the
// mode on the interface, not on the link.
func xdpMode(dir string, ifindex int) string {
	pinned := false
	if l, err := link.LoadPinnedLink(attach.XDPLinkPin(dir, ifindex), nil); err == nil {
		pinned = true
		l.Close()
	}
	l, err := netlink.LinkByIndex(ifindex)
	if err != nil || l.Attrs().Xdp == nil || !l.Attrs().Xdp.Attached {
		if pinned {
			return attachDefunct
		}
		return "off"
	}
	mode := "unknown"
	switch l.Attrs().Xdp.AttachMode {
	case 1: // XDP_ATTACHED_DRV
		mode = "native"
	case 2: // XDP_ATTACHED_SKB
		mode = "generic"
	case 3: // XDP_ATTACHED_HW
		mode = "offload"
	case 4: // XDP_ATTACHED_MULTI
		mode = "multi"
	}
	if !pinned {
		mode += " (not underpass)" // someone else's program
	}
	return mode
}

// endpointMode tells whether an endpoint's programs are attached: they
// are cls_bpf filters on the slave inside the pod's netns, named with the
// endpoint id.
func endpointMode(id uint32, netnsPath string, ifindex int) string {
	if netnsPath == "" {
		return attachNone // registered by hand, not by the plugin
	}
	att, err := attach.InspectEndpoint(netnsPath, ifindex)
	switch {
	case errors.Is(err, attach.ErrNetnsGone):
		return attachNone + " (netns gone)"
	case err != nil:
		return attachNone + " (interface gone)"
	case att.Ingress == id && att.Egress == id:
		return attachTC
	case att.Quarantined:
		return attachWrong
	case att.Ingress == 0 && att.Egress == 0:
		return attachNone
	}
	return attachWrong
}

func ifName(ifindex int) string {
	if l, err := netlink.LinkByIndex(ifindex); err == nil {
		return l.Attrs().Name
	}
	return ""
}

// Kernel is what the running kernel offers the datapath.
type Kernel struct {
	Release string `json:"release"`
	// TCX: bpf_link-based tc attachment (Linux 6.6); without it the
	// datapath falls back to clsact + cls_bpf filters.
	TCX     bool `json:"tcx"`
	XDP     bool `json:"xdp"`
	RingBuf bool `json:"ringbuf"`
	// XDPLoadBytes: bpf_xdp_load_bytes, which parent_xdp needs (5.18).
	XDPLoadBytes bool `json:"xdpLoadBytes"`
}

func probeKernel() Kernel {
	var k Kernel
	var u unix.Utsname
	if unix.Uname(&u) == nil {
		k.Release = unix.ByteSliceToString(u.Release[:])
	}
	k.TCX = haveTCX()
	k.XDP = features.HaveProgramType(ebpf.XDP) == nil
	k.RingBuf = features.HaveMapType(ebpf.RingBuf) == nil
	k.XDPLoadBytes = features.HaveProgramHelper(ebpf.XDP, asm.FnXdpLoadBytes) == nil
	return k
}

// haveTCX attaches a trivial program to an interface that cannot exist:
// a kernel with tcx says "no such device", one without says "not
// supported" (cilium/ebpf tells the two apart).
func haveTCX() bool {
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type: ebpf.SchedCLS, License: "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 0), asm.Return()},
	})
	if err != nil {
		return false
	}
	defer prog.Close()
	l, err := link.AttachTCX(link.TCXOptions{Interface: math.MaxInt32, Program: prog, Attach: ebpf.AttachTCXIngress})
	if err == nil {
		l.Close()
		return true
	}
	return !errors.Is(err, ebpf.ErrNotSupported)
}
