package cni

import (
	"errors"
	"fmt"

	"github.com/containernetworking/cni/pkg/skel"

	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
)

// del is CNI DEL. It is idempotent and succeeds whatever is already gone:
// the netns, the link, the lease, the registration, or the whole datapath
// (then there is nothing of ours in it to remove, but the lease and the
// link still go).
func del(c *Conf, args *skel.CmdArgs) error {
	var errs []error

	// The lease goes while the link and the registration do, for the IPAM
	// types that need nothing of the interface (see overlapIPAM), but only
	// once the datapath lock is held: an ADD that gets the address next
	// registers it only after this DEL unregistered it.
	var release *background
	if !c.Chained && c.IPAM.Type != "" {
		release = newIPAMDel(c.IPAM.Type, args.StdinData)
	}
	// Any other IPAM type releases first, as in the reference plugins:
	// dhcp sends its DHCPRELEASE through the interface (without it the
	// server keeps the lease until it expires), and a plugin that asks a
	// daemon or an API server must not do so under the node's datapath
	// lock. The address may then go to another pod before this DEL
	// unregisters it; that pod's ADD fails until then, and is retried.
	early := release != nil && !overlapIPAM[c.IPAM.Type]
	if early {
		_ = release.wait() // its error is reported below
	}
	ranLocked := false
	locked := func() {
		ranLocked = true
		if release != nil && !early {
			release.start()
		}
	}
	if err := delLinkAndEndpoint(c, args, locked); err != nil {
		if errors.Is(err, errFailpoint) {
			return err
		}
		errs = append(errs, err)
	}
	if err := failpoint("del-unregister"); err != nil {
		return err
	}
	// Not when the lock could not be taken: the registration is still
	// there, and the runtime retries DEL.
	if release != nil && (ranLocked || early) {
		// host-local and static succeed for an address already released.
		if err := release.wait(); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...) // chained: the link and the lease are the previous plugin's
}

// delLinkAndEndpoint deletes the slave (main mode) and the registration,
// under the datapath lock from before the link goes until the registration
// is gone: the agent's endpoint GC confirms under the same lock, so it never
// finds the endpoint half-deleted (interface gone, registration still
// there) and takes it for a lost DEL. locked runs once the lock is held
// (or known not to be needed: no datapath).
func delLinkAndEndpoint(c *Conf, args *skel.CmdArgs, locked func()) error {
	var errs []error
	dp, err := loader.OpenForEndpoints(c.BPFFS)
	switch {
	case errors.Is(err, loader.ErrNotLoaded):
		log.Debug("datapath not loaded: nothing to unregister", "bpffs", c.BPFFS)
		dp = nil
	case err != nil:
		errs = append(errs, fmt.Errorf("open underpass datapath in %s: %w", c.BPFFS, err))
		dp = nil
	default:
		defer dp.Close()
		unlock, err := dp.Lock()
		if err != nil {
			return err // the runtime retries DEL
		}
		defer unlock()
	}
	locked()

	// Main mode: the link goes first, and the endpoint filters with it, so
	// unregistering has nothing left to detach.
	if !c.Chained && args.Netns != "" {
		if err := deleteLinkIn(args.Netns, args.IfName); err != nil {
			errs = append(errs, fmt.Errorf("delete %s: %w", args.IfName, err))
		}
	}
	if err := failpoint("del-link"); err != nil {
		return err
	}
	if dp != nil {
		if err := datapath.RemoveAttachment(dp, args.ContainerID, args.IfName); err != nil {
			errs = append(errs, fmt.Errorf("unregister endpoint: %w", err))
		}
	}
	return errors.Join(errs...)
}
