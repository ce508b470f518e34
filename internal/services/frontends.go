package services

import (
	"cmp"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"

	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
)

// defaultAffinity is sessionAffinityConfig.clientIP.timeoutSeconds when a
// ClientIP Service leaves it out (the API's default, 3 hours).
const defaultAffinity = 10800 * time.Second

// FrontendsOf is what one Service gives the pod-side translation
// (services.mode: ebpf): a frontend per cluster IP and port, with the
// backends kube-proxy would use. Those are the ready endpoints of the
// slices of the IP's family (all of them when the Service publishes
// not-ready addresses); when none is ready, the serving ones that are
// terminating (kube-proxy's fallback during a rollout). With
// internalTrafficPolicy: Local only the endpoints on node count. The port
// is the one the slice resolved for the Service port's name (named
// targetPorts included). No backend: the frontend is there, empty, and the
// Service is stale. The slices' other endpoints (not ready, terminating)
// are Draining: their open connections go on, as kube-proxy leaves their
// conntrack entries alone; gone from the slices, their flows move.
func FrontendsOf(svc *corev1.Service, slices []*discoveryv1.EndpointSlice, node string) []datapath.Frontend {
	if svc == nil {
		return nil
	}
	var affinity time.Duration
	if svc.Spec.SessionAffinity == corev1.ServiceAffinityClientIP {
		affinity = defaultAffinity
		if c := svc.Spec.SessionAffinityConfig; c != nil && c.ClientIP != nil && c.ClientIP.TimeoutSeconds != nil {
			affinity = time.Duration(*c.ClientIP.TimeoutSeconds) * time.Second
		}
	}
	local := svc.Spec.InternalTrafficPolicy != nil && *svc.Spec.InternalTrafficPolicy == corev1.ServiceInternalTrafficPolicyLocal
	var out []datapath.Frontend
	for _, vip := range ServiceIPs(svc) {
		for _, sp := range svc.Spec.Ports {
			proto, ok := protoNumber(sp.Protocol)
			if !ok {
				continue
			}
			f := datapath.Frontend{VIP: vip, Port: uint16(sp.Port), Proto: proto, Affinity: affinity,
				Service: svc.Namespace + "/" + svc.Name, PortName: cmp.Or(sp.Name, strconv.Itoa(int(sp.Port)))}
			f.Backends, f.Draining = backendsOf(slices, vip.Is4(), sp, svc.Spec.PublishNotReadyAddresses, local, node)
			out = append(out, f)
		}
	}
	return out
}

func protoNumber(p corev1.Protocol) (uint8, bool) {
	switch p {
	case "", corev1.ProtocolTCP:
		return datapath.ProtoTCP, true
	case corev1.ProtocolUDP:
		return datapath.ProtoUDP, true
	case corev1.ProtocolSCTP:
		return datapath.ProtoSCTP, true
	}
	return 0, false
}

// backendsOf picks the backends of one Service port from its slices, and
// the rest of their endpoints, draining.
func backendsOf(eps []*discoveryv1.EndpointSlice, v4 bool, sp corev1.ServicePort, publishNotReady, local bool, node string) (use, draining []netip.AddrPort) {
	family := discoveryv1.AddressTypeIPv6
	if v4 {
		family = discoveryv1.AddressTypeIPv4
	}
	var ready, fallback, all []netip.AddrPort
	for _, s := range eps {
		if s.AddressType != family {
			continue
		}
		port, ok := slicePort(s, sp)
		if !ok {
			continue
		}
		for _, ep := range s.Endpoints {
			if local && (ep.NodeName == nil || *ep.NodeName != node) {
				continue
			}
			c := ep.Conditions
			isReady := publishNotReady || c.Ready == nil || *c.Ready
			serving := c.Serving == nil || *c.Serving
			terminating := c.Terminating != nil && *c.Terminating
			for _, a := range ep.Addresses {
				addr, err := netip.ParseAddr(a)
				if err != nil || addr.Unmap().Is4() != v4 {
					continue
				}
				ap := netip.AddrPortFrom(addr.Unmap(), port)
				all = append(all, ap)
				switch {
				case isReady:
					ready = append(ready, ap)
				case serving && terminating:
					fallback = append(fallback, ap)
				}
			}
		}
	}
	if len(ready) == 0 {
		ready = fallback
	}
	sortAddrPorts := func(s []netip.AddrPort) []netip.AddrPort {
		slices.SortFunc(s, func(a, b netip.AddrPort) int { return a.Compare(b) })
		return slices.Compact(s)
	}
	use = sortAddrPorts(ready)
	for _, ap := range sortAddrPorts(all) {
		if _, found := slices.BinarySearchFunc(use, ap, func(a, b netip.AddrPort) int { return a.Compare(b) }); !found {
			draining = append(draining, ap)
		}
	}
	return use, draining
}

