package ctl

import (
	"context"
	"fmt"
	"net"
	"slices"
	"strings"
	"text/tabwriter"

	"github.com/vishvananda/netlink"

	"github.com/underpass-cni/underpass/internal/attach"
	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
)

// Status is the output of `underpassctl status`.
type Status struct {
	BPFFS     string         `json:"bpffs"`
	Loaded    bool           `json:"loaded"`
	Config    ConfigView     `json:"config"`
	Kernel    Kernel         `json:"kernel"`
	Parents   []ParentView   `json:"parents"`
	Uplinks   []UplinkView   `json:"uplinks"`
	Endpoints EndpointCounts `json:"endpoints"`
	// EndpointPrograms is "ok" when both shared endpoint programs are in
	// ep_progs, else what is missing: pods then run unchecked and uncounted.
	EndpointPrograms string                 `json:"endpointPrograms"`
	LiveServices     int                    `json:"liveServices"`
	ServiceCIDRs     int                    `json:"serviceCIDRs"`
	HostCIDRs        int                    `json:"hostCIDRs"`
	Counters         map[string]CounterView `json:"counters"`
	Drops            map[string]CounterView `json:"drops"`
}

// ConfigView is the config word the agent wrote.
type ConfigView struct {
	HostReachable bool   `json:"hostReachability"`
	StaleAction   string `json:"staleAction"`
	Generation    uint64 `json:"generation"`
}

// ParentView is one parent NIC.
type ParentView struct {
	Ifindex   int    `json:"ifindex"`
	Name      string `json:"name"`
	MAC       string `json:"mac"`
	Mode      string `json:"mode"`
	Egress    string `json:"egress"` // tcx, legacy, none, defunct
	XDP       string `json:"xdp"`    // native, generic, off, ...
	Endpoints int    `json:"endpoints"`
}

// UplinkView is one extra NIC carrying the stale-service guard.
type UplinkView struct {
	Ifindex int    `json:"ifindex"`
	Name    string `json:"name"`
	Egress  string `json:"egress"`
}

// EndpointCounts sums up the endpoints by how their programs are attached.
type EndpointCounts struct {
	Registered int            `json:"registered"`
	Attach     map[string]int `json:"attach"`
}

// CounterView is a packets/bytes pair.
type CounterView struct {
	Packets uint64 `json:"packets"`
	Bytes   uint64 `json:"bytes"`
}

// statNames name the global counters (enum up_stat), for output only.
var statNames = map[loader.Stat]string{
	loader.StatHostToEndpoint: "host_to_endpoint",
	loader.StatEndpointToHost: "endpoint_to_host",
	loader.StatSteered:        "steered",
	loader.StatARPCloned:      "arp_cloned",
	loader.StatNDCloned:       "nd_cloned",
	loader.StatStaleDropped:   "stale_dropped",
	loader.StatStaleRejected:  "stale_rejected",
	loader.StatCloneFailed:    "clone_failed",
	loader.StatIPConflict:     "ip_conflicts",
	loader.StatWireRx:         "wire_rx",
}

func runStatus(_ context.Context, env Env, o *options, dp *loader.Objects) error {
	st, err := status(dp)
	if err != nil {
		return err
	}
	if o.output == "json" {
		return writeJSON(env.Stdout, st)
	}
	return printStatus(env, st)
}

func status(dp *loader.Objects) (*Status, error) {
	m := &dp.Maps
	st := &Status{BPFFS: dp.Dir, Loaded: true, Kernel: probeKernel(), Parents: []ParentView{}}

	cfg, gen, err := datapath.GetConfig(m)
	if err != nil {
		return nil, err
	}
	st.Config = ConfigView{HostReachable: cfg.HostReachable, StaleAction: "drop", Generation: gen}
	if cfg.StaleReject {
		st.Config.StaleAction = "reject"
	}
	perParent, err := st.addEndpoints(dp)
	if err != nil {
		return nil, err
	}
	if err := st.addParents(dp, perParent); err != nil {
		return nil, err
	}
	if err := st.addSets(m); err != nil {
		return nil, err
	}
	if err := st.addCounters(m); err != nil {
		return nil, err
	}
	return st, nil
}

