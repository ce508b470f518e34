package agent

import (
	"github.com/vishvananda/netlink"

	"github.com/underpass-cni/underpass/internal/adopt"
)

// adopt registers the macvlan/ipvlan slaves that others made on the
// adopt.parents, in any namespace, and unregisters those gone (see
// internal/adopt). Run on every reconcile tick: a scan of the namespaces
// is a few hundred stat calls and a netlink dump per namespace. With no
// parents configured it runs once more after the last were removed, to
// unregister what they had.
func (a *Agent) adopt() {
	names := a.cfg.Adopt.Parents
	if len(names) == 0 && !a.adopting {
		return
	}
	a.adopting = len(names) > 0
	var parents []adopt.Parent
	for _, n := range names {
		l, err := netlink.LinkByName(n)
		if err != nil {
			a.warnOnce("adopt-parent-"+n, "adopt: parent not found; adopting its slaves once it exists", "parent", n, "error", err)
			continue
		}
		delete(a.warned, "adopt-parent-"+n)
		parents = append(parents, adopt.Parent{Name: n, Ifindex: l.Attrs().Index})
	}
	found, err := adopt.Scan(parents, adopt.NetnsDirs)
	if err != nil {
		a.log.Debug("adopt: scan", "error", err) // a namespace that vanished mid-scan; the next scan sees it settled
	}
	dp := a.dp.Load()
	if dp == nil {
		return
	}
	res, err := adopt.Sync(dp, found, a.log)
	if err != nil {
		a.errorOnce("adopt-sync-"+err.Error(), "adopt: registering slaves", "error", err)
	}
	for _, ep := range res.Added {
		a.log.Info("adopt: registered", "name", ep.PodName, "interface", ep.IfName, "parent", ep.ParentName,
			"addrs", ep.Addrs, "netns", ep.Netns, "id", ep.ID)
	}
	for _, ep := range res.Removed {
		a.log.Info("adopt: unregistered", "name", ep.PodName, "interface", ep.IfName, "parent", ep.ParentName, "id", ep.ID)
	}
}
