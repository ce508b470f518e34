// Package agent is underpassd: it loads and attaches the datapath, applies
// the config (live, on file change or SIGHUP), keeps the live service set,
// the node's addresses and the parent attachments up to date, collects dead
// endpoints and serves /metrics, /healthz and /readyz.
//
// All datapath state is changed from one goroutine (the event loop in Run),
// except live_svcs, which services.Manager guards itself, so there is no
// lock ordering to get wrong. Changes to the endpoint registry, which the
// CNI plugin writes too, hold the datapath's writer lock (loader.Lock).
package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"reflect"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/klog/v2"

	"github.com/underpass-cni/underpass/internal/adopt"
	"github.com/underpass-cni/underpass/internal/config"
	"github.com/underpass-cni/underpass/internal/endpointgc"
	"github.com/underpass-cni/underpass/internal/loader"
	"github.com/underpass-cni/underpass/internal/netwatch"
	"github.com/underpass-cni/underpass/internal/services"
)

// Options configure an Agent. ConfigPath is required.
type Options struct {
	ConfigPath string
	Log        *slog.Logger
	// Level, when set, follows the config's logLevel (unless LevelFixed:
	// --log-level was given and wins).
	Level      *slog.LevelVar
	LevelFixed bool
	// Loader is passed to loader.Load (tests load modified program builds).
	Loader  loader.Options
	Version string
	// Reload triggers a reload of the config file (SIGHUP), once the file
	// holds still (config.Watch).
	Reload <-chan struct{}
	// Collectors is the hook for more /metrics collectors that need the
	// datapath (per-endpoint counters): called once the datapath is
	// loaded, its collectors are registered next to the agent's own.
	Collectors func(dp *loader.Objects) []prometheus.Collector
	// ReconcileInterval is how often the maps are checked for endpoints on
	// parents that are not attached yet (default 1s): the CNI plugin
	// registers endpoints without telling the agent.
	ReconcileInterval time.Duration
}

// Agent is a running underpassd.
type Agent struct {
	opts Options
	log  *slog.Logger

	cfg         *config.Config // in force
	gen         uint64         // config generation written to the datapath
	svcSynced   bool           // the live set has synced once: the stale guard is armed
	masq        bool           // table inet underpass is installed (services.masquerade)
	masqParents []string       // the parents its rules name
	masqErrors  atomic.Uint64  // failed installs or removals since start (read by /metrics)

	dp  atomic.Pointer[loader.Objects]
	svc atomic.Pointer[services.Manager]

	kube     *kubeSource
	gc       *endpointgc.Collector
	parents  map[int]*parentState    // attached, by ifindex
	lost     map[string]*parentState // deleted parents by name, awaiting re-creation
	uplinks  map[string]uplinkState  // configured uplinks that exist, by name
	warned   map[string]bool         // one-time warnings already logged
	hostSet  map[netip.Prefix]uint32 // last host set written, to log changes only
	gcPeriod time.Duration
	adopting bool // adopt.parents was not empty at the last adopt()

	ctx          context.Context // Run's, for the goroutines the config starts
	docker       *adopt.Docker   // following adopt.docker, if set
	dockerSocket string          // the socket it follows
	stopDocker   func()
	adoptNow     chan struct{} // the Docker source saw a container come or go
	adoptErr     string        // the adoption error last logged

	metrics    *metrics
	http       *httpServer
	httpListen string       // the metrics.listen http serves
	attached   atomic.Bool  // start-up attach done
	pins       pinGuard     // restores pins removed from under the agent
	heartbeat  atomic.Int64 // unix nanos of the event loop's last turn
}

// New checks the options.
func New(opts Options) (*Agent, error) {
	if opts.ConfigPath == "" {
		return nil, errors.New("no config path")
	}
	if opts.Log == nil {
		opts.Log = slog.Default()
	}
	if opts.ReconcileInterval <= 0 {
		opts.ReconcileInterval = time.Second
	}
	return &Agent{
		opts:    opts,
		log:     opts.Log,
		parents: map[int]*parentState{},
		lost:    map[string]*parentState{},
		uplinks: map[string]uplinkState{},
		warned:  map[string]bool{},
		// The first adopt() syncs even with no parents: it unregisters
		// what a previous config adopted.
		adopting: true,
		adoptNow: make(chan struct{}, 1),
	}, nil
}

