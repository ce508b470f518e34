package services

import (
	"context"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/underpass-cni/underpass/internal/config"
	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/testutil"
	"github.com/underpass-cni/underpass/test/k8s/kapi"
)

// memStore is a Store that records the order of writes.
type memStore struct {
	mu  sync.Mutex
	set map[netip.Addr]bool
	log []string
}

func newMemStore(initial ...string) *memStore {
	s := &memStore{set: map[netip.Addr]bool{}}
	for _, a := range initial {
		s.set[netip.MustParseAddr(a)] = true
	}
	return s
}

func (s *memStore) Add(a netip.Addr) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.set[a] = true
	s.log = append(s.log, "+"+a.String())
	return nil
}

func (s *memStore) Delete(a netip.Addr) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.set, a)
	s.log = append(s.log, "-"+a.String())
	return nil
}

func (s *memStore) List() (map[netip.Addr]bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return maps.Clone(s.set), nil
}

func (s *memStore) strings() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	for a := range s.set {
		out = append(out, a.String())
	}
	slices.Sort(out)
	return out
}

func (s *memStore) writes() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.log)
}

func addrs(ss ...string) []netip.Addr { return testutil.Parse(netip.MustParseAddr, ss...) }

func svc(ns, name string, ips ...string) *corev1.Service {
	s := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}}
	if len(ips) > 0 {
		s.Spec.ClusterIP = ips[0]
		s.Spec.ClusterIPs = ips
	}
	return s
}

// slice is an EndpointSlice of Service svcName in ns, its endpoints ready or not.
var slice = kapi.EndpointSlice

func TestLiveIPs(t *testing.T) {
	yes, no := true, false
	_ = yes
	for _, tc := range []struct {
		name    string
		svc     *corev1.Service
		slices  []*discoveryv1.EndpointSlice
		require bool
		want    []string
	}{
		{name: "dual stack", svc: svc("a", "s", "10.96.0.10", "fd00:96::10"), want: []string{"10.96.0.10", "fd00:96::10"}},
		{name: "legacy clusterIP only", svc: &corev1.Service{Spec: corev1.ServiceSpec{ClusterIP: "10.96.0.11"}}, want: []string{"10.96.0.11"}},
		{name: "headless", svc: svc("a", "s", "None")},
		{name: "external name", svc: &corev1.Service{Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeExternalName, ExternalName: "example.com"}}},
		{name: "mapped v4 unmapped", svc: svc("a", "s", "::ffff:10.96.0.12"), want: []string{"10.96.0.12"}},
		{name: "require, none", svc: svc("a", "s", "10.96.0.1"), require: true},
		{name: "require, not ready", svc: svc("a", "s", "10.96.0.1"), slices: []*discoveryv1.EndpointSlice{slice("a", "s", "x", false)}, require: true},
		{name: "require, one ready", svc: svc("a", "s", "10.96.0.1"), slices: []*discoveryv1.EndpointSlice{slice("a", "s", "x", false), slice("a", "s", "y", false, true)}, require: true, want: []string{"10.96.0.1"}},
		{name: "require, nil condition is ready", svc: svc("a", "s", "10.96.0.1"), slices: []*discoveryv1.EndpointSlice{{Endpoints: []discoveryv1.Endpoint{{Addresses: []string{"10.244.0.1"}}}}}, require: true, want: []string{"10.96.0.1"}},
		{name: "require, publishNotReady", svc: func() *corev1.Service {
			s := svc("a", "s", "10.96.0.1")
			s.Spec.PublishNotReadyAddresses = true
			return s
		}(), slices: []*discoveryv1.EndpointSlice{{Endpoints: []discoveryv1.Endpoint{{Conditions: discoveryv1.EndpointConditions{Ready: &no}}}}}, require: true, want: []string{"10.96.0.1"}},
		{name: "not required, no endpoints", svc: svc("a", "s", "10.96.0.1"), want: []string{"10.96.0.1"}},
		// A rollout: every endpoint terminating, still serving. kube-proxy
		// falls back to them, so the Service is live.
		{name: "require, all terminating but serving", svc: svc("a", "s", "10.96.0.1"), slices: []*discoveryv1.EndpointSlice{{Endpoints: []discoveryv1.Endpoint{
			{Addresses: []string{"10.244.0.1"}, Conditions: discoveryv1.EndpointConditions{Ready: &no, Serving: &yes, Terminating: &yes}}}}}, require: true, want: []string{"10.96.0.1"}},
		{name: "require, terminating and no longer serving", svc: svc("a", "s", "10.96.0.1"), slices: []*discoveryv1.EndpointSlice{{Endpoints: []discoveryv1.Endpoint{
			{Addresses: []string{"10.244.0.1"}, Conditions: discoveryv1.EndpointConditions{Ready: &no, Serving: &no, Terminating: &yes}}}}}, require: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var got []string
			for _, a := range LiveIPs(tc.svc, tc.slices, tc.require) {
				got = append(got, a.String())
			}
			if !slices.Equal(got, tc.want) {
				t.Fatalf("got %v, want %v", got, tc.want)
			}
		})
	}
}

