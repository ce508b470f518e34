package agent

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"

	"github.com/underpass-cni/underpass/internal/attach"
	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
	"github.com/underpass-cni/underpass/internal/netwatch"
)

// parentState is an attached parent NIC.
type parentState struct {
	ifindex int
	name    string
	mode    loader.Mode
	mac     net.HardwareAddr
	up      bool
}

// parentRefs collects the parent ifindexes the endpoints point at, from the
// small lookup maps (8-byte values) rather than the large endpoint records,
// in batches: this runs every second.
func parentRefs(m *loader.Maps) map[int]bool {
	out := map[int]bool{}
	collectRefs(m.EpByMac, make([]loader.MACKey, refBatch), func(k loader.MACKey) uint32 { return k.ParentIfindex }, out)
	collectRefs(m.EpByIp, make([]loader.EpIPKey, refBatch), func(k loader.EpIPKey) uint32 { return k.ParentIfindex }, out)
	return out
}

const refBatch = 1024

// The refs are keyed by parent, so the keys alone say which parents are used.
func collectRefs[K any](m *ebpf.Map, keys []K, parent func(K) uint32, out map[int]bool) {
	vals := make([]loader.EndpointRef, len(keys))
	var cursor ebpf.MapBatchCursor
	for {
		n, err := m.BatchLookup(&cursor, keys, vals, nil)
		for _, k := range keys[:n] {
			out[int(parent(k))] = true
		}
		if err == nil {
			continue
		}
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return
		}
		// No batch support (old kernel): walk the map.
		var k K
		var ref loader.EndpointRef
		it := m.Iterate()
		for it.Next(&k, &ref) {
			out[int(parent(k))] = true
		}
		return
	}
}

// reconcileParents attaches the parent program to every parent that has
// endpoints (or a parents entry) and is not attached yet; force re-attaches
// all of them, which updates pinned links in place to the loaded program.
func (a *Agent) reconcileParents(force bool) {
	m := &a.dp.Load().Maps
	want := parentRefs(m)
	facts := &parentFacts{m: m, log: a.log}
	if force {
		for ifindex := range facts.registered() {
			want[ifindex] = true
		}
	}
	for ifindex := range want {
		if ifindex == 0 {
			continue
		}
		if _, ok := a.parents[ifindex]; ok && !force {
			continue
		}
		if a.isLost(ifindex) {
			continue
		}
		mode, name, err := facts.of(ifindex)
		if err != nil {
			a.log.Error("list endpoints", "error", err)
			return
		}
		l, err := netlink.LinkByIndex(ifindex)
		if err != nil {
			a.parentMissing(ifindex, name, mode)
			continue
		}
		if mode == loader.ModeNone {
			mode = loader.ModeMacvlan
		}
		a.attachParent(l, mode)
	}
}

// parentFacts reads what the maps say of parents, each map once and only
// when asked: the parents array has 64Ki slots, read only when it matters
// (at start-up, or for a parent not attached yet), not every second.
type parentFacts struct {
	m   *loader.Maps
	log *slog.Logger
	reg map[int]loader.Parent
	eps map[uint32]datapath.Endpoint
}

func (f *parentFacts) registered() map[int]loader.Parent {
	if f.reg == nil {
		var err error
		if f.reg, err = datapath.Parents(f.m); err != nil {
			f.log.Error("list parents", "error", err)
			f.reg = map[int]loader.Parent{}
		}
	}
	return f.reg
}

// of is the mode and name of parent ifindex: the mode registered, else its
// endpoints'; the name its endpoints recorded.
func (f *parentFacts) of(ifindex int) (mode loader.Mode, name string, err error) {
	mode = loader.ModeNone
	if p, ok := f.registered()[ifindex]; ok {
		mode = loader.Mode(p.Mode)
	}
	if f.eps == nil {
		if f.eps, err = datapath.Endpoints(f.m); err != nil {
			return mode, "", err
		}
	}
	for _, ep := range f.eps {
		if ep.ParentIfindex == ifindex {
			if mode == loader.ModeNone {
				mode = ep.Mode
			}
			return mode, ep.ParentName, nil
		}
	}
	return mode, "", nil
}

