package services_test

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"

	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/services"
	"github.com/underpass-cni/underpass/internal/testutil"
)

type ep struct {
	addr                        string
	ready, serving, terminating *bool
	node                        string
}

func slice(family discoveryv1.AddressType, ports map[string]int32, eps ...ep) *discoveryv1.EndpointSlice {
	s := &discoveryv1.EndpointSlice{AddressType: family}
	for name, p := range ports {
		proto := corev1.ProtocolTCP
		if name == "dns" {
			proto = corev1.ProtocolUDP
		}
		s.Ports = append(s.Ports, discoveryv1.EndpointPort{Name: ptr.To(name), Port: ptr.To(p), Protocol: ptr.To(proto)})
	}
	for _, e := range eps {
		d := discoveryv1.Endpoint{Addresses: []string{e.addr},
			Conditions: discoveryv1.EndpointConditions{Ready: e.ready, Serving: e.serving, Terminating: e.terminating}}
		if e.node != "" {
			d.NodeName = ptr.To(e.node)
		}
		s.Endpoints = append(s.Endpoints, d)
	}
	return s
}

func service(ips []string, ports ...corev1.ServicePort) *corev1.Service {
	return &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "app"},
		Spec: corev1.ServiceSpec{ClusterIP: ips[0], ClusterIPs: ips, Ports: ports}}
}

func backends(s ...string) []netip.AddrPort { return testutil.Parse(netip.MustParseAddrPort, s...) }

func TestFrontendsOf(t *testing.T) {
	web := corev1.ServicePort{Name: "web", Port: 80}
	dns := corev1.ServicePort{Name: "dns", Port: 53, Protocol: corev1.ProtocolUDP}
	yes, no := ptr.To(true), ptr.To(false)
	v4 := discoveryv1.AddressTypeIPv4
	for _, tc := range []struct {
		name   string
		svc    *corev1.Service
		slices []*discoveryv1.EndpointSlice
		want   []datapath.Frontend
	}{{
		name: "ready endpoints, named ports resolved per slice",
		svc:  service([]string{"10.96.0.10"}, web, dns),
		slices: []*discoveryv1.EndpointSlice{
			slice(v4, map[string]int32{"web": 8080, "dns": 5353}, ep{addr: "10.1.0.1"}, ep{addr: "10.1.0.2", ready: yes}, ep{addr: "10.1.0.3", ready: no}),
			slice(v4, map[string]int32{"web": 9090}, ep{addr: "10.1.0.4"}),
		},
		want: []datapath.Frontend{
			{VIP: netip.MustParseAddr("10.96.0.10"), Port: 80, Proto: datapath.ProtoTCP, Service: "default/app", PortName: "web", Backends: backends("10.1.0.1:8080", "10.1.0.2:8080", "10.1.0.4:9090"),
				Draining: backends("10.1.0.3:8080")},
			{VIP: netip.MustParseAddr("10.96.0.10"), Port: 53, Proto: datapath.ProtoUDP, Service: "default/app", PortName: "dns", Backends: backends("10.1.0.1:5353", "10.1.0.2:5353"),
				Draining: backends("10.1.0.3:5353")},
		},
	}, {
		name: "none ready: the serving terminating ones, as kube-proxy",
		svc:  service([]string{"10.96.0.10"}, web),
		slices: []*discoveryv1.EndpointSlice{slice(v4, map[string]int32{"web": 8080},
			ep{addr: "10.1.0.1", ready: no, serving: yes, terminating: yes}, ep{addr: "10.1.0.2", ready: no, serving: no, terminating: yes},
			ep{addr: "10.1.0.3", ready: no})},
		// The others keep their open connections: draining.
		want: []datapath.Frontend{{VIP: netip.MustParseAddr("10.96.0.10"), Port: 80, Proto: datapath.ProtoTCP, Service: "default/app", PortName: "web", Backends: backends("10.1.0.1:8080"),
			Draining: backends("10.1.0.2:8080", "10.1.0.3:8080")}},
	}, {
		name: "no endpoint: an empty frontend (stale)",
		svc:  service([]string{"10.96.0.10"}, web),
		want: []datapath.Frontend{{VIP: netip.MustParseAddr("10.96.0.10"), Port: 80, Proto: datapath.ProtoTCP, Service: "default/app", PortName: "web"}},
	}, {
		name: "dual stack: each VIP its family's backends",
		svc:  service([]string{"10.96.0.10", "fd00:96::10"}, web),
		slices: []*discoveryv1.EndpointSlice{
			slice(v4, map[string]int32{"web": 8080}, ep{addr: "10.1.0.1"}),
			slice(discoveryv1.AddressTypeIPv6, map[string]int32{"web": 8080}, ep{addr: "fd00:1::1"}),
		},
		want: []datapath.Frontend{
			{VIP: netip.MustParseAddr("10.96.0.10"), Port: 80, Proto: datapath.ProtoTCP, Service: "default/app", PortName: "web", Backends: backends("10.1.0.1:8080")},
			{VIP: netip.MustParseAddr("fd00:96::10"), Port: 80, Proto: datapath.ProtoTCP, Service: "default/app", PortName: "web", Backends: backends("[fd00:1::1]:8080")},
		},
	}, {
		name: "headless: nothing",
		svc:  service([]string{"None"}, web),
	}} {
		t.Run(tc.name, func(t *testing.T) {
			got := services.FrontendsOf(tc.svc, tc.slices, "node-a")
			if fmt.Sprint(got) != fmt.Sprint(tc.want) {
				t.Fatalf("got  %v\nwant %v", got, tc.want)
			}
		})
	}
}

