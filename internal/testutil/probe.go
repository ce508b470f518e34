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
