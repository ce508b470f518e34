//go:build linux

package kapi_test

import (
	"context"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"

	"github.com/underpass-cni/underpass/test/k8s/kapi"
)

func TestCluster(t *testing.T) {
	c := kapi.Start(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cs := c.Client
	v4 := netip.MustParsePrefix(kapi.ServiceCIDRv4)
	v6 := netip.MustParsePrefix(kapi.ServiceCIDRv6)

	if data, err := os.ReadFile(c.Kubeconfig); err != nil || !strings.Contains(string(data), c.URL) {
		t.Fatalf("kubeconfig %s: %v\n%s", c.Kubeconfig, err, data)
	}
	sv, err := cs.Discovery().ServerVersion()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("server version %s", sv.GitVersion)

	// The bootstrap controller makes the kubernetes Service with the first
	// address of the primary range.
	waitFor(t, func() error {
		svc, err := cs.CoreV1().Services("default").Get(ctx, "kubernetes", metav1.GetOptions{})
		if err == nil && svc.Spec.ClusterIP != "10.96.0.1" {
			t.Errorf("kubernetes service ClusterIP %s, want 10.96.0.1", svc.Spec.ClusterIP)
		}
		return err
	})

	ns := "kapi-test"
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}

	port := corev1.ServicePort{Name: "http", Protocol: corev1.ProtocolTCP, Port: 80, TargetPort: intstr.FromInt32(8080)}
	svc, err := cs.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web"},
		Spec: corev1.ServiceSpec{
			Type:     corev1.ServiceTypeClusterIP,
			Selector: map[string]string{"app": "web"},
			Ports:    []corev1.ServicePort{port},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ip, err := netip.ParseAddr(svc.Spec.ClusterIP)
	if err != nil || !v4.Contains(ip) {
		t.Fatalf("ClusterIP %q (%v) not in %s", svc.Spec.ClusterIP, err, v4)
	}
	t.Logf("service %s/web ClusterIP %s", ns, ip)

	// Dual stack: a RequireDualStack Service gets one address from each range.
	dual := corev1.IPFamilyPolicyRequireDualStack
	svc6, err := cs.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web-dual"},
		Spec: corev1.ServiceSpec{
			IPFamilyPolicy: &dual,
			Selector:       map[string]string{"app": "web"},
			Ports:          []corev1.ServicePort{port},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(svc6.Spec.ClusterIPs) != 2 {
		t.Fatalf("dual-stack service ClusterIPs %v", svc6.Spec.ClusterIPs)
	}
	if a, b := netip.MustParseAddr(svc6.Spec.ClusterIPs[0]), netip.MustParseAddr(svc6.Spec.ClusterIPs[1]); !v4.Contains(a) || !v6.Contains(b) {
		t.Fatalf("dual-stack service ClusterIPs %v not in %s, %s", svc6.Spec.ClusterIPs, v4, v6)
	}
	t.Logf("service %s/web-dual ClusterIPs %v", ns, svc6.Spec.ClusterIPs)

	// No controller-manager runs, so EndpointSlices are the test's to write.
	ready := true
	pname, pport, proto := "http", int32(8080), corev1.ProtocolTCP
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{
			Name:   "web-abc",
			Labels: map[string]string{discoveryv1.LabelServiceName: "web"},
		},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints: []discoveryv1.Endpoint{
			{Addresses: []string{"10.244.1.5"}, Conditions: discoveryv1.EndpointConditions{Ready: &ready}},
			{Addresses: []string{"10.244.2.7"}, Conditions: discoveryv1.EndpointConditions{Ready: &ready}},
		},
		Ports: []discoveryv1.EndpointPort{{Name: &pname, Port: &pport, Protocol: &proto}},
	}
	if _, err := cs.DiscoveryV1().EndpointSlices(ns).Create(ctx, slice, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	slices, err := cs.DiscoveryV1().EndpointSlices(ns).List(ctx, metav1.ListOptions{
		LabelSelector: discoveryv1.LabelServiceName + "=web",
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(slices.Items) != 1 || len(slices.Items[0].Endpoints) != 2 || slices.Items[0].Endpoints[1].Addresses[0] != "10.244.2.7" {
		t.Fatalf("EndpointSlices: %+v", slices.Items)
	}

	if err := cs.CoreV1().Services(ns).Delete(ctx, "web", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := cs.CoreV1().Services(ns).Get(ctx, "web", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Fatalf("service after delete: %v", err)
	}

	// RBAC is enforced for other identities (see Cluster.As).
	sa, err := kubernetes.NewForConfig(c.As("system:serviceaccount:kube-system:underpass"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := sa.CoreV1().Services(ns).List(ctx, metav1.ListOptions{}); !apierrors.IsForbidden(err) {
		t.Fatalf("unprivileged list: %v, want Forbidden", err)
	}
}

func waitFor(t *testing.T, f func() error) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal(err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
