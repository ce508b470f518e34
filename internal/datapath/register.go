package datapath

import (
	"errors"
	"fmt"
	"log/slog"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/underpass-cni/underpass/internal/attach"
	"github.com/underpass-cni/underpass/internal/loader"
)

// This file is the one way an endpoint enters and leaves the pinned
// datapath: the CNI plugin's ADD, DEL and GC, and the agent's collector
// (through RemoveEndpoint), call it; the map-level steps (Register,
// Unregister, PutParent) are its parts. Who writes which map is in
// docs/architecture.md ("Maps and pins").

// AddOptions let the caller log, watch and fault-inject an AddEndpoint;
// nil members are skipped. Each hook runs at the named step; an error from
// one fails the add, which then undoes everything before it.
type AddOptions struct {
	Log        *slog.Logger // nil: slog.Default()
	Locked     func()       // the datapath lock is held (lock wait is over)
	Registered func() error // the maps hold the endpoint
	Attached   func() error // the endpoint programs run on the slave (inside its netns)
	// Replaces is the id of a registration of the same interface under
	// another name (an adopted slave whose interface was renamed): replaced
	// as a retried ADD's registration is, its addresses not held against
	// the new one.
	Replaces uint32
}

// AddEndpoint makes ep live: under the datapath lock it registers ep's parent
// and attaches the parent program unless that is done, drops a previous
// registration of the same attachment (a retried ADD) and any endpoint
// whose netns is gone but still holds one of ep's addresses, and writes ep's
// entries; then, inside netns, it attaches the endpoint programs to the
// slave and runs then (nil: nothing), where the plugin configures the
// interface. ep.ID is set. On error nothing of it is left; on success undo
// takes it all back (the rollback of a later failure).
//
// An address that a live endpoint holds fails with ErrAddrInUse, unless
// that endpoint only learnt it and ep's was assigned (evictStaleOwners).
func AddEndpoint(dp *loader.Objects, netns ns.NetNS, ep *Endpoint, h AddOptions, then func() error) (undo func() error, err error) {
	if h.Log == nil {
		h.Log = slog.Default()
	}
	ps, replaced, err := register(dp, ep, &h)
	if err != nil {
		return nil, err
	}
	id, parent := ep.ID, ep.ParentIfindex
	rollback := func() error {
		unlock, err := dp.Lock()
		if err != nil {
			return err
		}
		defer unlock()
		errs := []error{RemoveEndpoint(dp, id), undoParent(dp, parent, ps)}
		// It replaced a registration of this interface, which was
		// guarded: it stays so, quarantined, not bare.
		if replaced {
			if err := attach.QuarantineEndpoint(dp.EndpointTarget(0, ep.Netns, ep.Ifindex)); err != nil && !attach.Gone(err) {
				errs = append(errs, err)
			}
		}
		return errors.Join(errs...)
	}
	defer func() {
		if err != nil {
			if uerr := rollback(); uerr != nil {
				err = errors.Join(err, fmt.Errorf("roll back: %w", uerr))
			}
		}
	}()
	if err := run(h.Registered); err != nil {
		return nil, err
	}
	// Outside the lock: the registration owns the id already.
	err = netns.Do(func(ns.NetNS) error {
		if err := attach.Endpoint(dp.EndpointTarget(id, "", ep.Ifindex)); err != nil {
			return fmt.Errorf("attach endpoint programs to %s: %w", ep.IfName, err)
		}
		h.Log.Debug("attached endpoint programs", "id", id, "ifindex", ep.Ifindex)
		if err := run(h.Attached); err != nil {
			return err
		}
		return run(then)
	})
	if err != nil {
		return nil, err
	}
	return rollback, nil
}

func run(f func() error) error {
	if f == nil {
		return nil
	}
	return f()
}

// parentState records what an add did to the parent, so that undoing it
// takes back exactly that.
type parentState struct {
	registered bool // the parents entry is ours
	attached   bool // the parent's egress link is ours
}

