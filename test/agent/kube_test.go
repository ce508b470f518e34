package agent_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/test/k8s/kapi"
	"github.com/underpass-cni/underpass/test/netenv"
)

// startKube starts a real etcd + kube-apiserver (test/k8s) and makes it
// reachable from the lab's node netns on the same loopback address and port
// (so the serving certificate still matches), through a TCP relay whose
// listening socket lives in the node netns. It returns a kubeconfig path for
// the agent.
func startKube(t testing.TB, l *lab) (*kapi.Cluster, string) {
	t.Helper()
	if _, err := kapi.BinDir(); err != nil {
		t.Fatalf("no kube-apiserver binaries (make deps builds them): %v", err)
	}
	c := kapi.Start(t)
	host := strings.TrimPrefix(c.URL, "https://")
	netenv.ServeTCP(t, l.Node, netip.MustParseAddrPort(host), func(in net.Conn) {
		// Dialled from a goroutine in the test's own (host) netns.
		out, err := net.Dial("tcp", host)
		if err != nil {
			return
		}
		go func() { io.Copy(out, in); out.Close() }()
		io.Copy(in, out)
	})
	return c, c.Kubeconfig
}

func kubeConfigYAML(kubeconfig string, require bool) string {
	return fmt.Sprintf(`
staleServices:
  cidrs: [%s, %s]
  requireEndpoints: %v
services:
  static: [10.96.0.1]
  kubernetes: "true"
  kubeconfig: %s
`, kapi.ServiceCIDRv4, kapi.ServiceCIDRv6, require, kubeconfig)
}

func createService(t testing.TB, cs kubernetes.Interface, ns, name string, dual bool) *corev1.Service {
	t.Helper()
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: corev1.ServiceSpec{
			Ports: []corev1.ServicePort{{Port: 80}},
		},
	}
	if dual {
		p := corev1.IPFamilyPolicyRequireDualStack
		svc.Spec.IPFamilyPolicy = &p
	}
	out, err := cs.CoreV1().Services(ns).Create(context.Background(), svc, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// endpointSlice is Service svc's one EndpointSlice, its endpoints ready or not.
func endpointSlice(ns, svc string, ready ...bool) *discoveryv1.EndpointSlice {
	return kapi.EndpointSlice(ns, svc, svc+"-1", ready...)
}

func addrsOf(t testing.TB, svc *corev1.Service) []netip.Addr {
	var out []netip.Addr
	for _, s := range svc.Spec.ClusterIPs {
		out = append(out, netip.MustParseAddr(s))
	}
	if len(out) == 0 {
		t.Fatalf("service %s has no cluster IP", svc.Name)
	}
	return out
}

func (l *lab) liveHas(ips []netip.Addr, want bool) func() bool {
	dp := l.openOnce()
	return func() bool {
		live, err := datapath.LiveServices(&dp.Maps)
		if err != nil {
			return false
		}
		for _, a := range ips {
			if live[a] != want {
				return false
			}
		}
		return true
	}
}

func TestKubernetesServices(t *testing.T) {
	l := newLab(t, netenv.Options{})
	c, kubeconfig := startKube(t, l)
	cs := c.Client
	ctx := context.Background()
	// Exists before the agent starts: part of the initial sync.
	pre := createService(t, cs, "default", "pre", false)

	l.writeConfig(kubeConfigYAML(kubeconfig, false))
	ag := l.start(agentBin)
	ag.waitReady()
	if !l.liveHas(addrsOf(t, pre), true)() {
		t.Fatal("service created before start not live after ready")
	}

	web := createService(t, cs, "default", "web", true)
	ips := addrsOf(t, web)
	if len(ips) != 2 {
		t.Fatalf("dual-stack service got %v", ips)
	}
	waitFor(t, 10*time.Second, "web live (both families)", l.liveHas(ips, true))
	start := time.Now()
	if err := cs.CoreV1().Services("default").Delete(ctx, "web", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "web stale", l.liveHas(ips, false))
	t.Logf("service delete -> VIP stale in the map: %s", time.Since(start).Round(time.Millisecond))
	if !l.liveHas([]netip.Addr{netip.MustParseAddr("10.96.0.1")}, true)() {
		t.Fatal("static service lost")
	}

	// requireEndpoints, switched on live: a service without ready
	// endpoints is stale; scaling to zero and back flips it.
	l.writeConfig(kubeConfigYAML(kubeconfig, true))
	l.waitMetric("underpass_config_reloads_total", `result="success"`, 1)
	waitFor(t, 10*time.Second, "pre stale without endpoints", l.liveHas(addrsOf(t, pre), false))
	api := createService(t, cs, "default", "api", false)
	apiIPs := addrsOf(t, api)
	time.Sleep(300 * time.Millisecond)
	if l.liveHas(apiIPs, true)() {
		t.Fatal("service without endpoints is live with requireEndpoints")
	}
	es := cs.DiscoveryV1().EndpointSlices("default")
	if _, err := es.Create(ctx, endpointSlice("default", "api", true, false), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "api live with a ready endpoint", l.liveHas(apiIPs, true))
	if _, err := es.Update(ctx, endpointSlice("default", "api"), metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "api stale when scaled to zero", l.liveHas(apiIPs, false))
	if _, err := es.Update(ctx, endpointSlice("default", "api", true), metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "api live when scaled back", l.liveHas(apiIPs, true))
	if v := l.metric("underpass_live_services", ""); v != 2 { // 10.96.0.1 (static) + api
		t.Fatalf("underpass_live_services = %v, want 2", v)
	}

	// A kubeconfig that cannot be read is rejected; the watch keeps going.
	l.writeConfig(kubeConfigYAML(filepath.Join(t.TempDir(), "missing"), true))
	l.waitMetric("underpass_config_reloads_total", `result="error"`, 1)
	// So is one that reads but whose CA is no PEM (client-go fails only when
	// it builds the client): until December 2026 that reload stopped the
	// informers and nothing restarted them, so the live set froze.
	badCA := filepath.Join(t.TempDir(), "bad-ca-kubeconfig")
	must(t, os.WriteFile(badCA, []byte(`apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:1", certificate-authority-data: bm90IGEgY2VydGlmaWNhdGU=}}]
users: [{name: u, user: {token: x}}]
contexts: [{name: c, context: {cluster: c, user: u}}]
current-context: c
`), 0o600))
	l.writeConfig(kubeConfigYAML(badCA, true))
	l.waitMetric("underpass_config_reloads_total", `result="error"`, 2)
	if err := es.Delete(ctx, "api-1", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "api stale after its slice is deleted", l.liveHas(apiIPs, false))
}
