package agent

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/vishvananda/netlink"

	"github.com/underpass-cni/underpass/internal/attach"
	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
)

// pinGuard restores pins removed from under the running agent (rm -rf of
// the bpffs dir, a tool that unpins a map). The datapath keeps running on
// the agent's fds, but without its map and program pins the CNI plugin
// cannot open it, and a tcx or XDP link whose pin goes is detached by the
// kernel: the hairpin stops until it is attached again.
type pinGuard struct {
	repairs *prometheus.CounterVec
	// seen holds the link pins present at the last check. Only those count
	// as removed when missing: legacy tc attachments, xdp: off and failed
	// XDP attaches never have one.
	seen map[string]bool
	// failed says why the last repair failed, for /readyz; nil when none did.
	failed atomic.Pointer[string]
}

// startPinGuard registers the repair metric and takes the first look at
// the pins, right after start-up attached everything: a link pin removed
// before the first tick is noticed too.
func (a *Agent) startPinGuard() error {
	a.pins.repairs = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "underpass_agent_repairs_total",
		Help: "State removed from under the agent and restored: what=pins (map and program pins in the bpffs dir pinned again), " +
			"what=links (parent, XDP or uplink programs re-attached after their link pins were removed), " +
			"what=endpoint_programs (the shared endpoint programs put back into ep_progs after someone emptied a slot).",
	}, []string{"what"})
	// Every series exists from the start, so increase() and alerts work.
	a.pins.repairs.WithLabelValues("pins")
	a.pins.repairs.WithLabelValues("links")
	a.pins.repairs.WithLabelValues("endpoint_programs")
	if err := a.metrics.reg.Register(a.pins.repairs); err != nil {
		return fmt.Errorf("register repair metric: %w", err)
	}
	a.checkPins()
	return nil
}

// checkPins restores missing pins: map and program pins first, then the
// links. It runs on every reconcile tick, before anything that attaches:
// pinning a link would re-create a removed directory with only links/ in it.
func (a *Agent) checkPins() {
	dp := a.dp.Load()
	var why []string
	for _, err := range []error{a.restorePins(dp), a.restoreLinks(dp), a.restoreEndpointPrograms(dp)} {
		if err != nil {
			why = append(why, err.Error())
		}
	}
	if len(why) == 0 {
		a.pins.failed.Store(nil)
		return
	}
	// One line, like the rest of the /readyz body.
	msg := strings.Join(why, "; ")
	a.pins.failed.Store(&msg)
}

// repairFailure is what /readyz reports while a repair fails.
func (a *Agent) repairFailure() string {
	if why := a.pins.failed.Load(); why != nil {
		return *why
	}
	return ""
}

// restorePins pins the datapath's maps and programs again where their pins
// are missing: one lstat per pin when nothing is.
func (a *Agent) restorePins(dp *loader.Objects) error {
	missing := dp.MissingPins()
	if len(missing) == 0 {
		delete(a.warned, "repin") // back by other means (a mount over the dir went): log a new failure
		return nil
	}
	_, err := os.Lstat(dp.Dir)
	dirGone := errors.Is(err, fs.ErrNotExist)
	restored, err := dp.Repin()
	if err != nil {
		a.errorOnce("repin", "pins removed from under the agent cannot be restored: the CNI plugin cannot open the datapath; retrying",
			"dir", dp.Dir, "missing", missing, "error", err)
		return fmt.Errorf("pins removed from %s and not restored: %w", dp.Dir, err)
	}
	delete(a.warned, "repin")
	a.pins.repairs.WithLabelValues("pins").Inc()
	what := any(missing)
	if dirGone {
		what = "the whole directory"
	}
	a.log.Warn("pins removed from under the agent; pinned the running maps and programs again",
		"dir", dp.Dir, "missing", what, "restored", len(restored))
	return nil
}

// restoreEndpointPrograms puts the shared endpoint programs back into
// ep_progs when a slot was emptied (bpftool map delete): until then every
// pod's stub lets its traffic through unchecked and uncounted.
func (a *Agent) restoreEndpointPrograms(dp *loader.Objects) error {
	cerr := dp.CheckEndpointPrograms()
	if cerr == nil {
		delete(a.warned, "ep-progs")
		return nil
	}
	if err := dp.RestoreEndpointPrograms(); err != nil {
		a.errorOnce("ep-progs", "endpoint programs missing from ep_progs and not restored: pods run unchecked and uncounted; retrying",
			"problem", cerr, "error", err)
		return fmt.Errorf("endpoint programs missing from ep_progs and not restored: %w", err)
	}
	delete(a.warned, "ep-progs")
	a.pins.repairs.WithLabelValues("endpoint_programs").Inc()
	a.log.Warn("endpoint programs removed from under the agent; put them back into ep_progs", "problem", cerr)
	return nil
}

// pinnedLink is an attachment the agent keeps through a link pin.
type pinnedLink struct {
	pin  string
	what string // for the log
	// restore pins the link again, or attaches afresh; adopted says the
	// link was still attached and only its pin was gone.
	restore func() (adopted bool, err error)
	extra   bool // XDP: a failure is logged but does not fail /readyz
	ifindex int  // the parent's; 0 for an uplink
}

