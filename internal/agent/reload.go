package agent

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"

	"github.com/cilium/ebpf"

	"github.com/underpass-cni/underpass/internal/config"
	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/hostnat"
	"github.com/underpass-cni/underpass/internal/loader"
	"github.com/underpass-cni/underpass/internal/netwatch"
)

// reload applies a new, parsed config, or rejects it leaving the old one in
// force.
func (a *Agent) reload(ctx context.Context, c *config.Config, why string) {
	nodeNets, err := nodeSubnets()
	if err == nil {
		var epNets []netip.Prefix
		if epNets, err = endpointSubnets(&a.dp.Load().Maps); err == nil {
			err = c.ValidateAgainst(nodeNets, epNets)
		}
	}
	if err == nil {
		// Credentials are checked now, so that a kubeconfig that cannot be
		// read rejects the config instead of half applying it.
		err = a.kube.check(c)
	}
	if err != nil {
		a.rejected(fmt.Errorf("config %s: %w", a.opts.ConfigPath, err))
		return
	}
	changed := changedKeys(a.cfg, c)
	if err := a.apply(ctx, c, a.cfg); err != nil {
		// Most of the new config may be in force: keep it as the one to
		// heal towards rather than pretending the old one still is.
		a.cfg = c
		a.metrics.reloads.WithLabelValues("error").Inc()
		a.log.Error("config reload failed to apply; will retry", "trigger", why, "error", oneLine(err))
		return
	}
	a.cfg = c
	a.metrics.reloads.WithLabelValues("success").Inc()
	a.log.Info("config reloaded", "trigger", why, "changed", changed)
}

// rejected logs a config that was not applied, on one line that starts with
// the key to fix.
func (a *Agent) rejected(err error) {
	a.metrics.reloads.WithLabelValues("error").Inc()
	a.log.Error("config rejected; the previous config stays in force", "error", oneLine(err))
}

// apply makes the datapath and the agent follow c; old is the config in
// force (nil at start-up).
func (a *Agent) apply(ctx context.Context, c, old *config.Config) error {
	var errs []error
	if old != nil && c.BPFFS != old.BPFFS {
		a.log.Warn("bpffs changed: it takes effect when underpassd restarts", "in_use", old.BPFFS, "configured", c.BPFFS)
	}
	a.setLevel(c)
	// The live set before the service CIDRs: a VIP of a new CIDR is never
	// judged stale because its CIDR arrived first.
	svc := a.svc.Load()
	errs = append(errs, svc.SetStatic(c.StaticServices()))
	// Kubernetes switched on: the armed live set lacks its Services, so the
	// guard judges nothing until the informers have synced (armGuard).
	if settingsOf(c).enabled && old != nil && !settingsOf(old).enabled && a.svcSynced {
		a.svcSynced = false
		a.log.Info("services.kubernetes on: the stale-service guard is disarmed until the informers have synced")
	}
	errs = append(errs, a.applyDatapath(c))
	// Not fatal: without it only Services with underlay pod backends fail;
	// heal retries. At start-up the parents are not known yet: Run syncs
	// it once they are, since a table installed now would have no rule
	// for them, and the previous agent's rules would be gone until then
	// (seen on a real node: a request through a Service lost on every
	// agent restart).
	if old != nil {
		a.masqueradeFailed(a.syncMasquerade(c.Services.Masquerade, false))
	}
	if err := a.kube.configure(ctx, c); err != nil {
		errs = append(errs, err)
	}

	if old != nil {
		if !slices.Equal(c.Uplinks, old.Uplinks) {
			a.cfg = c // syncUplinks reads the list in force
			a.syncUplinks(false)
		}
		if c.XDP != old.XDP {
			a.cfg = c
			for _, p := range a.parents {
				a.attachXDP(p.ifindex, p.name)
			}
		}
		if c.Metrics.Listen != a.httpListen {
			errs = append(errs, a.relisten(c.Metrics.Listen))
		}
	}
	return errors.Join(errs...)
}