// addEndpoints counts the endpoints, by how their programs are attached,
// and returns how many each parent has.
func (st *Status) addEndpoints(dp *loader.Objects) (map[int]int, error) {
	eps, err := datapath.Endpoints(&dp.Maps)
	if err != nil {
		return nil, err
	}
	perParent := map[int]int{}
	st.Endpoints = EndpointCounts{Registered: len(eps), Attach: map[string]int{}}
	for id, ep := range eps {
		perParent[ep.ParentIfindex]++
		mode := endpointMode(id, ep.Netns, ep.Ifindex)
		mode, _, _ = strings.Cut(mode, " ")
		st.Endpoints.Attach[mode]++
	}
	st.EndpointPrograms = "ok"
	if err := dp.CheckEndpointPrograms(); err != nil {
		st.EndpointPrograms = err.Error()
	}
	return perParent, nil
}

// addParents describes every registered parent and the uplinks.
func (st *Status) addParents(dp *loader.Objects, perParent map[int]int) error {
	parents, err := datapath.Parents(&dp.Maps)
	if err != nil {
		return err
	}
	for ifindex, p := range parents {
		st.Parents = append(st.Parents, ParentView{
			Ifindex:   ifindex,
			Name:      ifName(ifindex),
			MAC:       net.HardwareAddr(p.Mac[:]).String(),
			Mode:      loader.Mode(p.Mode).String(),
			Egress:    egressMode(dp.Dir, attach.RoleParent, ifindex),
			XDP:       xdpMode(dp.Dir, ifindex),
			Endpoints: perParent[ifindex],
		})
	}
	slices.SortFunc(st.Parents, func(a, b ParentView) int { return a.Ifindex - b.Ifindex })
	st.Uplinks, err = uplinks(dp.Dir)
	return err
}

// addSets counts the live Services and the CIDR sets.
func (st *Status) addSets(m *loader.Maps) error {
	live, err := datapath.LiveServices(m)
	if err != nil {
		return err
	}
	st.LiveServices = len(live)
	svc, err := datapath.LPMEntries(m.SvcCidrs)
	if err != nil {
		return fmt.Errorf("list service CIDRs: %w", err)
	}
	st.ServiceCIDRs = len(svc)
	hosts, err := datapath.LPMEntries(m.HostCidrs)
	if err != nil {
		return fmt.Errorf("list host CIDRs: %w", err)
	}
	st.HostCIDRs = len(hosts)
	return nil
}

// addCounters adds the node-wide counters and drops.
func (st *Status) addCounters(m *loader.Maps) error {
	global, err := datapath.GlobalStats(m)
	if err != nil {
		return err
	}
	st.Counters = map[string]CounterView{}
	for i, c := range global {
		if name, ok := statNames[loader.Stat(i)]; ok {
			st.Counters[name] = cv(c)
		}
	}
	drops, err := datapath.Drops(m)
	if err != nil {
		return err
	}
	st.Drops = map[string]CounterView{}
	for i, c := range drops {
		st.Drops[loader.DropReason(i).String()] = cv(c)
	}
	return nil
}