// register is the locked part of AddEndpoint: parent, the attachment's old
// registration, stale owners, the endpoint's entries.
func register(dp *loader.Objects, ep *Endpoint, h *AddOptions) (ps parentState, replaced bool, err error) {
	// The parent's MAC goes into the parents map when the agent has not
	// registered it: a missing one would write zeros over the agent's.
	if len(ep.ParentMAC) != 6 {
		return ps, false, fmt.Errorf("register endpoint %s/%s: parent %s has no Ethernet MAC (%q)", ep.ContainerID, ep.IfName, ep.ParentName, ep.ParentMAC)
	}
	unlock, err := dp.Lock()
	if err != nil {
		return ps, false, err
	}
	defer unlock()
	if h.Locked != nil {
		h.Locked()
	}
	if ps, err = ensureParent(dp, ep); err != nil {
		return ps, false, err
	}
	defer func() {
		if err != nil {
			if perr := undoParent(dp, ep.ParentIfindex, ps); perr != nil {
				err = errors.Join(err, fmt.Errorf("roll back parent: %w", perr))
			}
		}
	}()
	// Refused (an address another live endpoint holds) before the
	// attachment's old registration is touched: a container that claims
	// a neighbour's address keeps its old registration and its guard.
	// Replaces counts only while it names this interface: an id freed and
	// claimed by another pod since the caller looked is that pod's.
	var prior *Endpoint
	if h.Replaces != 0 {
		if r, err := Lookup(&dp.Maps, h.Replaces); err == nil && sameInterface(&r, ep) && r.Network == ep.Network {
			prior = &r
		}
	}
	if err := evictAdopted(dp, ep, h.Log); err != nil {
		return ps, false, err
	}
	if err := evictStaleOwners(dp, ep, prior, h.Log); err != nil {
		return ps, false, err
	}
	if replaced, err = dropOldRegistration(dp, ep, prior); err != nil {
		return ps, replaced, err
	}
	id, err := Register(&dp.Maps, *ep)
	if err != nil {
		return ps, replaced, fmt.Errorf("register endpoint %s/%s: %w", ep.ContainerID, ep.IfName, err)
	}
	ep.ID = id
	h.Log.Debug("registered endpoint", "id", id, "container", ep.ContainerID, "ifname", ep.IfName, "addrs", ep.Addrs)
	return ps, replaced, nil
}

// dropOldRegistration removes the registration ep's attachment has already
// (a retried ADD; an adopted slave whose addresses or MAC changed, which its
// container can do at will), and prior (nil: none), a registration of the
// same interface under another name (renamed). When the old registration is on ep's interface its
// filters are not detached, which would leave the interface unguarded for
// as long as the registration takes (a container flooded its macvlan
// neighbours with forged frames, which the bridge delivers from slave to
// slave without the parent's program: TestAdoptReregistrationKeepsGuard):
// they are quarantined first, in place, so that they run as no endpoint
// and drop all the interface sends until AddEndpoint's attach swaps them
// for the new id's. Never left running as the old id: once it is free, a
// concurrent ADD may claim it, and its frames would be vetted as that
// pod's; and its DAD could learn addresses for an id no record lists.
// Filters anywhere else (another netns or interface) go with the old
// registration.
//
// quarantined says whether ep's interface now runs quarantined filters.
func dropOldRegistration(dp *loader.Objects, ep *Endpoint, prior *Endpoint) (quarantined bool, err error) {
	id, old, err := Find(&dp.Maps, ep.ContainerID, ep.IfName)
	if err != nil {
		return false, err
	}
	if id != 0 {
		if quarantined, err = dropRegistration(dp, ep, old); err != nil {
			return quarantined, err
		}
	}
	if prior == nil || prior.ID == id {
		return quarantined, nil
	}
	q, err := dropRegistration(dp, ep, prior)
	return quarantined || q, err
}