// attachParent registers and attaches one parent.
func (a *Agent) attachParent(l netlink.Link, mode loader.Mode) bool {
	attrs := l.Attrs()
	dp := a.dp.Load()
	// Failures are retried every reconcile interval: log each once.
	failKey := fmt.Sprint("attach-parent-", attrs.Index)
	if err := datapath.PutParent(&dp.Maps, attrs.Index, attrs.HardwareAddr, mode); err != nil {
		a.errorOnce(failKey, "register parent; retrying", "parent", attrs.Name, "ifindex", attrs.Index, "error", err)
		return false
	}
	att, err := attach.Egress(dp.EgressTarget(attach.RoleParent, attrs.Index))
	if err != nil {
		a.errorOnce(failKey, "attach parent program; retrying", "parent", attrs.Name, "ifindex", attrs.Index, "error", err)
		return false
	}
	delete(a.warned, failKey)
	a.attachXDP(attrs.Index, attrs.Name)
	_, known := a.parents[attrs.Index]
	a.parents[attrs.Index] = &parentState{ifindex: attrs.Index, name: attrs.Name, mode: mode, mac: attrs.HardwareAddr, up: isUp(attrs)}
	if known {
		a.log.Debug("parent program re-attached", "parent", attrs.Name, "ifindex", attrs.Index)
	} else {
		a.log.Info("parent program attached", "parent", attrs.Name, "ifindex", attrs.Index, "mode", mode.String(), "attach", att.Mode)
	}
	// The parent program guards stale services itself, so running the
	// uplink program too would only look the VIP up twice: one per NIC.
	if u, ok := a.uplinks[attrs.Name]; ok && u.ifindex == attrs.Index && !u.isParent {
		if err := attach.DetachEgress(dp.EgressTarget(attach.RoleUplink, u.ifindex)); err != nil {
			a.log.Error("detach uplink program from a parent", "interface", attrs.Name, "error", err)
		}
		a.uplinks[attrs.Name] = uplinkState{ifindex: u.ifindex, isParent: true}
		a.log.Info("uplink is now a parent: its parent program guards stale services", "interface", attrs.Name)
	}
	return true
}

func (a *Agent) isLost(ifindex int) bool {
	for _, p := range a.lost {
		if p.ifindex == ifindex {
			return true
		}
	}
	return false
}

// parentMissing handles endpoints whose parent ifindex does not exist: the
// parent was deleted (maybe while the agent was down). If one with the same
// name exists now, it was re-created: move everything to it.
func (a *Agent) parentMissing(ifindex int, name string, mode loader.Mode) {
	if name == "" {
		a.warnOnce(fmt.Sprint("noparent-", ifindex), "endpoints refer to a parent interface that does not exist", "ifindex", ifindex)
		return
	}
	st := &parentState{ifindex: ifindex, name: name, mode: mode}
	a.lost[name] = st
	if l, err := netlink.LinkByName(name); err == nil && l.Attrs().Index != ifindex {
		a.parentRecreated(l)
		return
	}
	a.log.Warn("parent interface is gone; will re-attach when it is re-created", "parent", name, "ifindex", ifindex)
}

// parentRecreated moves a lost parent's registration to its new ifindex.
func (a *Agent) parentRecreated(l netlink.Link) {
	attrs := l.Attrs()
	st := a.lost[attrs.Name]
	if st == nil || st.ifindex == attrs.Index {
		return
	}
	mode := st.mode
	if mode == loader.ModeNone {
		mode = loader.ModeMacvlan
	}
	if !a.attachParent(l, mode) {
		return
	}
	dp := a.dp.Load()
	// Moving rewrites every endpoint of the parent across three maps: under
	// the writer lock, or a plugin's ADD or DEL in between would see (or
	// leave behind) an endpoint half moved.
	var moved int
	unlock, err := dp.Lock()
	if err == nil {
		moved, err = datapath.MoveParent(&dp.Maps, st.ifindex, attrs.Index)
		if err == nil {
			if derr := datapath.DeleteParent(&dp.Maps, st.ifindex); derr != nil {
				a.log.Error("forget old parent ifindex", "parent", attrs.Name, "error", derr)
			}
		}
		unlock()
	}
	// Endpoints left on the old index (a key of theirs held on the new
	// one) bring this back every tick until GC removes them: said once.
	key := fmt.Sprint("move-parent-", attrs.Name, "-", st.ifindex)
	again := a.warned[key]
	if err != nil {
		a.errorOnce(key, "move endpoints to the re-created parent; those not moved stay on the old index until GC removes them",
			"parent", attrs.Name, "error", err)
	} else {
		delete(a.warned, key)
	}
	// The old index's pins outlive it when the parent was deleted while
	// the agent was down.
	dropParentLinks(a.dp.Load(), st.ifindex)
	delete(a.lost, attrs.Name)
	if !again {
		a.log.Info("parent re-created: program re-attached and endpoints moved",
			"parent", attrs.Name, "old_ifindex", st.ifindex, "ifindex", attrs.Index, "endpoints_moved", moved)
	}
}

