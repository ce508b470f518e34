package agent

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"strings"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/underpass-cni/underpass/internal/config"
	"github.com/underpass-cni/underpass/internal/services"
)

// kubeSource runs (and restarts on config changes) the Kubernetes informers
// that feed services.Manager.
type kubeSource struct {
	mgr    *services.Manager
	fronts *services.Frontends // services.mode: ebpf
	log    *slog.Logger

	running kubeSettings
	cancel  context.CancelFunc
	done    chan struct{}
}

// kubeSettings are the config keys the informers depend on.
type kubeSettings struct {
	enabled          bool
	kubeconfig       string
	requireEndpoints bool
	ebpf             bool   // services.mode: ebpf
	node             string // this node's name (internalTrafficPolicy: Local)
}

func settingsOf(c *config.Config) kubeSettings {
	s := kubeSettings{enabled: services.KubeWanted(c.Kubernetes(), c.Services.Kubeconfig)}
	if s.enabled {
		s.kubeconfig = c.Services.Kubeconfig
		s.requireEndpoints = c.StaleServices.RequireEndpoints
		s.ebpf = c.ServiceMode() == config.ServiceModeEBPF
		if s.ebpf {
			s.node = nodeName()
		}
	}
	return s
}

// nodeName is NODE_NAME (the DaemonSet sets it from spec.nodeName), else
// the host name, which is the kubelet's default node name.
func nodeName() string {
	if n := os.Getenv("NODE_NAME"); n != "" {
		return n
	}
	h, _ := os.Hostname()
	return strings.ToLower(h)
}

func newKubeSource(mgr *services.Manager, fronts *services.Frontends, log *slog.Logger) *kubeSource {
	return &kubeSource{mgr: mgr, fronts: fronts, log: log}
}

// check reports whether c's Kubernetes settings can be used (credentials
// readable), without changing anything.
func (k *kubeSource) check(c *config.Config) error {
	s := settingsOf(c)
	if !s.enabled || s == k.running {
		return nil
	}
	_, _, err := newKubeClient(s.kubeconfig)
	return err
}

// newKubeClient is the client for kubeconfig ("": in-cluster). Building it
// parses the certificates, which reading the kubeconfig does not: a CA that
// is no PEM fails here.
func newKubeClient(kubeconfig string) (_ *kubernetes.Clientset, host string, _ error) {
	rc, err := services.RestConfig(kubeconfig)
	if err != nil {
		return nil, "", err
	}
	rc = rest.CopyConfig(rc)
	rc.UserAgent = "underpassd"
	client, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return nil, "", fmt.Errorf("kubernetes client: %w", err)
	}
	return client, rc.Host, nil
}

// configure starts, restarts or stops the informers to match c. A restart
// keeps the live set as it is until the new informers have synced.
func (k *kubeSource) configure(ctx context.Context, c *config.Config) error {
	s := settingsOf(c)
	if s == k.running && (k.cancel != nil || !s.enabled) {
		return nil
	}
	// The new client first: one that cannot be built leaves the running
	// informers as they are.
	var client *kubernetes.Clientset
	var host string
	if s.enabled {
		var err error
		if client, host, err = newKubeClient(s.kubeconfig); err != nil {
			return err
		}
	}
	k.stop()
	k.running = s
	if !s.ebpf {
		// Back to the host path: no frontend may linger for the programs
		// (they ignore the table then, but a later switch would find it).
		if err := k.fronts.Clear(); err != nil {
			return fmt.Errorf("clear service frontends: %w", err)
		}
	}
	if !s.enabled {
		k.log.Info("live services from the static list only (services.kubernetes off)")
		return k.mgr.SetKubernetes(false)
	}
	if err := k.mgr.SetKubernetes(true); err != nil {
		return err
	}
	kctx, cancel := context.WithCancel(ctx)
	k.cancel, k.done = cancel, make(chan struct{})
	opts := services.KubeOptions{RequireEndpoints: s.requireEndpoints, Node: s.node, Log: k.log}
	if s.ebpf {
		opts.Frontends = k.fronts
	}
	src := services.NewKube(client, k.mgr, opts)
	where := s.kubeconfig
	if where == "" {
		where = "in-cluster"
	}
	k.log.Info("watching Kubernetes services", "api", host, "credentials", where, "requireEndpoints", s.requireEndpoints,
		"servicesMode", map[bool]string{false: "host", true: "ebpf"}[s.ebpf], "node", s.node)
	go func(done chan struct{}) {
		defer close(done)
		if err := src.Run(kctx); err != nil && kctx.Err() == nil {
			k.log.Error("kubernetes service watch ended", "error", err)
		}
	}(k.done)
	return nil
}

// stop stops the informers and waits for them, so an old view never lands
// after a new one.
func (k *kubeSource) stop() {
	if k.cancel == nil {
		return
	}
	k.cancel()
	<-k.done
	k.cancel, k.done = nil, nil
	k.running = kubeSettings{}
}
