package ctl

import (
	"context"
	"fmt"
	"net/netip"
	"slices"

	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
)

// Services is the output of `underpassctl services`: what the stale guard
// and the steering act on.
type Services struct {
	StaleAction string `json:"staleAction"`
	// Mode is host (kube-proxy translates, after steering) or ebpf (the
	// pods' programs translate the Frontends).
	Mode         string         `json:"mode"`
	Frontends    []Frontend     `json:"frontends"`
	Live         []netip.Addr   `json:"liveServices"`
	ServiceCIDRs []netip.Prefix `json:"serviceCIDRs"`
	HostCIDRs    []HostCIDR     `json:"hostCIDRs"`
}

// Frontend is a Service port the pods' programs translate (services.mode:
// ebpf) and its backends; none: stale.
type Frontend struct {
	Frontend string           `json:"frontend"`          // VIP:port/protocol
	Service  string           `json:"service,omitempty"` // namespace/name
	Port     string           `json:"port,omitempty"`    // the port's name, or its number
	Backends []netip.AddrPort `json:"backends"`
	Affinity string           `json:"sessionAffinity,omitempty"`
	// Flows that picked a backend, and frames with no backend to give,
	// since the frontend was made (svc_counters).
	Flows    uint64 `json:"flows"`
	Failures uint64 `json:"failures"`
}

// HostCIDR is a destination steered to the host stack.
type HostCIDR struct {
	CIDR netip.Prefix `json:"cidr"`
	// Local: a node address (ARP/ND for it reaches the host).
	Local bool `json:"local"`
	// Steer: endpoint traffic to it goes to the host stack (hostCIDRs).
	Steer bool `json:"steer"`
}

func runServices(_ context.Context, env Env, o *options, dp *loader.Objects) error {
	s, err := services(dp)
	if err != nil {
		return err
	}
	if o.output == "json" {
		return writeJSON(env.Stdout, s)
	}
	w := env.Stdout
	fmt.Fprintf(w, "stale services: %s\n", s.StaleAction)
	fmt.Fprintf(w, "services mode: %s\n", s.Mode)
	if s.Mode == "ebpf" || len(s.Frontends) > 0 {
		fmt.Fprintf(w, "frontends (%d):\n", len(s.Frontends))
		for _, f := range s.Frontends {
			var bs []string
			for _, b := range f.Backends {
				bs = append(bs, b.String())
			}
			aff := ""
			if f.Affinity != "" {
				aff = "  affinity " + f.Affinity
			}
			name := ""
			if f.Service != "" {
				name = "  (" + f.Service + " " + f.Port + ")"
			}
			fmt.Fprintf(w, "  %-28s -> %s%s%s  flows %d, failures %d\n", f.Frontend, joinOr(bs, "none (stale)"), aff, name, f.Flows, f.Failures)
		}
	}
	fmt.Fprintf(w, "service CIDRs (%d):\n", len(s.ServiceCIDRs))
	for _, p := range s.ServiceCIDRs {
		fmt.Fprintf(w, "  %s\n", p)
	}
	fmt.Fprintf(w, "live service IPs (%d):\n", len(s.Live))
	for _, a := range s.Live {
		fmt.Fprintf(w, "  %s\n", a)
	}
	fmt.Fprintf(w, "host CIDRs (%d):\n", len(s.HostCIDRs))
	for _, h := range s.HostCIDRs {
		var what []string
		if h.Local {
			what = append(what, "node address")
		}
		if h.Steer {
			what = append(what, "steered")
		}
		fmt.Fprintf(w, "  %-20s %s\n", h.CIDR, joinOr(what, "-"))
	}
	return nil
}

func services(dp *loader.Objects) (*Services, error) {
	m := &dp.Maps
	cfg, _, err := datapath.GetConfig(m)
	if err != nil {
		return nil, err
	}
	s := &Services{StaleAction: "drop", Mode: "host", Frontends: []Frontend{}, Live: []netip.Addr{}, ServiceCIDRs: []netip.Prefix{}, HostCIDRs: []HostCIDR{}}
	if cfg.StaleReject {
		s.StaleAction = "reject"
	}
	if cfg.ServicesEBPF {
		s.Mode = "ebpf"
	}
	fronts, err := datapath.Frontends(m)
	if err != nil {
		return nil, err
	}
	counters, err := datapath.ServiceCounters(m)
	if err != nil {
		return nil, err
	}
	type fkey struct {
		vip   netip.Addr
		port  uint16
		proto uint8
	}
	byKey := map[fkey]datapath.ServiceCounter{}
	for _, c := range counters {
		byKey[fkey{c.VIP, c.Port, c.Proto}] = c
	}
	for _, f := range fronts {
		c := byKey[fkey{f.VIP, f.Port, f.Proto}]
		v := Frontend{Frontend: fmt.Sprintf("%s/%s", netip.AddrPortFrom(f.VIP, f.Port), protoName(f.Proto)), Backends: f.Backends,
			Service: f.Service, Port: f.PortName, Flows: c.Flows, Failures: c.Failures}
		if v.Backends == nil {
			v.Backends = []netip.AddrPort{}
		}
		if f.Affinity > 0 {
			v.Affinity = f.Affinity.String()
		}
		s.Frontends = append(s.Frontends, v)
	}
	live, err := datapath.LiveServices(m)
	if err != nil {
		return nil, err
	}
	for a := range live {
		s.Live = append(s.Live, a)
	}
	slices.SortFunc(s.Live, netip.Addr.Compare)
	svc, err := datapath.LPMEntries(m.SvcCidrs)
	if err != nil {
		return nil, fmt.Errorf("list service CIDRs: %w", err)
	}
	for p := range svc {
		s.ServiceCIDRs = append(s.ServiceCIDRs, p)
	}
	slices.SortFunc(s.ServiceCIDRs, comparePrefix)
	hosts, err := datapath.LPMEntries(m.HostCidrs)
	if err != nil {
		return nil, fmt.Errorf("list host CIDRs: %w", err)
	}
	for p, flags := range hosts {
		f := loader.HostFlags(flags)
		s.HostCIDRs = append(s.HostCIDRs, HostCIDR{CIDR: p, Local: f&loader.HostLocal != 0, Steer: f&loader.HostSteer != 0})
	}
	slices.SortFunc(s.HostCIDRs, func(a, b HostCIDR) int { return comparePrefix(a.CIDR, b.CIDR) })
	return s, nil
}

func protoName(p uint8) string {
	switch p {
	case datapath.ProtoTCP:
		return "tcp"
	case datapath.ProtoUDP:
		return "udp"
	case datapath.ProtoSCTP:
		return "sctp"
	}
	return fmt.Sprint(p)
}

func comparePrefix(a, b netip.Prefix) int {
	if c := a.Addr().Compare(b.Addr()); c != 0 {
		return c
	}
	return a.Bits() - b.Bits()
}