// applyDatapath writes the config word, the service CIDRs and the host set.
func (a *Agent) applyDatapath(c *config.Config) error {
	m := &a.dp.Load().Maps
	var errs []error
	kube := settingsOf(c).enabled
	want := datapath.Config{HostReachable: c.HostReachability, StaleReject: c.StaleAction() == config.ActionReject,
		ServicesSynced: a.svcSynced, ServicesEBPF: c.ServiceMode() == config.ServiceModeEBPF}
	cur, gen, err := datapath.GetConfig(m)
	// Armed once stays armed: a restarted agent adopts the live set the
	// previous one synced, a better guess than "nothing is stale", but
	// only a set of the same sources: one synced without the Kubernetes
	// Services lacks every ClusterIP, and judged by it they would all be
	// stale until the informers have synced (forever if they never do).
	want.ServicesSynced = want.ServicesSynced || (err == nil && cur.ServicesSynced && cur.ServicesFromKube == kube)
	want.ServicesFromKube = want.ServicesSynced && kube
	if err != nil || cur != want || a.gen == 0 {
		// The generation continues from the pinned one, so it grows across
		// restarts and bpftool shows that an apply happened.
		a.gen = max(a.gen, gen) + 1
		errs = append(errs, datapath.SetConfig(m, want, a.gen))
	}
	errs = append(errs, datapath.SyncServiceCIDRs(m, c.ServiceCIDRs()))
	errs = append(errs, a.syncHosts(c))
	return errors.Join(errs...)
}

// syncMasquerade makes the agent's nftables table (see internal/hostnat) follow
// services.masquerade and the attached parents: on, it masquerades the
// Service flows that arrive steered on a parent and that the host translates
// and forwards, so the backend's reply comes back through the host; off,
// the table is gone. force checks the kernel's copy instead of trusting
// what was installed last (start-up, heal).
func (a *Agent) syncMasquerade(on, force bool) error {
	if !on {
		if !a.masq && !force {
			return nil
		}
		if st, err := hostnat.Installed(); err == nil && !st.Table {
			a.masq = false
			return nil
		}
		if err := hostnat.Remove(); err != nil {
			return fmt.Errorf("services.masquerade: %w", err)
		}
		a.masq = false
		a.log.Info("not masquerading Service flows", "nftables", "table inet "+hostnat.Table+" removed")
		return nil
	}
	parents := make([]string, 0, len(a.parents))
	for _, p := range a.parents {
		parents = append(parents, p.name)
	}
	slices.Sort(parents)
	if a.masq && !force && slices.Equal(parents, a.masqParents) {
		return nil
	}
	if a.masq && force && slices.Equal(parents, a.masqParents) {
		// Trust nothing but a table with the rules Install writes.
		if st, err := hostnat.Installed(); err == nil && st.Table && st.Rules == hostnat.Rules(len(parents)) {
			return nil
		}
		a.log.Warn("nftables table inet " + hostnat.Table + " was changed from under the agent: reinstalling")
	}
	if err := hostnat.Install(hostnat.Marks{Steered: loader.MarkSteered, Service: loader.MarkService}, parents); err != nil {
		a.masq = false
		return fmt.Errorf("services.masquerade: %w (without it, a pod's Service flow to another underlay pod gets no reply: set services.masquerade: false only if something else masquerades them, e.g. kube-proxy's masqueradeAll)", err)
	}
	a.masq, a.masqParents = true, parents
	a.log.Info("masquerading Service flows the host forwards", "nftables", "table inet "+hostnat.Table, "parents", parents)
	return nil
}

// healMasquerade re-checks the table against the kernel's copy.
func (a *Agent) healMasquerade() {
	if a.cfg == nil {
		return
	}
	a.masqueradeFailed(a.syncMasquerade(a.cfg.Services.Masquerade, true))
}

// masqueradeFailed counts and logs (once) a failed syncMasquerade.
func (a *Agent) masqueradeFailed(err error) {
	if err == nil {
		return
	}
	a.masqErrors.Add(1)
	a.errorOnce("masquerade", "Service flows to underlay pod backends will get no reply", "error", err)
}

// armGuard sets the config's ServicesSynced flag once every configured
// service source has synced: from then on the stale guard judges.
func (a *Agent) armGuard() {
	if a.svcSynced {
		return
	}
	// Synced is of the sources running: with Kubernetes configured but its
	// source not (yet) running (a switch-on that failed half-way), the
	// static list alone would arm it and every ClusterIP look stale.
	svc := a.svc.Load()
	if svc == nil || !svc.Synced() || svc.Kubernetes() != settingsOf(a.cfg).enabled {
		return
	}
	a.svcSynced = true
	if err := a.applyDatapath(a.cfg); err != nil {
		a.svcSynced = false
		a.log.Error("arm the stale-service guard", "error", err)
		return
	}
	a.log.Info("live services synced: the stale-service guard is armed")
}

