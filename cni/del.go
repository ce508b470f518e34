package cni

import (
	"errors"
	"fmt"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/plugins/pkg/ipam"
	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/underpass-cni/underpass/loader"
)

// Del is CNI DEL. It is idempotent and succeeds whatever is already gone:
// the netns, the link, the lease, the registration, or the whole datapath
// (then there is nothing of ours in it to remove, but the lease and the
// link still go).
func Del(args *skel.CmdArgs) error { return cniError(del(args)) }

func del(args *skel.CmdArgs) error {
	c, err := parseConfForDel(args.StdinData)
	if err != nil {
		return err
	}
	var errs []error

	// Main mode: the link goes first. Deleting it tears its tcx entries
	// down with the device, so the links unpinned below are defunct
	// already and detaching them is free; detaching live tcx links costs
	// an RCU grace period each (~10-20 ms on a busy VM), under rtnl.
	if !c.Chained && args.Netns != "" {
		if err := deleteLinkIn(args.Netns, args.IfName); err != nil {
			errs = append(errs, fmt.Errorf("delete %s: %w", args.IfName, err))
		}
	}

	dp, err := loader.Open(c.BPFFS)
	switch {
	case errors.Is(err, loader.ErrNotLoaded):
		log.Debug("datapath not loaded: nothing to unregister", "bpffs", c.BPFFS)
	case err != nil:
		errs = append(errs, fmt.Errorf("open underpass datapath in %s: %w", c.BPFFS, err))
	default:
		defer dp.Close()
		if err := detachEndpoint(dp, args.ContainerID, args.IfName); err != nil {
			errs = append(errs, fmt.Errorf("unregister endpoint: %w", err))
		}
	}

	if c.Chained {
		// The link is the previous plugin's, which deletes it after us.
		// Legacy filters (no tcx) hold our programs until then; remove
		// them so nothing of ours outlives the registration.
		if args.Netns != "" {
			err := ns.WithNetNSPath(args.Netns, func(ns.NetNS) error {
				if l, err := netlinksafe.LinkByName(args.IfName); err == nil {
					return loader.DetachEndpointLegacy(l.Attrs().Index)
				}
				return nil
			})
			var gone ns.NSPathNotExistErr
			if err != nil && !errors.As(err, &gone) {
				errs = append(errs, err)
			}
		}
		return errors.Join(errs...)
	}

	if c.IPAM.Type != "" {
		// host-local and static succeed for an address already released.
		if err := ipam.ExecDel(c.IPAM.Type, args.StdinData); err != nil {
			errs = append(errs, fmt.Errorf("ipam %s: %w", c.IPAM.Type, err))
		}
	}
	return errors.Join(errs...)
}
