package cni

import (
	"errors"
	"fmt"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/plugins/pkg/ipam"

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

	if err := delLinkAndEndpoint(c, args); err != nil {
		if errors.Is(err, errFailpoint) {
			return err
		}
		errs = append(errs, err)
	}
	if err := failpoint("del-unregister"); err != nil {
		return err
	}
	if c.Chained {
		return errors.Join(errs...) // the link and the lease are the previous plugin's
	}

	if c.IPAM.Type != "" {
		// host-local and static succeed for an address already released.
		if err := ipam.ExecDel(c.IPAM.Type, args.StdinData); err != nil {
			errs = append(errs, fmt.Errorf("ipam %s: %w", c.IPAM.Type, err))
		}
	}
	return errors.Join(errs...)
}

// delLinkAndEndpoint deletes the slave (main mode) and the registration,
// under the datapath lock from before the link goes until the registration
// is gone: the agent's endpoint GC confirms under the same lock, so it never
// finds the endpoint half-deleted (interface gone, registration still
// there) and takes it for a lost DEL. IPAM runs after, outside the lock.
func delLinkAndEndpoint(c *Conf, args *skel.CmdArgs) error {
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
		if err := detachEndpoint(dp, args.ContainerID, args.IfName); err != nil {
			errs = append(errs, fmt.Errorf("unregister endpoint: %w", err))
		}
	}
	return errors.Join(errs...)
}