// dropRegistration removes registration old for ep's: see
// dropOldRegistration.
func dropRegistration(dp *loader.Objects, ep *Endpoint, old *Endpoint) (quarantined bool, err error) {
	id := old.ID
	if !sameInterface(old, ep) {
		return false, RemoveEndpoint(dp, id)
	}
	err = attach.QuarantineEndpoint(dp.EndpointTarget(0, ep.Netns, ep.Ifindex))
	switch {
	case attach.Gone(err):
		return false, RemoveEndpoint(dp, id) // the interface is gone: nothing to guard
	case err != nil:
		return false, err // the old registration stays, and so do its filters
	}
	return true, Unregister(&dp.Maps, id)
}

// sameInterface says whether old registers ep's interface: the same index
// in the same namespace, however its path names it (a pin, or a process's
// /proc/<pid>/ns/net; an old path that no longer leads there is another
// namespace as far as anyone can tell).
func sameInterface(old, ep *Endpoint) bool {
	if ep.Netns == "" || old.Ifindex != ep.Ifindex {
		return false
	}
	if old.Netns == ep.Netns {
		return true
	}
	// An adoption's container id is its namespace's device and inode.
	if old.Network == AdoptedNetwork && ep.Network == AdoptedNetwork && old.ContainerID == ep.ContainerID {
		return true
	}
	a, aerr := attach.NetnsID(old.Netns)
	b, berr := attach.NetnsID(ep.Netns)
	return aerr == nil && berr == nil && a == b
}

// ensureParent registers the parent and attaches its egress program unless
// that is done: the agent owns parents and does it too, but pods must come
// up while the agent restarts.
func ensureParent(dp *loader.Objects, ep *Endpoint) (ps parentState, err error) {
	m := &dp.Maps
	cur, gerr := GetParent(m, ep.ParentIfindex)
	switch {
	case gerr == nil && cur.Mac == [6]byte(padMAC(ep.ParentMAC)) && cur.Mode == uint8(ep.Mode):
	case gerr == nil || errors.Is(gerr, ErrNoParent):
		if err := PutParent(m, ep.ParentIfindex, ep.ParentMAC, ep.Mode); err != nil {
			return ps, err
		}
		ps.registered = gerr != nil
	default:
		return ps, fmt.Errorf("read parent %s: %w", ep.ParentName, gerr)
	}
	defer func() {
		if err != nil {
			if perr := undoParent(dp, ep.ParentIfindex, ps); perr != nil {
				err = errors.Join(err, perr)
			}
			ps = parentState{}
		}
	}()
	// The agent attached it (the common case): nothing to do. Otherwise
	// attaching swaps the pinned program into whatever is there.
	if attach.EgressCurrent(dp.EgressTarget(attach.RoleParent, ep.ParentIfindex)) {
		return ps, nil
	}
	had := attach.EgressPinned(dp.EgressTarget(attach.RoleParent, ep.ParentIfindex))
	att, err := attach.Egress(dp.EgressTarget(attach.RoleParent, ep.ParentIfindex))
	if err != nil {
		return ps, fmt.Errorf("attach the hairpin program to parent %s: %w", ep.ParentName, err)
	}
	ps.attached = !had && att.Mode == attach.TCX
	return ps, nil
}

// padMAC is mac in the parents map's 6 bytes.
func padMAC(mac []byte) (out [6]byte) {
	copy(out[:], mac)
	return out
}

// undoParent removes what an add did to the parent, unless an endpoint uses
// the parent by now. Call with the lock held.
func undoParent(dp *loader.Objects, ifindex int, ps parentState) error {
	if !ps.registered && !ps.attached {
		return nil
	}
	eps, err := Endpoints(&dp.Maps)
	if err != nil {
		return err
	}
	for _, e := range eps {
		if e.ParentIfindex == ifindex {
			return nil
		}
	}
	// The registration goes first: the agent (which does not take the
	// lock to check its link pins) must never see the link pin gone
	// while the parent is still registered, which is what a pin removed
	// from under it looks like, and would re-attach it (see the agent's
	// released).
	var errs []error
	if ps.registered {
		errs = append(errs, DeleteParent(&dp.Maps, ifindex))
	}
	if ps.attached {
		errs = append(errs, attach.DetachEgress(dp.EgressTarget(attach.RoleParent, ifindex)))
	}
	return errors.Join(errs...)
}

