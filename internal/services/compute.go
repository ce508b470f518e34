// Package services keeps the live_svcs map equal to the set of live service
// IPs: services.static from the config plus, when enabled, every ClusterIP of
// every Kubernetes Service (optionally only those with a ready endpoint).
//
// The computation of which IPs a Service contributes is pure (this file);
// Manager owns the map and applies changes incrementally, additions before
// removals; Kube feeds Manager from client-go informers.
package services

import (
	"net/netip"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
)

// ServiceIPs returns the cluster IPs of svc: every entry of spec.clusterIPs
// (dual stack), or spec.clusterIP on objects that predate the list. Headless
// services ("None") and ExternalName services (no IP) contribute nothing.
// Unparseable entries are skipped: the apiserver validates them, so they
// only come from a broken fake.
func ServiceIPs(svc *corev1.Service) []netip.Addr {
	if svc == nil {
		return nil
	}
	list := svc.Spec.ClusterIPs
	if len(list) == 0 && svc.Spec.ClusterIP != "" {
		list = []string{svc.Spec.ClusterIP}
	}
	var out []netip.Addr
	for _, s := range list {
		if s == "" || s == corev1.ClusterIPNone {
			continue
		}
		a, err := netip.ParseAddr(s)
		if err != nil {
			continue
		}
		out = append(out, a.Unmap())
	}
	return out
}

// HasReadyEndpoint reports whether any of a service's EndpointSlices has an
// endpoint kube-proxy would send traffic to: ready (a nil condition means
// ready, as the API documents), or merely present when the service publishes
// not-ready addresses. When none is ready, kube-proxy falls back to
// endpoints that are terminating but still serving (a rollout, a scale
// down): those count too, so such a Service is never judged stale.
func HasReadyEndpoint(slices []*discoveryv1.EndpointSlice, publishNotReady bool) bool {
	for _, s := range slices {
		for _, ep := range s.Endpoints {
			c := ep.Conditions
			if publishNotReady || c.Ready == nil || *c.Ready {
				return true
			}
			serving := c.Serving == nil || *c.Serving
			terminating := c.Terminating != nil && *c.Terminating
			if serving && terminating {
				return true
			}
		}
	}
	return false
}

// LiveIPs is what one Service contributes to the live set: its cluster IPs,
// or nothing when requireEndpoints is on and no endpoint is ready (such a
// service is stale: kube-proxy would reject its traffic anyway).
func LiveIPs(svc *corev1.Service, slices []*discoveryv1.EndpointSlice, requireEndpoints bool) []netip.Addr {
	if svc == nil {
		return nil
	}
	if requireEndpoints && !HasReadyEndpoint(slices, svc.Spec.PublishNotReadyAddresses) {
		return nil
	}
	return ServiceIPs(svc)
}