// Run starts the agent and blocks until ctx is done. Errors during start-up
// (bad config, datapath that cannot load, port in use) are returned; after
// that, problems are logged and retried. On return the datapath stays pinned
// and attached: pods keep working while the agent restarts or upgrades.
func (a *Agent) Run(ctx context.Context) (err error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	a.ctx = ctx
	defer func() {
		if a.stopDocker != nil {
			a.stopDocker()
		}
	}()

	cfg, err := config.Load(a.opts.ConfigPath)
	if err != nil {
		return err
	}
	a.setLevel(cfg)
	// client-go logs through klog; send it to the same place.
	klog.SetSlogLogger(a.log.With("component", "client-go"))

	unlock, err := lock(cfg.BPFFS)
	if err != nil {
		return err
	}
	defer unlock()

	a.metrics = newMetrics(a)
	a.httpListen = cfg.Metrics.Listen
	if a.http, err = a.serveHTTP(cfg.Metrics.Listen); err != nil {
		return err
	}
	defer func() { a.http.close() }() // the server in use at exit (metrics.listen may move)

	// Validate before loading anything, so a bad config changes nothing.
	if err := a.validate(cfg); err != nil {
		return err
	}

	start := time.Now()
	dp, err := a.load(cfg)
	if dp != nil {
		defer func() {
			// Scrapes read the maps: stop serving before closing them.
			a.http.close()
			a.dp.Store(nil)
			dp.Close()
		}()
	}
	if err != nil {
		return err
	}

	if err := a.owners(dp); err != nil {
		return err
	}
	defer a.kube.stop()

	netEvents, err := a.start(ctx, cfg)
	if err != nil {
		return err
	}
	a.log.Info("underpassd started", "version", a.opts.Version, "bpffs", cfg.BPFFS,
		"parents", len(a.parents), "uplinks", len(a.uplinks), "took", time.Since(start).Round(time.Millisecond),
		"metrics", a.http.addr())
	if err := notifyReady(); err != nil {
		a.log.Warn("telling systemd underpassd is ready (NOTIFY_SOCKET)", "error", err)
	}
	a.loop(ctx, netEvents)
	return nil
}

// validate checks cfg against the node: its subnets, and the endpoints'
// subnets already pinned.
func (a *Agent) validate(cfg *config.Config) error {
	nodeNets, err := nodeSubnets()
	if err != nil {
		return err
	}
	if err := cfg.ValidateAgainst(nodeNets, pinnedEndpointSubnets(cfg.BPFFS)); err != nil {
		return fmt.Errorf("config %s: %w", a.opts.ConfigPath, err)
	}
	return nil
}

// owners sets up what owns the maps besides the loader: the live Service
// set, the Service frontends and the Kubernetes source feeding both, and
// the endpoint collector.
func (a *Agent) owners(dp *loader.Objects) error {
	svc, err := services.NewManager(services.MapStore{Maps: &dp.Maps}, a.log.With("component", "services"))
	if err != nil {
		return err
	}
	a.svc.Store(svc)
	a.gc = &endpointgc.Collector{Maps: &dp.Maps, Log: a.log.With("component", "gc"), Lock: dp.Lock, Target: dp.EndpointTarget}
	fronts, err := services.NewFrontends(&dp.Maps)
	if err != nil {
		return err
	}
	a.kube = newKubeSource(svc, fronts, a.log.With("component", "kubernetes"))
	return nil
}

// load loads the datapath into cfg's pin directory and registers the
// extra collectors on it. The datapath it returns (also with an error) is
// the caller's to close, after the metrics server stops.
func (a *Agent) load(cfg *config.Config) (*loader.Objects, error) {
	dp, err := loader.Load(cfg.BPFFS, a.opts.Loader)
	if err != nil {
		return nil, err
	}
	a.dp.Store(dp)
	if a.opts.Collectors != nil {
		for _, c := range a.opts.Collectors(dp) {
			if err := a.metrics.reg.Register(c); err != nil {
				return dp, fmt.Errorf("register collector: %w", err)
			}
		}
	}
	return dp, nil
}

// start applies cfg to the fresh datapath, attaches every parent and
// uplink, collects what died while no agent ran, and returns the network
// events, subscribed to before the first full scan so that no change falls
// in between.
func (a *Agent) start(ctx context.Context, cfg *config.Config) (<-chan netwatch.Event, error) {
	if err := a.apply(ctx, cfg, nil); err != nil {
		return nil, err
	}
	a.cfg = cfg
	a.gcPeriod = cfg.GCPeriod()
	a.armGuard()

	netEvents := make(chan netwatch.Event, 1024)
	go netwatch.Watch(ctx, netEvents, a.log.With("component", "netwatch"))

	// Re-attaching every known parent is also the upgrade: a pinned link is
	// updated in place to the program just loaded.
	a.reconcileParents(true)
	// Installed in one batch with a rule per known parent, replacing the
	// previous agent's table (or removing it when masquerade is off).
	a.masqueradeFailed(a.syncMasquerade(cfg.Services.Masquerade, true))
	a.syncUplinks(true)
	a.runGC()
	a.adopt()
	if err := a.startPinGuard(); err != nil {
		return nil, err
	}
	a.attached.Store(true)
	return netEvents, nil
}