// RemoveEndpoint detaches the programs of endpoint id and unregisters it;
// absent is fine. Call with the lock held. The filters are found through
// the registration: they live on the slave in the container's netns
// (nothing to do when that is gone).
func RemoveEndpoint(dp *loader.Objects, id uint32) error {
	var errs []error
	ep, err := Lookup(&dp.Maps, id)
	if err == nil {
		errs = append(errs, attach.DetachEndpoint(attach.EndpointOptions{ID: id, Ifindex: ep.Ifindex, Netns: ep.Netns}))
	}
	return errors.Join(append(errs, Unregister(&dp.Maps, id))...)
}

// RemoveAttachment is RemoveEndpoint by the CNI's name of an attachment
// (DEL). Call with the lock held.
func RemoveAttachment(dp *loader.Objects, containerID, ifname string) error {
	id, _, err := Find(&dp.Maps, containerID, ifname)
	if err != nil || id == 0 {
		return err
	}
	return RemoveEndpoint(dp, id)
}

// AdoptedNetwork is the network name of the endpoints the agent adopted
// (internal/adopt): slaves that no CNI call registered.
const AdoptedNetwork = "underpass-adopted"

// AttachedNetwork is the network name of the endpoints `underpassctl
// attach` registered.
const AttachedNetwork = "underpass-attached"

// selfAddressed says whether a registration under network claims the
// addresses its container configured itself (adopted, attached), rather
// than ones IPAM assigned.
func selfAddressed(network string) bool {
	return network == AdoptedNetwork || network == AttachedNetwork
}

// evictAdopted removes an adoption of ep's interface (its MAC on its
// parent) when its owner registers it: the agent may have found a CNI
// pod's slave in the moment between the interface plugin creating it and
// the underpass plugin registering it, and a registration by its owner
// wins. An adoption of one of ep's addresses goes the same way, in
// evictStaleOwners (one lookup per address). The agent's next scan sees
// the slave taken and leaves it.
func evictAdopted(dp *loader.Objects, ep *Endpoint, log *slog.Logger) error {
	if ep.Network == AdoptedNetwork {
		return nil
	}
	var ref loader.EndpointRef
	k := MACKey(ep.MAC, ep.ParentIfindex)
	if err := dp.Maps.EpByMac.Lookup(&k, &ref); err != nil {
		return nil
	}
	other, err := Lookup(&dp.Maps, ref.Id)
	if err != nil || other.Network != AdoptedNetwork {
		return nil
	}
	// Only that race, on the same interface, or an adoption whose netns
	// is gone: a pod that asked for an adopted container's MAC must not
	// strip that container's guard (its own slave would then fail to
	// come up, with the MAC in use, and leave the container unguarded).
	if !sameInterface(&other, ep) && (other.Netns == "" || !errors.Is(attach.CheckNetns(other.Netns), attach.ErrNetnsGone)) {
		return fmt.Errorf("%w: MAC %s is in use by the adopted interface %s in %s (%s): ask for another MAC",
			ErrAddrInUse, ep.MAC, other.IfName, other.Netns, other.PodRef())
	}
	return takeOver(dp, ref.Id, &other, ep, log)
}

// takeOver removes the adoption id (other) for ep's registration.
func takeOver(dp *loader.Objects, id uint32, other, ep *Endpoint, log *slog.Logger) error {
	log.Info("taking over an adopted interface", "id", id, "adopted", other.PodName, "container", ep.ContainerID, "ifname", ep.IfName)
	if err := RemoveEndpoint(dp, id); err != nil {
		return fmt.Errorf("remove the adoption %d of %s: %w", id, other.PodName, err)
	}
	return nil
}