func TestManagerOrderAndRefcount(t *testing.T) {
	st := newMemStore("10.96.0.99") // adopted from a previous run
	m, err := NewManager(st, slog.Default())
	if err != nil {
		t.Fatal(err)
	}
	must(t, m.SetKubernetes(true))
	must(t, m.SetStatic(addrs("10.96.0.1")))
	// Not synced yet: nothing adopted is removed.
	if got := st.strings(); !slices.Equal(got, []string{"10.96.0.1", "10.96.0.99"}) {
		t.Fatalf("before sync: %v", got)
	}
	if m.Synced() {
		t.Fatal("synced before the Kubernetes view arrived")
	}
	must(t, m.KubeReplace(map[string][]netip.Addr{"a/x": addrs("10.96.0.2"), "a/y": addrs("10.96.0.1")}))
	if got := st.strings(); !slices.Equal(got, []string{"10.96.0.1", "10.96.0.2"}) {
		t.Fatalf("after sync: %v", got)
	}
	// 10.96.0.1 is both static and a service: deleting the service keeps it.
	must(t, m.KubeUpdate("a/y", nil))
	if got := st.strings(); !slices.Equal(got, []string{"10.96.0.1", "10.96.0.2"}) {
		t.Fatalf("shared IP dropped: %v", got)
	}
	// A service changing IP: the new one is added before the old one goes.
	before := len(st.writes())
	must(t, m.KubeUpdate("a/x", addrs("10.96.0.3")))
	if w := st.writes()[before:]; !slices.Equal(w, []string{"+10.96.0.3", "-10.96.0.2"}) {
		t.Fatalf("writes %v, want add before delete", w)
	}
	must(t, m.SetStatic(nil))
	if got := st.strings(); !slices.Equal(got, []string{"10.96.0.3"}) {
		t.Fatalf("after static cleared: %v", got)
	}
	// Restarting the source keeps everything until the next replace.
	must(t, m.SetKubernetes(true))
	must(t, m.KubeUpdate("a/x", nil))
	if got := st.strings(); !slices.Equal(got, []string{"10.96.0.3"}) {
		t.Fatalf("removed before resync: %v", got)
	}
	must(t, m.KubeReplace(nil))
	if got := st.strings(); len(got) != 0 {
		t.Fatalf("after empty replace: %v", got)
	}
	must(t, m.SetKubernetes(false))
	if !m.Synced() {
		t.Fatal("static-only manager not synced")
	}
}

func TestKubeWanted(t *testing.T) {
	t.Setenv("KUBERNETES_SERVICE_HOST", "")
	if KubeWanted(config.KubernetesAuto, "") {
		t.Fatal("auto without credentials")
	}
	if !KubeWanted(config.KubernetesAuto, "/k") || !KubeWanted(config.KubernetesOn, "") || KubeWanted(config.KubernetesOff, "/k") {
		t.Fatal("wrong resolution")
	}
	t.Setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
	if !KubeWanted(config.KubernetesAuto, "") {
		t.Fatal("auto in cluster")
	}
}

var must = testutil.Must