// slicePort is the port a slice gives the Service port: the entry with its
// name (unnamed ports have name "") and protocol.
func slicePort(s *discoveryv1.EndpointSlice, sp corev1.ServicePort) (uint16, bool) {
	for _, p := range s.Ports {
		name := ""
		if p.Name != nil {
			name = *p.Name
		}
		proto := corev1.ProtocolTCP
		if p.Protocol != nil {
			proto = *p.Protocol
		}
		spProto := cmp.Or(sp.Protocol, corev1.ProtocolTCP)
		if name == sp.Name && proto == spProto && p.Port != nil && *p.Port > 0 && *p.Port <= 65535 {
			return uint16(*p.Port), true
		}
	}
	return 0, false
}

// FrontendSink takes the frontends of Services, by namespace/name.
type FrontendSink interface {
	// ReplaceFrontends sets every Service's frontends at once (a fresh
	// view of the API).
	ReplaceFrontends(all map[string][]datapath.Frontend) error
	// UpdateFrontends sets one Service's frontends; none: it is gone.
	UpdateFrontends(key string, fs []datapath.Frontend) error
}

// Frontends owns the frontend tables for the agent (services.mode: ebpf):
// it remembers which Service put which frontend, so that a change to one
// Service rewrites that Service's entries only.
type Frontends struct {
	mu    sync.Mutex
	table *datapath.FrontendTable
	byKey map[string][]datapath.Frontend
}

// NewFrontends reads the tables as a previous run left them; the first
// ReplaceFrontends removes what no Service wants any more.
func NewFrontends(m *loader.Maps) (*Frontends, error) {
	t, err := datapath.OpenFrontendTable(m)
	if err != nil {
		return nil, err
	}
	return &Frontends{table: t, byKey: map[string][]datapath.Frontend{}}, nil
}

// ReplaceFrontends implements FrontendSink.
func (f *Frontends) ReplaceFrontends(all map[string][]datapath.Frontend) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	var want []datapath.Frontend
	for _, fs := range all {
		want = append(want, fs...)
	}
	f.byKey = make(map[string][]datapath.Frontend, len(all))
	for k, fs := range all {
		f.byKey[k] = fs
	}
	return f.table.Sync(want)
}

// UpdateFrontends implements FrontendSink.
func (f *Frontends) UpdateFrontends(key string, fs []datapath.Frontend) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	var errs []error
	// New ones first: a port kept keeps translating throughout.
	for _, fe := range fs {
		errs = append(errs, f.table.Put(fe))
	}
	for _, old := range f.byKey[key] {
		if slices.ContainsFunc(fs, func(n datapath.Frontend) bool { return sameFrontend(&n, &old) }) {
			continue
		}
		// A ClusterIP freed and handed to another Service at once: the
		// frontend is the new owner's now, not this one's to delete.
		if f.ownedElsewhere(key, &old) {
			continue
		}
		errs = append(errs, f.table.Delete(old.VIP, old.Port, old.Proto))
	}
	if len(fs) == 0 {
		delete(f.byKey, key)
	} else {
		f.byKey[key] = fs
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("service %s: %w", key, err)
	}
	return nil
}

// ownedElsewhere says whether a Service other than key has fe's frontend.
func (f *Frontends) ownedElsewhere(key string, fe *datapath.Frontend) bool {
	for k, fs := range f.byKey {
		if k != key && slices.ContainsFunc(fs, func(n datapath.Frontend) bool { return sameFrontend(&n, fe) }) {
			return true
		}
	}
	return false
}

// Clear removes every frontend (services.mode back to host).
func (f *Frontends) Clear() error { return f.ReplaceFrontends(nil) }

func sameFrontend(a, b *datapath.Frontend) bool {
	return a.VIP == b.VIP && a.Port == b.Port && a.Proto == b.Proto
}