// evictStaleOwners handles an address IPAM handed out that the datapath
// still has for another endpoint. IPAM is the authority on addresses, so
// when that endpoint's netns is gone its DEL was lost, and its entries go;
// an address another endpoint only learnt is taken from it. A live owner
// it was assigned to (or adopted with) is a real conflict: ErrAddrInUse,
// saying which pod has it.
func evictStaleOwners(dp *loader.Objects, ep *Endpoint, prior *Endpoint, log *slog.Logger) error {
	m := &dp.Maps
	for _, p := range ep.Addrs {
		k := EpIPKey(p.Addr(), ep.ParentIfindex)
		var ref loader.EndpointRef
		if err := m.EpByIp.Lookup(&k, &ref); err != nil {
			continue
		}
		// Another endpoint only learnt it from its DAD, which any pod can
		// send for any address (a raw socket, CAP_NET_RAW): IPAM's
		// assignment wins (writeRefs), and the learner's traffic from it
		// stops. Refusing would let a pod squat on the addresses IPAM hands
		// out next and fail the pods that get them. Not for an adoption or
		// an attach, which claim what the container configured itself (no
		// assignment), nor on ipvlan, which refuses a second slave's copy
		// of an address anyway: the ADD would fail after the learner lost
		// it.
		learnt := ref.Flags&uint32(loader.RefLearned) != 0
		if learnt && !selfAddressed(ep.Network) && ep.Mode == loader.ModeMacvlan {
			log.Info("address learnt by another endpoint goes to its assignee", "addr", p.Addr(), "learner", ref.Id, "container", ep.ContainerID)
			continue
		}
		why := "two pods got the same address from IPAM; delete that pod or fix the IPAM ranges"
		if learnt {
			why = "which configured it itself (learnt from its DAD)"
		}
		if err := evictOwner(dp, ep, prior, ref.Id, "address "+p.Addr().String(), why, log); err != nil {
			return err
		}
	}
	// A MAC on the parent is one endpoint's too: a pod may ask for its MAC
	// (runtimeConfig.mac, CNI_ARGS MAC), and one that another pod's
	// registration holds must not take over that pod's entry (whose
	// frames would then be vetted as nobody's once this one is gone).
	if ep.Mode == loader.ModeMacvlan {
		k := MACKey(ep.MAC, ep.ParentIfindex)
		var ref loader.EndpointRef
		if err := m.EpByMac.Lookup(&k, &ref); err == nil {
			if err := evictOwner(dp, ep, prior, ref.Id, "MAC "+ep.MAC.String(), "two pods asked for the same MAC; delete that pod or ask for another", log); err != nil {
				return err
			}
		}
	}
	return nil
}

// evictOwner clears the way for ep's registration of what (an address or
// the MAC) that endpoint id holds: nothing to do when id is ep's own
// attachment or prior; an adoption gives way; so does an endpoint whose
// netns is gone (a pod deleted without DEL). Any other holder is live:
// ErrAddrInUse, saying why that is wrong.
func evictOwner(dp *loader.Objects, ep, prior *Endpoint, id uint32, what, why string, log *slog.Logger) error {
	other, err := Lookup(&dp.Maps, id)
	if err != nil {
		return nil // Unregister of that one is under way or done
	}
	if other.ContainerID == ep.ContainerID && other.IfName == ep.IfName || prior != nil && id == prior.ID {
		return nil
	}
	if other.Network == AdoptedNetwork && ep.Network != AdoptedNetwork {
		return takeOver(dp, id, &other, ep, log)
	}
	if other.Netns != "" {
		if err := attach.CheckNetns(other.Netns); errors.Is(err, attach.ErrNetnsGone) {
			log.Debug("evicting stale endpoint", "id", id, "container", other.ContainerID, "netns", other.Netns, "holds", what)
			if err := RemoveEndpoint(dp, id); err != nil {
				return fmt.Errorf("remove stale endpoint %d (container %s): %w", id, other.ContainerID, err)
			}
			return nil
		}
	}
	pod := ""
	if other.PodName != "" {
		pod = fmt.Sprintf(" (pod %s)", other.PodRef())
	}
	return fmt.Errorf("%w: %s is in use by container %s interface %s%s, whose netns %s still exists: %s",
		ErrAddrInUse, what, other.ContainerID, other.IfName, pod, other.Netns, why)
}
