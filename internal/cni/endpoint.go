package cni

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/underpass-cni/underpass/internal/cidrs"
	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
)

// openDatapath opens the pinned datapath; "not loaded" becomes a CNI error
// with code (11 for ADD and CHECK, 50 for STATUS) telling what to do.
func openDatapath(dir string, code uint) (*loader.Objects, error) {
	dp, err := loader.OpenForEndpoints(dir)
	if errors.Is(err, loader.ErrNotLoaded) {
		return nil, types.NewError(code, fmt.Sprintf("underpass datapath not loaded in %s: start underpassd", dir), err.Error())
	}
	if err != nil {
		// Pins another build made (an upgrade under way) or cannot be
		// read: not usable now, as if not loaded, and said why.
		return nil, types.NewError(code, fmt.Sprintf("open underpass datapath in %s: %v", dir, err), "")
	}
	// A pod attached now would run with no counters and no spoofing guard.
	if err := dp.CheckEndpointPrograms(); err != nil {
		dp.Close()
		return nil, types.NewError(code, fmt.Sprintf("underpass datapath in %s is incomplete (%v): restart underpassd", dir, err), "")
	}
	return dp, nil
}

// checkServiceOverlap refuses endpoint subnets that overlap a service CIDR:
// the datapath would take traffic to such a pod for a stale service.
func checkServiceOverlap(m *loader.Maps, what string, prefixes []netip.Prefix) error {
	if len(prefixes) == 0 {
		return nil
	}
	svc, err := datapath.LPMEntries(m.SvcCidrs)
	if err != nil {
		return fmt.Errorf("read service CIDRs: %w", err)
	}
	set := make([]netip.Prefix, 0, len(svc))
	for p := range svc {
		set = append(set, p)
	}
	if err := cidrs.CheckDisjoint(what, prefixes, "service CIDR", set); err != nil {
		return invalidConf("%v", err)
	}
	return nil
}

// attachEndpoint makes ep live through datapath.AddEndpoint, marking the
// phases and running ADD's failpoints; then (nil: nothing) runs inside the
// container netns, where ADD configures the interface. On error nothing of
// it is left.
func attachEndpoint(dp *loader.Objects, netns ns.NetNS, ep *datapath.Endpoint, ph *phases, then func() error) error {
	_, err := datapath.AddEndpoint(dp, netns, ep, datapath.AddOptions{
		Log:    log,
		Locked: func() { ph.mark("lock_wait") },
		Registered: func() error {
			ph.mark("register")
			return failpoint("add-register")
		},
		Attached: func() error {
			ph.mark("attach_programs")
			return failpoint("add-attach")
		},
	}, then)
	return err
}
