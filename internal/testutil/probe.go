package testutil

import (
	"errors"
	"fmt"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// ProbeIPVS reports whether the kernel has IPVS (kube-proxy's ipvs mode):
// nil when the IPVS generic-netlink family, which ip_vs registers when it
// loads, is there; NotSupported("ip_vs", …) when it is not. Tests do not
// load modules: on a kernel with ip_vs as a module, load it first
// (modprobe ip_vs ip_vs_rr; the VM matrix does). Pass the result to
// SkipIfNotSupported.
func ProbeIPVS() error {
	_, err := netlink.GenlFamilyGet("IPVS")
	if errors.Is(err, unix.ENOENT) {
		return NotSupported("ip_vs", fmt.Errorf("no IPVS generic netlink family (ip_vs not built in or not loaded): %w", err))
	}
	if err != nil {
		return fmt.Errorf("ip_vs probe: %w", err)
	}
	return nil
}

// ProbeVLAN reports whether the kernel can create 802.1Q VLAN links: nil,
// or an error wrapped with NotSupported("vlan", …) when the 8021q
// driver is missing (not built, or a module not loaded: tests do not load
// modules; the VM matrix loads 8021q at boot). Pass the result to
// SkipIfNotSupported.
func ProbeVLAN() error {
	return ProbeLink("vlan", "no 802.1Q VLAN link type (8021q not built in or not loaded)", func(lower int) netlink.Link {
		return &netlink.Vlan{LinkAttrs: netlink.LinkAttrs{Name: "probe0.100", ParentIndex: lower}, VlanId: 100}
	})
}

// ProbeLink reports whether the kernel can create the link upper makes on
// a lower device: nil, or an error wrapped with NotSupported(feature, …)
// (why in front) when the kernel has no such link type. It tries in a
// throw-away netns, on a dummy lower device, or a veth where there is no
// dummy driver.
func ProbeLink(feature, why string, upper func(lower int) netlink.Link) error {
	return OnOwnThread(func() error {
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			return fmt.Errorf("unshare: %w", err)
		}
		h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
		if err != nil {
			return err
		}
		defer h.Close()
		if err := h.LinkAdd(&netlink.Dummy{LinkAttrs: netlink.LinkAttrs{Name: "probe0"}}); err != nil {
			if err := h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "probe0"}, PeerName: "probe1"}); err != nil {
				return fmt.Errorf("probe lower device: %w", err)
			}
		}
		p, err := h.LinkByName("probe0")
		if err != nil {
			return err
		}
		err = h.LinkAdd(upper(p.Attrs().Index))
		if errors.Is(err, unix.EOPNOTSUPP) {
			err = NotSupported(feature, fmt.Errorf("%s: %w", why, err))
		}
		return err
	})
}