func TestFrontendsOfPolicies(t *testing.T) {
	web := corev1.ServicePort{Name: "web", Port: 80}
	v4 := discoveryv1.AddressTypeIPv4
	sl := []*discoveryv1.EndpointSlice{slice(v4, map[string]int32{"web": 8080},
		ep{addr: "10.1.0.1", node: "node-a"}, ep{addr: "10.1.0.2", node: "node-b"}, ep{addr: "10.1.0.3", ready: ptr.To(false)})}

	svc := service([]string{"10.96.0.10"}, web)
	svc.Spec.InternalTrafficPolicy = ptr.To(corev1.ServiceInternalTrafficPolicyLocal)
	if got := services.FrontendsOf(svc, sl, "node-a"); len(got) != 1 || fmt.Sprint(got[0].Backends) != fmt.Sprint(backends("10.1.0.1:8080")) {
		t.Errorf("internalTrafficPolicy Local: %v", got)
	}

	svc = service([]string{"10.96.0.10"}, web)
	svc.Spec.PublishNotReadyAddresses = true
	if got := services.FrontendsOf(svc, sl, "node-a"); len(got[0].Backends) != 3 {
		t.Errorf("publishNotReadyAddresses: %v", got)
	}

	svc = service([]string{"10.96.0.10"}, web)
	svc.Spec.SessionAffinity = corev1.ServiceAffinityClientIP
	if got := services.FrontendsOf(svc, sl, ""); got[0].Affinity != 3*time.Hour {
		t.Errorf("ClientIP affinity without a timeout: %v, want the API default 3h", got[0].Affinity)
	}
	svc.Spec.SessionAffinityConfig = &corev1.SessionAffinityConfig{ClientIP: &corev1.ClientIPConfig{TimeoutSeconds: ptr.To[int32](60)}}
	if got := services.FrontendsOf(svc, sl, ""); got[0].Affinity != time.Minute {
		t.Errorf("ClientIP affinity 60s: %v", got[0].Affinity)
	}

	svc = service([]string{"10.96.0.10"}, corev1.ServicePort{Name: "x", Port: 80, Protocol: "ICMP"})
	if got := services.FrontendsOf(svc, sl, ""); len(got) != 0 {
		t.Errorf("an unsupported protocol gave %v", got)
	}
}
