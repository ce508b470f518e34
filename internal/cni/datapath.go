package cni

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/underpass-cni/underpass/internal/cidrs"
	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
)

// openDatapath opens the pinned datapath; "not loaded" becomes a CNI error
// with code (11 for ADD and CHECK, 50 for STATUS) telling what to do.
func openDatapath(dir string, code uint) (*loader.Datapath, error) {
	dp, err := loader.OpenForEndpoints(dir)
	if errors.Is(err, loader.ErrNotLoaded) {
		return nil, types.NewError(code, fmt.Sprintf("underpass datapath not loaded in %s: start underpassd", dir), err.Error())
	}
	if err != nil {
		return nil, fmt.Errorf("open underpass datapath in %s: %w", dir, err)
	}
	// A pod attached now would run with no counters and no spoofing guard.
	if err := dp.CheckEndpointPrograms(); err != nil {
		dp.Close()
		return nil, types.NewError(code, fmt.Sprintf("underpass datapath in %s is incomplete (%v): restart underpassd", dir, err), "")
	}
	return dp, nil
}

// endpoint is everything the datapath learns about one attachment.
type endpoint struct {
	ContainerID  string
	IfName       string
	Netns        string
	Ifindex      int // in the container netns
	MAC          net.HardwareAddr
	Addrs        []netip.Prefix
	ParentIndex  int // in the host netns
	ParentName   string
	ParentMAC    net.HardwareAddr
	Mode         loader.Mode
	PodName      string
	PodNamespace string
	Network      string // the CNI network name
}

func (e *endpoint) spec() datapath.EndpointSpec {
	return datapath.EndpointSpec{
		ContainerID: e.ContainerID, IfName: e.IfName, Netns: e.Netns,
		ParentIfindex: e.ParentIndex, ParentName: e.ParentName, Ifindex: e.Ifindex,
		Mode: e.Mode, MAC: e.MAC, Addrs: e.Addrs, PodName: e.PodName, PodNamespace: e.PodNamespace,
		Network: e.Network,
	}
}

