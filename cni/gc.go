package cni

import (
	"context"
	"errors"
	"fmt"

	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"

	"github.com/underpass-cni/underpass/loader"
	"github.com/underpass-cni/underpass/pkg/datapath"
)

// GC is CNI GC (1.1.0): registrations whose attachment is not in
// cni.dev/valid-attachments go, with their filters in the pod netns if that
// still exists; then the IPAM plugin collects its leases.
//
// The registry is node-wide and does not record which network an endpoint
// belongs to, so in main mode GC only looks at endpoints on this network's
// master; a chained network looks at all of them (one underpass network per
// node is the supported layout for GC in chained mode).
func GC(args *skel.CmdArgs) error { return cniError(gc(args)) }

func gc(args *skel.CmdArgs) error {
	c, err := ParseConf(args.StdinData)
	if err != nil {
		return err
	}
	var errs []error
	dp, err := loader.OpenForEndpoints(c.BPFFS)
	switch {
	case errors.Is(err, loader.ErrNotLoaded):
		log.Debug("datapath not loaded: nothing to collect", "bpffs", c.BPFFS)
	case err != nil:
		errs = append(errs, fmt.Errorf("open underpass datapath in %s: %w", c.BPFFS, err))
	default:
		defer dp.Close()
		parent := 0
		if !c.Chained {
			if l, err := resolveMaster(c.Master); err == nil {
				parent = l.Attrs().Index
			} else {
				// No master, no endpoints of this network can be live on it;
				// but another network's might be: collect nothing.
				errs = append(errs, fmt.Errorf("gc: %w", err))
			}
		}
		if parent != 0 || c.Chained {
			errs = append(errs, collect(dp, c.ValidAttachments, parent))
		}
	}
	if !c.Chained && c.IPAM.Type != "" {
		if err := invoke.DelegateGC(context.TODO(), c.IPAM.Type, args.StdinData, nil); err != nil {
			errs = append(errs, fmt.Errorf("ipam %s: %w", c.IPAM.Type, err))
		}
	}
	return errors.Join(errs...)
}

// collect removes endpoints on parent (0: any) that are not valid.
func collect(dp *loader.Datapath, valid []types.GCAttachment, parent int) error {
	unlock, err := dp.Lock()
	if err != nil {
		return err
	}
	defer unlock()
	keep := map[types.GCAttachment]bool{}
	for _, a := range valid {
		keep[a] = true
	}
	eps, err := datapath.Endpoints(&dp.Maps)
	if err != nil {
		return err
	}
	var errs []error
	for id, ep := range eps {
		if parent != 0 && int(ep.ParentIfindex) != parent {
			continue
		}
		a := types.GCAttachment{ContainerID: datapath.GoString(ep.ContainerId[:]), IfName: datapath.GoString(ep.Ifname[:])}
		if keep[a] {
			continue
		}
		log.Debug("collecting endpoint", "id", id, "container", a.ContainerID, "ifname", a.IfName)
		if err := removeEndpoint(dp, id); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