// restoreLinks re-attaches the parents and uplinks whose link pins were
// removed since the last check.
func (a *Agent) restoreLinks(dp *loader.Objects) error {
	seen := map[string]bool{}
	var fixed []string
	var errs []string
	gone := map[int]bool{} // parents released in this pass: their other links went too
	for _, l := range a.pinnedLinks(dp) {
		if gone[l.ifindex] {
			continue
		}
		if pinExists(l.pin) {
			seen[l.pin] = true
			delete(a.warned, "relink-"+l.pin)
			continue
		}
		if !a.pins.seen[l.pin] {
			continue // never pinned: legacy tc, or not attached yet
		}
		adopted, err := l.restore()
		switch {
		case errors.Is(err, errLinkGone):
			// The interface went with its pin: linkDeleted handles that.
		case errors.Is(err, errParentReleased):
			// A plugin's failed ADD took back the parent it had
			// registered and attached (the agent had attached it
			// too, meanwhile): no repair, the parent is not one.
			if !a.releaseParent(dp, l.ifindex, l.pin) {
				seen[l.pin] = true // an ADD took it again meanwhile: look next tick
				continue
			}
			gone[l.ifindex] = true
		case err != nil:
			seen[l.pin] = true // retried next tick
			a.errorOnce("relink-"+l.pin, "link pin removed from under the agent; restoring it failed, retrying",
				"link", l.what, "error", err)
			if !l.extra {
				errs = append(errs, fmt.Sprintf("%s not restored after its link pin was removed: %v", l.what, err))
			}
		default:
			delete(a.warned, "relink-"+l.pin)
			seen[l.pin] = pinExists(l.pin)
			if adopted {
				fixed = append(fixed, l.what+" (still attached: pinned again)")
			} else {
				fixed = append(fixed, l.what+" (re-attached)")
			}
		}
	}
	a.pins.seen = seen
	if len(fixed) > 0 {
		a.pins.repairs.WithLabelValues("links").Add(float64(len(fixed)))
		a.log.Warn("link pins removed from under the agent; restored the attachments",
			"dir", dp.Dir, "links", fixed)
	}
	if len(errs) > 0 {
		return errors.New(strings.Join(errs, "; "))
	}
	return nil
}

var (
	errLinkGone       = errors.New("interface gone")
	errParentReleased = errors.New("parent released")
)

// pinnedLinks lists the link pins the agent keeps: the tc egress and XDP
// links of its parents, the tc egress links of its uplinks.
func (a *Agent) pinnedLinks(dp *loader.Objects) []pinnedLink {
	var out []pinnedLink
	xdp := a.cfg.XDPMode()
	for idx, p := range a.parents {
		out = append(out, pinnedLink{
			pin:     attach.LinkPin(dp.Dir, attach.RoleParent, idx),
			what:    fmt.Sprintf("parent %s (ifindex %d) tc egress", p.name, idx),
			ifindex: idx,
			restore: ifPresent(idx, func() (bool, error) {
				if released(dp, idx) {
					return false, errParentReleased
				}
				// Only the link went: the parents entry is as it was.
				return attach.RestoreEgress(dp.EgressTarget(attach.RoleParent, idx))
			}),
		})
		if xdp != attach.XDPOff {
			out = append(out, pinnedLink{
				pin:     attach.XDPLinkPin(dp.Dir, idx),
				what:    fmt.Sprintf("parent %s (ifindex %d) xdp", p.name, idx),
				ifindex: idx,
				restore: ifPresent(idx, func() (bool, error) { return attach.RestoreXDP(dp.XDPTarget(idx, xdp)) }),
				extra:   true,
			})
		}
	}
	for name, u := range a.uplinks {
		if u.isParent {
			continue // its parent program guards it
		}
		idx := u.ifindex
		out = append(out, pinnedLink{
			pin:     attach.LinkPin(dp.Dir, attach.RoleUplink, idx),
			what:    fmt.Sprintf("uplink %s (ifindex %d) tc egress", name, idx),
			restore: ifPresent(idx, func() (bool, error) { return attach.RestoreEgress(dp.EgressTarget(attach.RoleUplink, idx)) }),
		})
	}
	return out
}

// releaseParent forgets parent ifindex, which released says its registrant
// gave up, and drops its links (XDP: its own). Under the lock, checked
// again: a plugin's ADD retried meanwhile may have registered and attached
// it anew, which must stay. An uplink that was this parent gets its own
// program back. false when it is not released after all.
func (a *Agent) releaseParent(dp *loader.Objects, ifindex int, pin string) bool {
	unlock, err := dp.Lock()
	if err != nil {
		a.log.Error("release parent: take the datapath lock", "ifindex", ifindex, "error", err)
		return false
	}
	if !released(dp, ifindex) || pinExists(pin) {
		unlock()
		return false
	}
	delete(a.parents, ifindex)
	dropParentLinks(dp, ifindex)
	unlock()
	a.log.Info("parent released: its only endpoint's ADD failed and took back its registration and link; forgot it",
		"ifindex", ifindex)
	resync := false
	for name, u := range a.uplinks {
		if u.ifindex == ifindex && u.isParent {
			delete(a.uplinks, name)
			resync = true
		}
	}
	if resync {
		a.syncUplinks(false)
	}
	return true
}

// released says whether parent ifindex was given up by its registrant: no
// parents entry and no endpoint on it, what a plugin's failed first ADD
// leaves when it undoes its parent (datapath's undoParent). The agent
// would not attach such a parent; its missing link pin is no repair.
func released(dp *loader.Objects, ifindex int) bool {
	if _, err := datapath.GetParent(&dp.Maps, ifindex); !errors.Is(err, datapath.ErrNoParent) {
		return false
	}
	return !parentRefs(&dp.Maps)[ifindex]
}

// ifPresent runs restore only while interface ifindex exists: a link pin
// can go with its interface (linkDeleted drops it), which is no repair.
func ifPresent(ifindex int, restore func() (bool, error)) func() (bool, error) {
	return func() (bool, error) {
		if _, err := netlink.LinkByIndex(ifindex); err != nil {
			return false, errLinkGone
		}
		return restore()
	}
}

func pinExists(path string) bool {
	_, err := os.Lstat(path)
	return err == nil
}