// checkServiceOverlap refuses endpoint subnets that overlap a service CIDR:
// the datapath would take traffic to such a pod for a stale service.
func checkServiceOverlap(m *loader.Maps, what string, prefixes []netip.Prefix) error {
	if len(prefixes) == 0 {
		return nil
	}
	svc, err := datapath.LPMEntries(m.SvcCIDRs)
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

// parentState records what an ADD did to the parent, so that a failed ADD
// undoes exactly that.
type parentState struct {
	registered bool // the parents entry is ours
	attached   bool // the parent's egress link is ours
}

// attachEndpoint registers ep (and its parent), attaches the endpoint
// programs inside netns and then, still in there, runs then (nil: nothing),
// with which ADD configures the interface. On error nothing of it is left.
func attachEndpoint(dp *loader.Datapath, netns ns.NetNS, ep *endpoint, ph *phases, then func() error) (err error) {
	id, ps, err := registerEndpoint(dp, ep, ph)
	if err != nil {
		return err
	}
	ph.mark("register")
	defer func() {
		if err != nil {
			if uerr := unregisterEndpoint(dp, id, ep.ParentIndex, ps); uerr != nil {
				err = errors.Join(err, fmt.Errorf("roll back: %w", uerr))
			}
		}
	}()
	if err := failpoint("add-register"); err != nil {
		return err
	}
	// Outside the lock: the registration owns the id already.
	err = netns.Do(func(ns.NetNS) error {
		if err := loader.AttachEndpointHere(dp, id, ep.Ifindex); err != nil {
			return fmt.Errorf("attach endpoint programs to %s: %w", ep.IfName, err)
		}
		ph.mark("attach_programs")
		log.Debug("attached endpoint programs", "id", id, "ifindex", ep.Ifindex)
		if err := failpoint("add-attach"); err != nil {
			return err
		}
		if then == nil {
			return nil
		}
		return then()
	})
	return err
}

// registerEndpoint does the locked part of ADD: parent, stale owners, the
// endpoint's entries.
func registerEndpoint(dp *loader.Datapath, ep *endpoint, ph *phases) (id uint32, ps parentState, err error) {
	unlock, err := dp.Lock()
	if err != nil {
		return 0, ps, err
	}
	defer unlock()
	ph.mark("lock_wait")
	m := &dp.Maps

	if ps, err = ensureParent(dp, ep); err != nil {
		return 0, ps, err
	}
	defer func() {
		if err != nil {
			if perr := undoParent(dp, ep.ParentIndex, ps); perr != nil {
				err = errors.Join(err, fmt.Errorf("roll back parent: %w", perr))
			}
		}
	}()

	// A retried ADD: its old filters go with its old registration
	// (Register replaces the entries but knows nothing of filters).
	if old, _, err := datapath.Find(m, ep.ContainerID, ep.IfName); err != nil {
		return 0, ps, err
	} else if old != 0 {
		if err := removeEndpoint(dp, old); err != nil {
			return 0, ps, err
		}
	}
	if err := evictStaleOwners(dp, ep); err != nil {
		return 0, ps, err
	}
	id, err = datapath.Register(m, ep.spec())
	if err != nil {
		return 0, ps, fmt.Errorf("register endpoint %s/%s: %w", ep.ContainerID, ep.IfName, err)
	}
	log.Debug("registered endpoint", "id", id, "container", ep.ContainerID, "ifname", ep.IfName, "addrs", ep.Addrs)
	return id, ps, nil
}

// ensureParent registers the parent and attaches its egress program unless
// that is done: the agent does it too, but pods must come up while the
// agent restarts.
func ensureParent(dp *loader.Datapath, ep *endpoint) (ps parentState, err error) {
	m := &dp.Maps
	cur, gerr := datapath.GetParent(m, ep.ParentIndex)
	switch {
	case gerr == nil && net.HardwareAddr(cur.Mac[:]).String() == ep.ParentMAC.String() && cur.Mode == uint8(ep.Mode):
	case gerr == nil || errors.Is(gerr, datapath.ErrNoParent):
		if err := datapath.PutParent(m, ep.ParentIndex, ep.ParentMAC, ep.Mode); err != nil {
			return ps, err
		}
		ps.registered = gerr != nil
	default:
		return ps, fmt.Errorf("read parent %s: %w", ep.ParentName, gerr)
	}
	defer func() {
		if err != nil {
			if perr := undoParent(dp, ep.ParentIndex, ps); perr != nil {
				err = errors.Join(err, perr)
			}
			ps = parentState{}
		}
	}()

	// The agent attached it (the common case): nothing to do. Otherwise
	// attaching swaps the pinned program into whatever is there.
	if dp.EgressCurrent(loader.RoleParent, ep.ParentIndex) {
		return ps, nil
	}
	had := dp.EgressPinned(loader.RoleParent, ep.ParentIndex)
	att, err := dp.AttachEgress(loader.RoleParent, ep.ParentIndex)
	if err != nil {
		return ps, fmt.Errorf("attach the hairpin program to parent %s: %w", ep.ParentName, err)
	}
	ps.attached = !had && att.Mode == loader.AttachTCX
	return ps, nil
}

// undoParent removes what an ADD added to the parent, unless an endpoint
// uses the parent by now. Call with the lock held.
func undoParent(dp *loader.Datapath, ifindex int, ps parentState) error {
	if !ps.registered && !ps.attached {
		return nil
	}
	eps, err := datapath.Endpoints(&dp.Maps)
	if err != nil {
		return err
	}
	for _, e := range eps {
		if int(e.ParentIfindex) == ifindex {
			return nil
		}
	}
	var errs []error
	if ps.attached {
		errs = append(errs, dp.DetachEgress(loader.RoleParent, ifindex))
	}
	if ps.registered {
		errs = append(errs, datapath.DeleteParent(&dp.Maps, ifindex))
	}
	return errors.Join(errs...)
}

// unregisterEndpoint is the rollback of a whole attachEndpoint.
func unregisterEndpoint(dp *loader.Datapath, id uint32, parentIndex int, ps parentState) error {
	unlock, err := dp.Lock()
	if err != nil {
		return err
	}
	defer unlock()
	return errors.Join(removeEndpoint(dp, id), undoParent(dp, parentIndex, ps))
}

// removeEndpoint detaches and unregisters endpoint id. Call with the lock.
// The filters are found through the registration: they live on the slave
// in the pod's netns (nothing to do when that is gone).
func removeEndpoint(dp *loader.Datapath, id uint32) error {
	var ep loader.Endpoint
	var errs []error
	if err := dp.Maps.Endpoints.Lookup(id, &ep); err == nil {
		errs = append(errs, loader.DetachEndpoint(datapath.GoString(ep.Netns[:]), int(ep.Ifindex), id))
	}
	return errors.Join(append(errs, datapath.Unregister(&dp.Maps, id))...)
}

// evictStaleOwners handles an address IPAM handed out that the datapath
// still has for another endpoint. IPAM is the authority on addresses, so
// when that endpoint's netns is gone its DEL was lost, and its entries go.
// A live owner is a real conflict: fail, saying which pod has it.
func evictStaleOwners(dp *loader.Datapath, ep *endpoint) error {
	m := &dp.Maps
	for _, p := range ep.Addrs {
		k := datapath.EpIPKey(p.Addr(), ep.ParentIndex)
		var ref loader.EndpointRef
		if err := m.EpByIP.Lookup(&k, &ref); err != nil {
			continue
		}
		var other loader.Endpoint
		if err := m.Endpoints.Lookup(ref.Id, &other); err != nil {
			continue // Unregister of that one is under way or done
		}
		cid, ifname := datapath.GoString(other.ContainerId[:]), datapath.GoString(other.Ifname[:])
		if cid == ep.ContainerID && ifname == ep.IfName {
			continue
		}
		netnsPath := datapath.GoString(other.Netns[:])
		if netnsPath != "" {
			if err := loader.CheckNetns(netnsPath); errors.Is(err, loader.ErrNetnsGone) {
				log.Debug("evicting stale endpoint", "id", ref.Id, "container", cid, "netns", netnsPath, "addr", p.Addr())
				if err := removeEndpoint(dp, ref.Id); err != nil {
					return fmt.Errorf("remove stale endpoint %d (container %s): %w", ref.Id, cid, err)
				}
				continue
			}
		}
		pod := ""
		if n := datapath.GoString(other.PodName[:]); n != "" {
			pod = fmt.Sprintf(" (pod %s/%s)", datapath.GoString(other.PodNamespace[:]), n)
		}
		return errorf(types.ErrInternal, "address %s is registered to container %s interface %s%s, whose netns %s still exists: two pods got the same address from IPAM; delete that pod or fix the IPAM ranges",
			p.Addr(), cid, ifname, pod, netnsPath)
	}
	return nil
}

// detachEndpoint is DEL's part in the datapath: absent is fine. Call with
// the lock.
func detachEndpoint(dp *loader.Datapath, containerID, ifname string) error {
	id, _, err := datapath.Find(&dp.Maps, containerID, ifname)
	if err != nil {
		return err
	}
	if id == 0 {
		return nil
	}
	return removeEndpoint(dp, id)
}