// forgetDeadParents drops parents entries of interfaces that are gone and
// that no endpoint refers to any more (after GC removed the endpoints that
// died with them). The name stays in lost, so a re-created NIC is still
// re-attached.
func (a *Agent) forgetDeadParents() {
	dp := a.dp.Load()
	registered, err := datapath.Parents(&dp.Maps)
	if err != nil {
		return
	}
	refs := parentRefs(&dp.Maps)
	for ifindex := range registered {
		if refs[ifindex] {
			continue
		}
		if _, err := netlink.LinkByIndex(ifindex); err == nil {
			continue
		}
		if err := datapath.DeleteParent(&dp.Maps, ifindex); err == nil {
			dropParentLinks(dp, ifindex)
			a.log.Info("forgot parent of a deleted interface", "ifindex", ifindex)
		}
	}
}

// onNetEvent follows parents and uplinks through link changes and the
// node's addresses through address changes.
func (a *Agent) onNetEvent(ev netwatch.Event) {
	switch ev.Kind {
	case netwatch.AddrChanged:
		if err := a.syncHosts(a.cfg); err != nil {
			a.log.Error("update host addresses", "error", err)
		}
	case netwatch.Resync:
		if err := a.syncHosts(a.cfg); err != nil {
			a.log.Error("update host addresses", "error", err)
		}
		a.checkParents()
		a.reconcileParents(false)
		a.syncUplinks(false)
	case netwatch.LinkDeleted:
		a.linkDeleted(ev)
	case netwatch.LinkChanged:
		a.linkChanged(ev)
	}
}

func (a *Agent) linkDeleted(ev netwatch.Event) {
	dp := a.dp.Load()
	if p, ok := a.parents[ev.Index]; ok {
		delete(a.parents, ev.Index)
		a.lost[p.name] = p
		// The links died with the interface; drop their pins.
		dropParentLinks(dp, ev.Index)
		a.log.Warn("parent interface deleted; its endpoints lost their interfaces too. Will re-attach when it is re-created",
			"parent", p.name, "ifindex", ev.Index)
	}
	if u, ok := a.uplinks[ev.Name]; ok && u.ifindex == ev.Index {
		delete(a.uplinks, ev.Name)
		_ = attach.DetachEgress(dp.EgressTarget(attach.RoleUplink, ev.Index))
		a.log.Warn("uplink interface deleted; will attach when it comes back", "uplink", ev.Name, "ifindex", ev.Index)
	}
}

func (a *Agent) linkChanged(ev netwatch.Event) {
	if p, ok := a.parents[ev.Index]; ok {
		if ev.Name != p.name {
			a.log.Info("parent renamed", "from", p.name, "to", ev.Name, "ifindex", ev.Index)
			p.name = ev.Name
		}
		if len(ev.MAC) > 0 && !bytes.Equal(ev.MAC, p.mac) {
			if err := datapath.PutParent(&a.dp.Load().Maps, ev.Index, ev.MAC, p.mode); err != nil {
				a.log.Error("update parent MAC", "parent", p.name, "error", err)
			} else {
				a.log.Info("parent MAC changed; parents map updated", "parent", p.name, "from", p.mac, "to", ev.MAC)
				p.mac = ev.MAC
			}
		}
		if ev.Up != p.up {
			p.up = ev.Up
			if ev.Up {
				a.log.Info("parent is up", "parent", p.name, "ifindex", ev.Index)
				a.ensureAttached(p)
			} else {
				a.log.Warn("parent is down", "parent", p.name, "ifindex", ev.Index)
			}
		}
		return
	}
	if st, ok := a.lost[ev.Name]; ok && st.ifindex != ev.Index {
		if l, err := netlink.LinkByIndex(ev.Index); err == nil {
			a.parentRecreated(l)
		}
		return
	}
	if slices.Contains(a.cfg.Uplinks, ev.Name) {
		if _, ok := a.uplinks[ev.Name]; !ok {
			a.syncUplinks(false)
		}
	}
}

// ensureAttached re-attaches a parent whose link pin went missing.
func (a *Agent) ensureAttached(p *parentState) {
	if attach.EgressPinned(a.dp.Load().EgressTarget(attach.RoleParent, p.ifindex)) {
		return
	}
	if l, err := netlink.LinkByIndex(p.ifindex); err == nil {
		a.attachParent(l, p.mode)
	}
}