// uplinks lists the uplink attachments: tcx links are pinned; legacy
// filters are found on the interfaces.
func uplinks(dir string) ([]UplinkView, error) {
	atts, err := attach.List(dir)
	if err != nil {
		return nil, err
	}
	seen := map[int]bool{}
	out := []UplinkView{}
	for _, a := range atts {
		if a.Role != attach.RoleUplink {
			continue
		}
		seen[a.Ifindex] = true
		out = append(out, UplinkView{Ifindex: a.Ifindex, Name: ifName(a.Ifindex), Egress: egressMode(dir, attach.RoleUplink, a.Ifindex)})
	}
	links, err := netlink.LinkList()
	if err == nil {
		for _, l := range links {
			i := l.Attrs().Index
			if !seen[i] && legacyFilter(nil, i, netlink.HANDLE_MIN_EGRESS, "underpass-"+string(attach.RoleUplink)) {
				out = append(out, UplinkView{Ifindex: i, Name: l.Attrs().Name, Egress: attachLegacy})
			}
		}
	}
	slices.SortFunc(out, func(a, b UplinkView) int { return a.Ifindex - b.Ifindex })
	return out, nil
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

func onOff(b bool) string {
	if b {
		return "on"
	}
	return "off"
}

func printStatus(env Env, st *Status) error {
	w := tabwriter.NewWriter(env.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintf(w, "datapath:\tloaded, pinned in %s\n", st.BPFFS)
	fmt.Fprintf(w, "config:\thost reachability %s, stale services %s, generation %d\n",
		onOff(st.Config.HostReachable), st.Config.StaleAction, st.Config.Generation)
	fmt.Fprintf(w, "kernel:\t%s (tcx %s, xdp %s, xdp_load_bytes %s, ringbuf %s)\n", st.Kernel.Release,
		yesNo(st.Kernel.TCX), yesNo(st.Kernel.XDP), yesNo(st.Kernel.XDPLoadBytes), yesNo(st.Kernel.RingBuf))
	var attach []string
	for _, k := range sortedKeys(st.Endpoints.Attach) {
		attach = append(attach, fmt.Sprintf("%s %d", k, st.Endpoints.Attach[k]))
	}
	fmt.Fprintf(w, "endpoints:\t%d registered (programs: %s)\n", st.Endpoints.Registered, joinOr(attach, "-"))
	progs := "shared programs in ep_progs"
	if st.EndpointPrograms != "ok" {
		progs = st.EndpointPrograms + ": pods run unchecked and uncounted, restart underpassd"
	}
	fmt.Fprintf(w, "endpoint programs:\t%s\n", progs)
	fmt.Fprintf(w, "services:\t%d live service IPs, %d service CIDRs, %d host CIDRs\n", st.LiveServices, st.ServiceCIDRs, st.HostCIDRs)
	var ups []string
	for _, u := range st.Uplinks {
		ups = append(ups, fmt.Sprintf("%s (%s)", orIndex(u.Name, u.Ifindex), u.Egress))
	}
	fmt.Fprintf(w, "uplinks:\t%s\n", joinOr(ups, "none"))
	c := st.Counters
	fmt.Fprintf(w, "hairpin:\thost->endpoint %d pkts, endpoint->host %d pkts (steered %d)\n",
		c["host_to_endpoint"].Packets, c["endpoint_to_host"].Packets, c["steered"].Packets)
	fmt.Fprintf(w, "stale services:\t%d dropped, %d rejected\n", c["stale_dropped"].Packets, c["stale_rejected"].Packets)
	fmt.Fprintf(w, "wire:\t%d pkts to endpoints, %d IP conflicts\n", c["wire_rx"].Packets, c["ip_conflicts"].Packets)
	var drops []string
	for _, k := range sortedKeys(st.Drops) {
		if st.Drops[k].Packets > 0 {
			drops = append(drops, fmt.Sprintf("%s=%d", k, st.Drops[k].Packets))
		}
	}
	fmt.Fprintf(w, "drops:\t%s\n", joinOr(drops, "none"))
	if err := w.Flush(); err != nil {
		return err
	}

	fmt.Fprintln(env.Stdout)
	if len(st.Parents) == 0 {
		fmt.Fprintln(env.Stdout, "no parents registered: underpassd registers a parent when its first endpoint appears")
		return nil
	}
	w = tabwriter.NewWriter(env.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "PARENT\tIFINDEX\tMODE\tMAC\tEGRESS\tXDP\tENDPOINTS")
	for _, p := range st.Parents {
		fmt.Fprintf(w, "%s\t%d\t%s\t%s\t%s\t%s\t%d\n", orIndex(p.Name, p.Ifindex), p.Ifindex, p.Mode, p.MAC, p.Egress, p.XDP, p.Endpoints)
	}
	return w.Flush()
}

// orIndex names an interface that may not exist in this netns.
func orIndex(name string, ifindex int) string {
	if name == "" {
		return fmt.Sprintf("if%d (not in this netns)", ifindex)
	}
	return name
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

func cv(c loader.Counter) CounterView {
	return CounterView{Packets: c.Packets, Bytes: c.Bytes}
}
