package cni

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"

	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
)

// gc is CNI GC (1.1.0): this network's registrations whose attachment is
// not in cni.dev/valid-attachments go, with their filters in the pod netns
// if that still exists; then the IPAM plugin (main mode) collects its
// leases.
//
// Every registration records the CNI network name it was added under, and
// GC looks at its own network's only: the runtime sends one GC per network
// with that network's attachments, so another network's live pods (on the
// same parent or not) are never in the list and must not be judged by it.
func gc(c *Conf, args *skel.CmdArgs) error {
	// Without the list every registration of the network would look
	// invalid: its pods would lose their guard. Runtimes send it through
	// libcni (null or [] when none is valid) under both names the spec has
	// used; cnitool's gc sends none.
	var keys map[string]json.RawMessage
	if err := json.Unmarshal(args.StdinData, &keys); err != nil {
		return types.NewError(types.ErrDecodingFailure, fmt.Sprintf("parse network configuration: %v", err), "")
	}
	if _, ok := keys["cni.dev/valid-attachments"]; !ok {
		old, ok := keys["cni.dev/attachments"]
		if !ok {
			return invalidConf("GC without cni.dev/valid-attachments: nothing collected (the runtime must list the attachments still in use)")
		}
		if err := json.Unmarshal(old, &c.ValidAttachments); err != nil {
			return types.NewError(types.ErrDecodingFailure, fmt.Sprintf("cni.dev/attachments: %v", err), "")
		}
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
		errs = append(errs, collect(dp, c.Name, c.ValidAttachments))
	}
	if !c.Chained && c.IPAM.Type != "" {
		if err := invoke.DelegateGC(context.TODO(), c.IPAM.Type, args.StdinData, nil); err != nil {
			errs = append(errs, fmt.Errorf("ipam %s: %w", c.IPAM.Type, err))
		}
	}
	return errors.Join(errs...)
}

// collect removes the endpoints of network that are not valid.
func collect(dp *loader.Objects, network string, valid []types.GCAttachment) error {
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
		if ep.Network != network {
			continue
		}
		a := types.GCAttachment{ContainerID: ep.ContainerID, IfName: ep.IfName}
		if keep[a] {
			continue
		}
		log.Debug("collecting endpoint", "id", id, "network", network, "container", a.ContainerID, "ifname", a.IfName)
		if err := datapath.RemoveEndpoint(dp, id); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