// checkParents verifies every attached parent still exists (after events
// were lost).
func (a *Agent) checkParents() {
	for idx, p := range a.parents {
		l, err := netlink.LinkByIndex(idx)
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			a.linkDeleted(netwatch.Event{Kind: netwatch.LinkDeleted, Index: idx, Name: p.name})
			continue
		}
		if err == nil {
			a.linkChanged(netwatch.Event{Kind: netwatch.LinkChanged, Index: idx, Name: l.Attrs().Name, MAC: l.Attrs().HardwareAddr, Up: isUp(l.Attrs())})
		}
	}
	for name := range a.lost {
		if l, err := netlink.LinkByName(name); err == nil {
			a.parentRecreated(l)
		}
	}
}

// syncUplinks attaches the uplink program to configured uplinks that exist
// and are not parents, and detaches it from uplinks no longer configured.
func (a *Agent) syncUplinks(force bool) {
	dp := a.dp.Load()
	for name, u := range a.uplinks {
		if slices.Contains(a.cfg.Uplinks, name) {
			continue
		}
		if !u.isParent {
			if err := attach.DetachEgress(dp.EgressTarget(attach.RoleUplink, u.ifindex)); err != nil {
				// Kept, so that the next sync (heal) tries again.
				a.log.Error("detach uplink program", "uplink", name, "error", err)
				continue
			}
			a.log.Info("uplink program detached", "uplink", name, "ifindex", u.ifindex)
		}
		delete(a.uplinks, name)
	}
	for _, name := range a.cfg.Uplinks {
		if _, ok := a.uplinks[name]; ok && !force {
			continue
		}
		l, err := netlink.LinkByName(name)
		if err != nil {
			a.warnOnce("uplink-missing-"+name, "uplink interface not found; will attach when it appears", "uplink", name)
			continue
		}
		delete(a.warned, "uplink-missing-"+name)
		idx := l.Attrs().Index
		if _, isParent := a.parents[idx]; isParent {
			asParent := uplinkState{ifindex: idx, isParent: true}
			if a.uplinks[name] != asParent {
				a.log.Info("uplink is a parent: its parent program guards stale services", "uplink", name)
			}
			// An uplink program left attached by an earlier run would end the
			// chain before the parent program.
			if err := attach.DetachEgress(dp.EgressTarget(attach.RoleUplink, idx)); err != nil {
				a.log.Error("detach the uplink program from an uplink that is a parent", "uplink", name, "error", err)
			}
			a.uplinks[name] = asParent
			continue
		}
		att, err := attach.Egress(dp.EgressTarget(attach.RoleUplink, idx))
		if err != nil {
			a.log.Error("attach uplink program", "uplink", name, "error", err)
			continue
		}
		if _, known := a.uplinks[name]; !known {
			a.log.Info("uplink program attached", "uplink", name, "ifindex", idx, "attach", att.Mode)
		}
		a.uplinks[name] = uplinkState{ifindex: idx}
	}
}

// uplinkState is a configured uplink the agent found: the uplink program
// is attached to it unless it is also a parent, whose parent program
// guards stale Services already.
type uplinkState struct {
	ifindex  int
	isParent bool
}

func isUp(attrs *netlink.LinkAttrs) bool {
	return attrs.Flags&net.FlagUp != 0 && attrs.OperState != netlink.OperDown
}

// attachXDP attaches (or, with xdp: off, detaches) the parent's XDP program,
// which counts frames from the wire per endpoint and spots IP conflicts. It
// is an extra: a failure is logged and the hairpin works without it.
func (a *Agent) attachXDP(ifindex int, name string) {
	want := a.cfg.XDPMode()
	got, err := attach.XDP(a.dp.Load().XDPTarget(ifindex, want))
	if err != nil {
		a.log.Error("attach parent XDP program", "parent", name, "ifindex", ifindex, "xdp", want, "error", err)
		return
	}
	a.log.Debug("parent XDP program", "parent", name, "ifindex", ifindex, "xdp", got)
}

// dropParentLinks removes the pins of a parent whose interface is gone: its
// links died with it. Errors are of no consequence for a dead index.
func dropParentLinks(dp *loader.Objects, ifindex int) {
	_ = attach.DetachEgress(dp.EgressTarget(attach.RoleParent, ifindex))
	_ = attach.DetachXDP(dp.XDPTarget(ifindex, ""))
}
