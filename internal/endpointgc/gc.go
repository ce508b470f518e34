// Package endpointgc removes endpoint registrations whose container is gone:
// the CNI plugin's DEL never ran (node crash, runtime bug, a plugin binary
// removed), so nothing else would ever clean them up, and their addresses
// would stay claimed.
package endpointgc

import (
	"errors"
	"fmt"
	"log/slog"
	"strings"

	"github.com/vishvananda/netlink"

	"github.com/underpass-cni/underpass/internal/attach"
	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
)

// Removed is one collected endpoint and why it was judged dead.
type Removed struct {
	datapath.Endpoint
	Reason string
}

// Collector removes dead endpoints. Their programs need no collecting: they
// are filters on the endpoint's interface, and go with it.
type Collector struct {
	Maps *loader.Maps
	Log  *slog.Logger
	// Target names the endpoint programs for an interface
	// (loader.Objects.EndpointTarget): an interface still there but no
	// longer the registered one is quarantined with them.
	Target func(id uint32, netns string, ifindex int) attach.EndpointOptions
	// Lock is the datapath's writer lock (loader.Objects.Lock), held to
	// confirm and remove each dead endpoint: the CNI plugin's DEL holds it
	// from deleting the interface to unregistering, so an endpoint seen
	// half-deleted is re-judged after that DEL and found gone. Nil: no lock
	// (tests of the judging alone).
	Lock func() (unlock func(), err error)
}

// Run checks every registered endpoint once and removes the dead ones:
// those whose netns path is gone (or no longer a namespace) or whose
// interface is gone from it. Registrations whose state cannot be judged
// (no netns recorded, a permission error) are kept: removing a live pod's
// entries would break it, keeping a dead one only wastes an entry.
func (c *Collector) Run() ([]Removed, error) {
	m, log := c.Maps, c.Log
	eps, err := datapath.Endpoints(m)
	if err != nil {
		return nil, err
	}
	ch := &checker{handles: map[string]*netlink.Handle{}}
	defer ch.close()
	var out []Removed
	var errs []error
	for id, ep := range eps {
		reason, err := ch.dead(&ep)
		if err != nil {
			log.Debug("endpoint gc: cannot judge endpoint; keeping it", "id", id, "error", err)
			continue
		}
		if reason == "" {
			continue
		}
		removed, err := c.confirmAndRemove(id, &ep)
		if err != nil {
			errs = append(errs, err)
		}
		if !removed {
			continue
		}
		log.Info("endpoint gc: removed endpoint", "id", id, "container", ep.ContainerID, "ifname", ep.IfName,
			"pod", ep.PodNamespace+"/"+ep.PodName, "reason", reason)
		out = append(out, Removed{Endpoint: ep, Reason: reason})
	}
	return out, errors.Join(errs...)
}

// confirmAndRemove removes endpoint id if, under the lock, its record is
// still the one judged and it is still dead: a DEL in flight when it was
// judged has finished by then (and removed it), and a retried ADD may have
// re-registered the same attachment.
func (c *Collector) confirmAndRemove(id uint32, judged *datapath.Endpoint) (bool, error) {
	if c.Lock != nil {
		unlock, err := c.Lock()
		if err != nil {
			return false, err
		}
		defer unlock()
	}
	now, err := datapath.Lookup(c.Maps, id)
	if err != nil || !now.Same(judged) {
		return false, nil
	}
	fresh := &checker{handles: map[string]*netlink.Handle{}}
	defer fresh.close()
	reason, err := fresh.dead(&now)
	if err != nil || reason == "" {
		return false, err
	}
	// The interface is still there with another MAC (a pod with NET_ADMIN
	// can do that): its filters would go on running as endpoint id, and once
	// the id is reused, vet its frames as someone else's. Detached, the
	// interface would be unguarded, free to send as anyone to its bridged
	// neighbours. It is quarantined first: its filters run as no endpoint
	// and drop all it sends, until a registration swaps them (an adopted
	// slave is registered again at the next scan) or the interface goes.
	// The same goes for an interface renamed (its index now has another
	// name) that still runs this endpoint's filters: left as they are, once
	// the id is free they would vet its frames as whoever claims it next.
	switch {
	case reason == reasonMACChanged:
		if err := c.quarantine(id, &now); err != nil {
			return false, err
		}
	case strings.HasPrefix(reason, reasonIndexReused):
		f, err := attach.InspectEndpoint(now.Netns, now.Ifindex)
		if err != nil && !attach.Gone(err) {
			return false, err
		}
		if err == nil && (f.Ingress == id || f.Egress == id) {
			if err := c.quarantine(id, &now); err != nil {
				return false, err
			}
		}
	}
	if err := datapath.Unregister(c.Maps, id); err != nil {
		return false, err
	}
	return true, nil
}

func (c *Collector) quarantine(id uint32, ep *datapath.Endpoint) error {
	return attach.QuarantineEndpoint(c.Target(id, ep.Netns, ep.Ifindex))
}

// reasonIndexReused starts the reason for an interface whose index has
// another name: renamed, or gone and its index taken by another.
const reasonIndexReused = "interface gone (its index now belongs to "

// reasonMACChanged: the interface is still there, with another MAC.
const reasonMACChanged = "interface replaced (MAC changed)"

type checker struct {
	handles map[string]*netlink.Handle
	gone    map[string]string // netns path -> why it is gone
}

func (c *checker) close() {
	for _, h := range c.handles {
		h.Close()
	}
}

// dead returns why ep is dead, "" if it is alive, or an error when it
// cannot tell.
func (c *checker) dead(ep *datapath.Endpoint) (string, error) {
	path := ep.Netns
	if path == "" {
		return "", errors.New("no netns recorded")
	}
	if why, ok := c.gone[path]; ok {
		return why, nil
	}
	h, ok := c.handles[path]
	if !ok {
		var why string
		var err error
		h, why, err = openNetns(path)
		if err != nil {
			return "", err
		}
		if why != "" {
			if c.gone == nil {
				c.gone = map[string]string{}
			}
			c.gone[path] = why
			return why, nil
		}
		c.handles[path] = h
	}

	ifname := ep.IfName
	var l netlink.Link
	var err error
	if ep.Ifindex != 0 {
		l, err = h.LinkByIndex(ep.Ifindex)
	} else {
		l, err = h.LinkByName(ifname)
	}
	if attach.LinkGone(err) {
		return "interface gone", nil
	}
	if err != nil {
		return "", fmt.Errorf("look up interface in %s: %w", path, err)
	}
	// The index can be reused by another interface in the same netns.
	if ifname != "" && l.Attrs().Name != ifname {
		return reasonIndexReused + l.Attrs().Name + ")", nil
	}
	if ep.Mode == loader.ModeMacvlan && string(l.Attrs().HardwareAddr) != string(ep.MAC) {
		return reasonMACChanged, nil
	}
	return "", nil
}

// openNetns opens a netlink handle in the namespace at path, or says why the
// namespace is gone.
func openNetns(path string) (*netlink.Handle, string, error) {
	h, err := attach.NetnsHandle(path)
	switch {
	case errors.Is(err, attach.ErrNotANamespace):
		return nil, "netns gone (path is no longer a namespace)", nil
	case errors.Is(err, attach.ErrNetnsGone):
		return nil, "netns gone", nil
	case err != nil:
		return nil, "", err
	}
	return h, "", nil
}
