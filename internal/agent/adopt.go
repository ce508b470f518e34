package agent

import (
	"context"

	"github.com/underpass-cni/underpass/internal/adopt"
)

// adopt registers the macvlan/ipvlan slaves that others made on the
// adopt.parents, in any namespace, and unregisters those gone (see
// internal/adopt). Run on every reconcile tick, and at once when the
// Docker engine (adopt.docker) says a container joined or left a
// macvlan/ipvlan network: a scan of the namespaces is a few hundred stat
// calls and a netlink dump per namespace. With no parents configured it
// runs once more after the last were removed, to unregister what they had.
func (a *Agent) adopt() {
	a.followDocker()
	names := a.cfg.Adopt.Parents
	if len(names) == 0 && !a.adopting {
		return
	}
	a.adopting = len(names) > 0
	parents, missing := adopt.ParentsByName(names)
	for _, n := range names {
		if err, ok := missing[n]; ok {
			a.warnOnce("adopt-parent-"+n, "adopt: parent not found; adopting its slaves once it exists", "parent", n, "error", err)
			continue
		}
		delete(a.warned, "adopt-parent-"+n)
	}
	dirs := adopt.NetnsDirs
	name := adopt.Name
	if d := a.docker; d != nil {
		dirs = append(dirs[:len(dirs):len(dirs)], d.Dirs()...)
		name = func(s *adopt.Slave) string {
			if n, ok := d.Lookup(s); ok {
				return n
			}
			return adopt.Name(s)
		}
	}
	dp := a.dp.Load()
	if dp == nil {
		return
	}
	// The registry as it was before the scan: what the OCI hook registers
	// while the scan runs is newer than the scan's view of it (adopt.Sync).
	before, err := adopt.Snap(dp)
	if err != nil {
		a.errorOnce("adopt-snap", "adopt: reading the registry", "error", err)
		return
	}
	delete(a.warned, "adopt-snap")
	found, err := adopt.Scan(parents, dirs)
	if err != nil {
		a.log.Debug("adopt: scan", "error", err) // a namespace that vanished mid-scan; the next scan sees it settled
	}
	res, err := adopt.Sync(dp, before, found, name, a.log)
	// Logged when it changes, not once per text for good: the texts name
	// containers, and a map of them would grow without bound.
	switch {
	case err == nil:
		a.adoptErr = ""
	case err.Error() != a.adoptErr:
		a.adoptErr = err.Error()
		a.log.Error("adopt: registering slaves", "error", err)
	default:
		a.log.Debug("adopt: registering slaves", "error", err)
	}
	for _, ep := range res.Added {
		a.log.Info("adopt: registered", "name", ep.PodName, "interface", ep.IfName, "parent", ep.ParentName,
			"addrs", ep.Addrs, "netns", ep.Netns, "id", ep.ID)
	}
	for _, ep := range res.Renamed {
		a.log.Info("adopt: renamed", "name", ep.PodName, "was", ep.From, "interface", ep.IfName, "parent", ep.ParentName, "id", ep.ID)
	}
	for _, ep := range res.Removed {
		a.log.Info("adopt: unregistered", "name", ep.PodName, "interface", ep.IfName, "parent", ep.ParentName, "id", ep.ID)
	}
}

// followDocker starts, moves or stops the Docker source as adopt.docker
// says. It follows the engine in its own goroutine; a change it sees asks
// the event loop for an adoption pass (adoptNow).
func (a *Agent) followDocker() {
	socket, auto := a.cfg.DockerSocket()
	if socket == a.dockerSocket {
		return
	}
	if a.stopDocker != nil {
		a.stopDocker()
		a.stopDocker, a.docker = nil, nil
	}
	a.dockerSocket = socket
	if socket == "" || a.ctx == nil {
		return
	}
	d := &adopt.Docker{Socket: socket, Quiet: auto, Log: a.log.With("component", "docker"), Changed: func() {
		select {
		case a.adoptNow <- struct{}{}:
		default: // a pass is already due
		}
	}}
	ctx, cancel := context.WithCancel(a.ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		d.Run(ctx)
	}()
	a.docker = d
	a.stopDocker = func() { cancel(); <-done }
}
