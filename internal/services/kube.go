package services

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/util/workqueue"

	"github.com/underpass-cni/underpass/internal/config"
	"github.com/underpass-cni/underpass/internal/datapath"
)

// Sink receives the Kubernetes view; Manager is one.
type Sink interface {
	KubeReplace(all map[string][]netip.Addr) error
	KubeUpdate(key string, ips []netip.Addr) error
}

// KubeWanted resolves services.kubernetes: true and false are what they say;
// auto uses the API when there are credentials, in-cluster (the
// KUBERNETES_SERVICE_HOST a Pod gets) or a kubeconfig given in the config.
func KubeWanted(mode config.KubernetesMode, kubeconfig string) bool {
	switch mode {
	case config.KubernetesOn:
		return true
	case config.KubernetesOff:
		return false
	}
	return kubeconfig != "" || os.Getenv("KUBERNETES_SERVICE_HOST") != ""
}

// RestConfig builds client credentials from a kubeconfig file, or in-cluster
// ones when path is empty.
func RestConfig(path string) (*rest.Config, error) {
	if path == "" {
		c, err := rest.InClusterConfig()
		if err != nil {
			return nil, fmt.Errorf("services.kubernetes: no in-cluster credentials (%w); set services.kubeconfig or services.kubernetes: false", err)
		}
		return c, nil
	}
	c, err := clientcmd.BuildConfigFromFlags("", path)
	if err != nil {
		return nil, fmt.Errorf("services.kubeconfig %s: %w", path, err)
	}
	return c, nil
}

// KubeOptions configure a Kubernetes source.
type KubeOptions struct {
	// RequireEndpoints: a Service with no ready endpoint contributes nothing.
	RequireEndpoints bool
	// Frontends, when set (services.mode: ebpf), gets every Service's
	// frontends from its EndpointSlices; Node is this node's name, for
	// internalTrafficPolicy: Local.
	Frontends FrontendSink
	Node      string
	Log       *slog.Logger
}

// Kube turns Service (and EndpointSlice) events into Sink updates.
type Kube struct {
	client kubernetes.Interface
	sink   Sink
	opts   KubeOptions
	queue  workqueue.TypedInterface[string]

	svcs   cache.SharedIndexInformer
	slices cache.SharedIndexInformer // nil unless RequireEndpoints or Frontends
}

// byService indexes EndpointSlices by the namespace/name of their Service.
const byService = "service"

// NewKube prepares the informers; Run starts them.
func NewKube(client kubernetes.Interface, sink Sink, opts KubeOptions) *Kube {
	if opts.Log == nil {
		opts.Log = slog.Default()
	}
	k := &Kube{client: client, sink: sink, opts: opts, queue: workqueue.NewTyped[string]()}
	// No periodic resync: the informers' watch is complete, and Manager's
	// Reconcile repairs the map itself.
	factory := informers.NewSharedInformerFactory(client, 0)
	k.svcs = factory.Core().V1().Services().Informer()
	_ = k.svcs.SetTransform(func(o any) (any, error) { return slimService(o, opts.Frontends != nil) })
	k.svcs.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(o any) { k.enqueue(o) },
		UpdateFunc: func(_, o any) { k.enqueue(o) },
		DeleteFunc: func(o any) { k.enqueue(o) },
	})
	if opts.RequireEndpoints || opts.Frontends != nil {
		k.slices = factory.Discovery().V1().EndpointSlices().Informer()
		_ = k.slices.SetTransform(func(o any) (any, error) { return slimSlice(o, opts.Frontends != nil) })
		_ = k.slices.AddIndexers(cache.Indexers{byService: sliceService})
		k.slices.AddEventHandler(cache.ResourceEventHandlerFuncs{
			AddFunc:    func(o any) { k.enqueueSlice(o) },
			UpdateFunc: func(_, o any) { k.enqueueSlice(o) },
			DeleteFunc: func(o any) { k.enqueueSlice(o) },
		})
	}
	return k
}

// Run lists, hands the complete view to the sink once the caches have
// synced, then applies each change until ctx is done. A failing sink write
// is retried on the next event for that service and by Manager.Reconcile.
func (k *Kube) Run(ctx context.Context) error {
	defer k.queue.ShutDown()
	go k.svcs.RunWithContext(ctx)
	synced := []cache.InformerSynced{k.svcs.HasSynced}
	if k.slices != nil {
		go k.slices.RunWithContext(ctx)
		synced = append(synced, k.slices.HasSynced)
	}

	start := time.Now()
	done := make(chan struct{})
	go func() {
		// Say why readiness waits, once, if the API is slow or unreachable.
		select {
		case <-done:
		case <-ctx.Done():
		case <-time.After(10 * time.Second):
			k.opts.Log.Warn("still waiting for the Kubernetes API to list services; live services are not synced yet")
		}
	}()
	ok := cache.WaitForCacheSync(ctx.Done(), synced...)
	close(done)
	if !ok {
		return ctx.Err()
	}

	n := k.syncAll()
	k.opts.Log.Info("live services synced from Kubernetes", "services", n, "took", time.Since(start).Round(time.Millisecond), "requireEndpoints", k.opts.RequireEndpoints)

	go func() {
		<-ctx.Done()
		k.queue.ShutDown()
	}()
	for {
		key, quit := k.queue.Get()
		if quit {
			return nil
		}
		k.process(key)
		k.queue.Done(key)
	}
}