// loop is the event loop: config changes, network events, the reconcile
// and GC ticks, until ctx is done. Every datapath change happens here.
func (a *Agent) loop(ctx context.Context, netEvents <-chan netwatch.Event) {
	// SIGHUP goes through the watcher: it then waits, as for any change,
	// until the file holds still, and remembers what it reported.
	type cfgChange struct {
		c       *config.Config
		trigger string
	}
	cfgChanges := make(chan cfgChange, 1)
	cfgErrors := make(chan error, 1)
	go config.Watch(ctx, a.opts.ConfigPath, 0, a.opts.Reload,
		func(c *config.Config, trigger string) { sendLatest(ctx, cfgChanges, cfgChange{c, trigger}) },
		func(err error) { sendLatest(ctx, cfgErrors, err) })

	reconcile := time.NewTicker(a.opts.ReconcileInterval)
	defer reconcile.Stop()
	gcTick := time.NewTicker(a.gcPeriod)
	defer gcTick.Stop()
	for {
		a.heartbeat.Store(time.Now().UnixNano())
		select {
		case <-ctx.Done():
			a.log.Info("underpassd stopping; the datapath stays pinned and attached")
			return
		case ch := <-cfgChanges:
			if ch.trigger != "SIGHUP" && reflect.DeepEqual(ch.c, a.cfg) {
				continue // the watcher's first report, or a rewrite of the same content
			}
			a.reload(ctx, ch.c, ch.trigger)
		case err := <-cfgErrors:
			a.rejected(err)
		case ev := <-netEvents:
			a.onNetEvent(ev)
		case <-a.adoptNow:
			a.adopt()
		case <-reconcile.C:
			a.checkPins()
			a.reconcileParents(false)
			a.adopt()
			a.armGuard()
			a.masqueradeFailed(a.syncMasquerade(a.cfg.Services.Masquerade, false))
		case <-gcTick.C:
			a.runGC()
			a.heal()
		}
		if p := a.cfg.GCPeriod(); p != a.gcPeriod {
			a.gcPeriod = p
			gcTick.Reset(p)
		}
	}
}

// ready reports what /readyz waits for.
func (a *Agent) ready() (bool, string) {
	var why []string
	if !a.attached.Load() {
		why = append(why, "datapath not attached yet")
	}
	if svc := a.svc.Load(); svc == nil || !svc.Synced() {
		why = append(why, "live services not synced yet")
	}
	if failed := a.repairFailure(); failed != "" {
		why = append(why, failed)
	}
	if len(why) > 0 {
		return false, fmt.Sprint(why)
	}
	return true, ""
}

func (a *Agent) runGC() {
	removed, err := a.gc.Run()
	if err != nil {
		a.log.Error("endpoint gc", "error", err)
	}
	if len(removed) > 0 {
		a.log.Info("endpoint gc done", "removed", len(removed))
	}
	a.forgetDeadParents()
}

// heal re-applies state that someone else may have changed (bpftool, a
// failed write): cheap, idempotent, and it bounds how long a drift lasts.
func (a *Agent) heal() {
	// host_cidrs against the map, not the agent's copy of what it wrote:
	// an outside edit is undone too.
	a.hostSet = nil
	if err := a.applyDatapath(a.cfg); err != nil {
		a.log.Error("re-apply config to the datapath", "error", err)
	}
	a.healMasquerade()
	// A Kubernetes source whose (re)start failed is started again; a
	// running one is left as it is.
	if err := a.kube.configure(a.ctx, a.cfg); err != nil {
		a.errorOnce("kube-configure", "Kubernetes services: the source is not running; will retry", "error", err)
	} else {
		delete(a.warned, "kube-configure")
	}
	if a.httpListen != a.cfg.Metrics.Listen {
		if err := a.relisten(a.cfg.Metrics.Listen); err != nil {
			a.errorOnce("relisten", "metrics server still on "+a.httpListen, "error", err)
		} else {
			delete(a.warned, "relisten")
		}
	}
	if err := a.svc.Load().Reconcile(); err != nil {
		a.log.Error("reconcile live services", "error", err)
	}
	a.syncUplinks(false)
}

func (a *Agent) setLevel(c *config.Config) {
	if a.opts.Level != nil && !a.opts.LevelFixed {
		a.opts.Level.Set(c.Level())
	}
}

// warnOnce logs a warning the first time key is seen.
func (a *Agent) warnOnce(key, msg string, args ...any) {
	if a.warned[key] {
		return
	}
	a.warned[key] = true
	a.log.Warn(msg, args...)
}

// errorOnce logs an error the first time key is seen.
func (a *Agent) errorOnce(key, msg string, args ...any) {
	if a.warned[key] {
		a.log.Debug(msg, args...)
		return
	}
	a.warned[key] = true
	a.log.Error(msg, args...)
}

// sendLatest replaces an unread value: only the newest config matters.
func sendLatest[T any](ctx context.Context, ch chan T, v T) {
	for {
		select {
		case ch <- v:
			return
		case <-ctx.Done():
			return
		default:
			select {
			case <-ch:
			default:
			}
		}
	}
}