// TestKubeDesiredSet drives the informers with the fake clientset.
func TestKubeDesiredSet(t *testing.T) {
	for _, require := range []bool{false, true} {
		t.Run(fmt.Sprintf("requireEndpoints=%v", require), func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			client := fake.NewClientset(
				svc("default", "kubernetes", "10.96.0.1"),
				svc("kube-system", "dns", "10.96.0.10", "fd00:96::a"),
				svc("default", "headless", "None"),
				slice("kube-system", "dns", "dns-1", true),
			)
			st := newMemStore("10.96.0.77")
			m, err := NewManager(st, slog.Default())
			must(t, err)
			must(t, m.SetStatic(addrs("10.96.0.200")))
			must(t, m.SetKubernetes(true))
			k := NewKube(client, m, KubeOptions{RequireEndpoints: require})
			errc := make(chan error, 1)
			go func() { errc <- k.Run(ctx) }()
			waitFor(t, "sync", m.Synced)

			want := []string{"10.96.0.1", "10.96.0.10", "10.96.0.200", "fd00:96::a"}
			if require {
				want = []string{"10.96.0.10", "10.96.0.200", "fd00:96::a"} // kubernetes has no slice
			}
			if got := st.strings(); !slices.Equal(got, want) {
				t.Fatalf("initial: got %v, want %v", got, want)
			}

			cs := client.CoreV1().Services("default")
			_, err = cs.Create(ctx, svc("default", "web", "10.96.1.5"), metav1.CreateOptions{})
			must(t, err)
			if !require {
				waitFor(t, "web live", func() bool { return slices.Contains(st.strings(), "10.96.1.5") })
			} else {
				time.Sleep(100 * time.Millisecond)
				if slices.Contains(st.strings(), "10.96.1.5") {
					t.Fatal("web live without endpoints")
				}
				ds := client.DiscoveryV1().EndpointSlices("default")
				_, err = ds.Create(ctx, slice("default", "web", "web-1", false), metav1.CreateOptions{})
				must(t, err)
				time.Sleep(100 * time.Millisecond)
				if slices.Contains(st.strings(), "10.96.1.5") {
					t.Fatal("web live with only unready endpoints")
				}
				_, err = ds.Update(ctx, slice("default", "web", "web-1", true), metav1.UpdateOptions{})
				must(t, err)
				waitFor(t, "web live", func() bool { return slices.Contains(st.strings(), "10.96.1.5") })
				_, err = ds.Update(ctx, slice("default", "web", "web-1"), metav1.UpdateOptions{})
				must(t, err)
				waitFor(t, "web stale after scale to zero", func() bool { return !slices.Contains(st.strings(), "10.96.1.5") })
				_, err = ds.Update(ctx, slice("default", "web", "web-1", true), metav1.UpdateOptions{})
				must(t, err)
				waitFor(t, "web live again", func() bool { return slices.Contains(st.strings(), "10.96.1.5") })
				must(t, ds.Delete(ctx, "web-1", metav1.DeleteOptions{}))
				waitFor(t, "web stale after slice delete", func() bool { return !slices.Contains(st.strings(), "10.96.1.5") })
				_, err = ds.Create(ctx, slice("default", "web", "web-2", true), metav1.CreateOptions{})
				must(t, err)
				waitFor(t, "web live with new slice", func() bool { return slices.Contains(st.strings(), "10.96.1.5") })
			}
			must(t, cs.Delete(ctx, "web", metav1.DeleteOptions{}))
			waitFor(t, "web stale", func() bool { return !slices.Contains(st.strings(), "10.96.1.5") })
			if slices.Contains(st.strings(), "10.96.0.77") {
				t.Fatal("adopted IP of a service that no longer exists is still live")
			}
			cancel()
			if err := <-errc; err != nil {
				t.Fatal(err)
			}
		})
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	testutil.WaitFor(t, 10*time.Second, what, cond)
}

// recFrontends records what the Kube source hands a FrontendSink.
type recFrontends struct {
	mu  sync.Mutex
	now map[string][]datapath.Frontend
}

func (r *recFrontends) ReplaceFrontends(all map[string][]datapath.Frontend) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.now = maps.Clone(all)
	return nil
}

func (r *recFrontends) UpdateFrontends(key string, fs []datapath.Frontend) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(fs) == 0 {
		delete(r.now, key)
	} else {
		r.now[key] = fs
	}
	return nil
}

func (r *recFrontends) get(key string) string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return fmt.Sprint(r.now[key])
}

// The Kube source in services.mode ebpf: each Service's frontends follow
// its EndpointSlices, and go with it.
func TestKubeFrontends(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	web := svc("default", "web", "10.96.1.5")
	web.Spec.Ports = []corev1.ServicePort{{Name: "http", Port: 80}}
	port := func(s *discoveryv1.EndpointSlice) *discoveryv1.EndpointSlice {
		name, p := "http", int32(8080)
		s.Ports = []discoveryv1.EndpointPort{{Name: &name, Port: &p}}
		return s
	}
	client := fake.NewClientset(web, port(slice("default", "web", "web-1", true, false)))
	m, err := NewManager(newMemStore(), slog.Default())
	must(t, err)
	must(t, m.SetKubernetes(true))
	rec := &recFrontends{}
	k := NewKube(client, m, KubeOptions{Frontends: rec, Node: "node-a"})
	errc := make(chan error, 1)
	go func() { errc <- k.Run(ctx) }()
	waitFor(t, "sync", m.Synced)
	if got, want := rec.get("default/web"), "[{10.96.1.5 80 6 [10.244.0.1:8080] [10.244.0.2:8080] 0s default/web http}]"; got != want {
		t.Fatalf("initial frontends %s, want %s", got, want)
	}
	ds := client.DiscoveryV1().EndpointSlices("default")
	_, err = ds.Update(ctx, port(slice("default", "web", "web-1", true, true)), metav1.UpdateOptions{})
	must(t, err)
	waitFor(t, "second backend", func() bool {
		return rec.get("default/web") == "[{10.96.1.5 80 6 [10.244.0.1:8080 10.244.0.2:8080] [] 0s default/web http}]"
	})
	must(t, client.CoreV1().Services("default").Delete(ctx, "web", metav1.DeleteOptions{}))
	waitFor(t, "frontends gone with the Service", func() bool { return rec.get("default/web") == "[]" })
	cancel()
	must(t, <-errc)
}