// syncAll hands the sinks the complete view of the synced caches; it
// returns how many Services are live.
func (k *Kube) syncAll() int {
	all := map[string][]netip.Addr{}
	fronts := map[string][]datapath.Frontend{}
	for _, o := range k.svcs.GetStore().List() {
		svc := o.(*corev1.Service)
		key := svc.Namespace + "/" + svc.Name
		if ips := k.liveIPs(key, svc); len(ips) > 0 {
			all[key] = ips
		}
		if fs := k.frontends(key, svc); len(fs) > 0 {
			fronts[key] = fs
		}
	}
	// Frontends first: a VIP live before its frontend exists would be
	// steered to the host meanwhile, which works; the other way round a
	// pod could see a VIP translated but not yet live, which works too.
	if k.opts.Frontends != nil {
		if err := k.opts.Frontends.ReplaceFrontends(fronts); err != nil {
			k.opts.Log.Error("initial sync of service frontends", "error", err)
		}
	}
	if err := k.sink.KubeReplace(all); err != nil {
		k.opts.Log.Error("initial sync of live services", "error", err)
	}
	return len(all)
}

func (k *Kube) process(key string) {
	var svc *corev1.Service
	if o, exists, err := k.svcs.GetStore().GetByKey(key); err == nil && exists {
		svc = o.(*corev1.Service)
	}
	if k.opts.Frontends != nil {
		if err := k.opts.Frontends.UpdateFrontends(key, k.frontends(key, svc)); err != nil {
			k.opts.Log.Error("update service frontends", "service", key, "error", err)
		}
	}
	if err := k.sink.KubeUpdate(key, k.liveIPs(key, svc)); err != nil {
		k.opts.Log.Error("update live service", "service", key, "error", err)
	}
}

// frontends are svc's frontends (nil unless Frontends is set).
func (k *Kube) frontends(key string, svc *corev1.Service) []datapath.Frontend {
	if k.opts.Frontends == nil || svc == nil {
		return nil
	}
	return FrontendsOf(svc, k.slicesOf(key), k.opts.Node)
}

func (k *Kube) slicesOf(key string) []*discoveryv1.EndpointSlice {
	var out []*discoveryv1.EndpointSlice
	if k.slices != nil {
		objs, _ := k.slices.GetIndexer().ByIndex(byService, key)
		for _, o := range objs {
			out = append(out, o.(*discoveryv1.EndpointSlice))
		}
	}
	return out
}

func (k *Kube) liveIPs(key string, svc *corev1.Service) []netip.Addr {
	if svc == nil {
		return nil
	}
	return LiveIPs(svc, k.slicesOf(key), k.opts.RequireEndpoints)
}

func (k *Kube) enqueue(o any) {
	if key, err := cache.DeletionHandlingMetaNamespaceKeyFunc(o); err == nil {
		k.queue.Add(key)
	}
}

func (k *Kube) enqueueSlice(o any) {
	if d, ok := o.(cache.DeletedFinalStateUnknown); ok {
		o = d.Obj
	}
	if keys, err := sliceService(o); err == nil {
		for _, key := range keys {
			k.queue.Add(key)
		}
	}
}

func sliceService(o any) ([]string, error) {
	s, ok := o.(*discoveryv1.EndpointSlice)
	if !ok {
		return nil, errors.New("not an EndpointSlice")
	}
	name := s.Labels[discoveryv1.LabelServiceName]
	if name == "" {
		return nil, nil
	}
	return []string{s.Namespace + "/" + name}, nil
}

// slimService keeps only what LiveIPs (and, with frontends, FrontendsOf)
// reads: with 10,000 services the informer cache is most of the agent's
// memory, and selectors, annotations and managed fields are most of a
// Service.
func slimService(o any, frontends bool) (any, error) {
	svc, ok := o.(*corev1.Service)
	if !ok {
		return o, nil
	}
	out := &corev1.Service{
		ObjectMeta: slimMeta(svc.ObjectMeta, nil),
		Spec: corev1.ServiceSpec{
			Type:                     svc.Spec.Type,
			ClusterIP:                svc.Spec.ClusterIP,
			ClusterIPs:               svc.Spec.ClusterIPs,
			PublishNotReadyAddresses: svc.Spec.PublishNotReadyAddresses,
		},
	}
	if frontends {
		out.Spec.Ports = svc.Spec.Ports
		out.Spec.SessionAffinity = svc.Spec.SessionAffinity
		out.Spec.SessionAffinityConfig = svc.Spec.SessionAffinityConfig
		out.Spec.InternalTrafficPolicy = svc.Spec.InternalTrafficPolicy
	}
	return out, nil
}

// slimSlice keeps the service label and the endpoints' conditions (with
// frontends: their addresses and nodes, and the ports).
func slimSlice(o any, frontends bool) (any, error) {
	s, ok := o.(*discoveryv1.EndpointSlice)
	if !ok {
		return o, nil
	}
	out := &discoveryv1.EndpointSlice{
		ObjectMeta:  slimMeta(s.ObjectMeta, map[string]string{discoveryv1.LabelServiceName: s.Labels[discoveryv1.LabelServiceName]}),
		AddressType: s.AddressType,
	}
	if frontends {
		out.Ports = s.Ports
	}
	for _, ep := range s.Endpoints {
		e := discoveryv1.Endpoint{Conditions: ep.Conditions}
		if frontends {
			e.Addresses, e.NodeName = ep.Addresses, ep.NodeName
		}
		out.Endpoints = append(out.Endpoints, e)
	}
	return out, nil
}

func slimMeta(m metav1.ObjectMeta, labels map[string]string) metav1.ObjectMeta {
	return metav1.ObjectMeta{
		Name:            m.Name,
		Namespace:       m.Namespace,
		UID:             m.UID,
		ResourceVersion: m.ResourceVersion,
		Labels:          labels,
	}
}