// syncHosts writes host_cidrs: hostCIDRs steered to the host stack, and the
// node's own addresses (LOCAL: their ARP/ND is answered by the host).
func (a *Agent) syncHosts(c *config.Config) error {
	set := datapath.HostSet{}
	for _, p := range c.HostCIDRs() {
		set.Add(p, loader.HostSteer)
	}
	addrs, err := netwatch.Addrs()
	if err != nil {
		return err
	}
	svc := c.ServiceCIDRs()
	for _, p := range addrs {
		// A node address inside the service range (kube-proxy IPVS puts
		// every ClusterIP on kube-ipvs0) is decided by the service check,
		// which runs first, and pods never ARP for it: leaving it out
		// keeps the set small enough for the program's prefilter.
		if slices.ContainsFunc(svc, func(s netip.Prefix) bool { return s.Contains(p.Addr()) }) {
			continue
		}
		set.Add(netip.PrefixFrom(p.Addr(), p.Addr().BitLen()), loader.HostLocal)
	}
	flat := map[netip.Prefix]uint32{}
	for p, f := range set {
		flat[p] = uint32(f)
	}
	if maps.Equal(flat, a.hostSet) {
		return nil
	}
	if err := datapath.SyncHostCIDRs(&a.dp.Load().Maps, set); err != nil {
		return err
	}
	if a.hostSet != nil {
		a.log.Info("host addresses updated", "entries", len(flat))
	}
	a.hostSet = flat // nil (heal): compared against the map, by SyncHostCIDRs
	return nil
}

// nodeSubnets are the subnets of the node's addresses, for the overlap check.
func nodeSubnets() ([]netip.Prefix, error) {
	addrs, err := netwatch.Addrs()
	if err != nil {
		return nil, err
	}
	return subnetsOf(addrs), nil
}

// subnetsOf keeps the addresses that stand for a subnet hosts live in.
// Link-local and loopback are left out (no service range can be there), and
// so are single-address prefixes (/32, /128): kube-proxy in IPVS mode puts
// every ClusterIP on kube-ipvs0 as a /32, and node-local DNS binds its VIP
// the same way; those sit inside the service range by design.
func subnetsOf(addrs []netip.Prefix) []netip.Prefix {
	var out []netip.Prefix
	for _, p := range addrs {
		a := p.Addr()
		if a.IsLinkLocalUnicast() || a.IsLoopback() || p.Bits() == a.BitLen() {
			continue
		}
		out = append(out, p.Masked())
	}
	return out
}

// endpointSubnets are the subnets of the registered endpoints' addresses.
func endpointSubnets(m *loader.Maps) ([]netip.Prefix, error) {
	eps, err := datapath.Endpoints(m)
	if err != nil {
		return nil, err
	}
	seen := map[netip.Prefix]bool{}
	for _, ep := range eps {
		for _, p := range ep.Addrs {
			seen[p.Masked()] = true
		}
	}
	return slices.Collect(maps.Keys(seen)), nil
}

// pinnedEndpointSubnets reads the endpoints a previous run left pinned in
// dir, without loading anything (start-up validation comes first). Nothing
// pinned, or a map this build cannot read, means nothing to check here;
// loading reports the latter properly.
func pinnedEndpointSubnets(dir string) []netip.Prefix {
	em, err := ebpf.LoadPinnedMap(filepath.Join(dir, "endpoints"), nil)
	if err != nil {
		return nil
	}
	defer em.Close()
	out, err := endpointSubnets(&loader.Maps{Endpoints: em})
	if err != nil {
		return nil
	}
	return out
}

// changedKeys names the top-level keys that differ, for the reload log.
func changedKeys(old, c *config.Config) []string {
	var out []string
	add := func(key string, differ bool) {
		if differ {
			out = append(out, key)
		}
	}
	add("hostReachability", old.HostReachability != c.HostReachability)
	add("hostCIDRs", !slices.Equal(old.HostCIDRList, c.HostCIDRList))
	add("staleServices", !slices.Equal(old.StaleServices.CIDRs, c.StaleServices.CIDRs) || old.StaleServices.Action != c.StaleServices.Action || old.StaleServices.RequireEndpoints != c.StaleServices.RequireEndpoints)
	add("services", !slices.Equal(old.Services.Static, c.Services.Static) || old.Services.Kubernetes != c.Services.Kubernetes ||
		old.Services.Kubeconfig != c.Services.Kubeconfig || old.Services.Masquerade != c.Services.Masquerade || old.Services.Mode != c.Services.Mode)
	add("adopt", !slices.Equal(old.Adopt.Parents, c.Adopt.Parents) || old.Adopt.Docker != c.Adopt.Docker)
	add("uplinks", !slices.Equal(old.Uplinks, c.Uplinks))
	add("xdp", old.XDP != c.XDP)
	add("metrics", old.Metrics != c.Metrics)
	add("bpffs", old.BPFFS != c.BPFFS)
	add("gcInterval", old.GCInterval != c.GCInterval)
	add("logLevel", old.LogLevel != c.LogLevel)
	return out
}

func oneLine(err error) string {
	return strings.ReplaceAll(strings.TrimSpace(err.Error()), "\n", "; ")
}
