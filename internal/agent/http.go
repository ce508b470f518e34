package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/sys/unix"

	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/hostnat"
)

// metrics are the agent's own metrics (names fixed by the contract, docs/architecture.md).
type metrics struct {
	reg     *prometheus.Registry
	reloads *prometheus.CounterVec
}

func newMetrics(a *Agent) *metrics {
	m := &metrics{reg: prometheus.NewRegistry()}
	m.reloads = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "underpass_config_reloads_total",
		Help: "Config reloads by result: success (applied) or error (rejected or failed; the previous config stays).",
	}, []string{"result"})
	// Both series exist from the start, so rate() and alerts work before
	// the first reload.
	m.reloads.WithLabelValues("success")
	m.reloads.WithLabelValues("error")
	m.reg.MustRegister(
		m.reloads,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "underpass_live_services",
			Help: "Service IPs currently live in the datapath (static and Kubernetes).",
		}, func() float64 {
			if svc := a.svc.Load(); svc != nil {
				return float64(svc.Len())
			}
			return 0
		}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "underpass_endpoints",
			Help: "Endpoints registered in the datapath.",
		}, func() float64 {
			dp := a.dp.Load()
			if dp == nil {
				return 0
			}
			n, _ := datapath.CountEndpoints(&dp.Maps)
			return float64(n)
		}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "underpass_agent_ready",
			Help: "1 when /readyz is ok (datapath attached, live services synced), else 0.",
		}, func() float64 {
			if ok, _ := a.ready(); ok {
				return 1
			}
			return 0
		}),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "underpass_masquerade_errors_total",
			Help: "Failed installs or removals of the nftables table inet underpass (services.masquerade); while it is missing, Service flows to underlay pod backends get no reply.",
		}, func() float64 { return float64(a.masqErrors.Load()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "underpass_service_masqueraded_flows_total",
			Help: "Service flows of underlay pods that the host translated (kube-proxy DNAT or IPVS) and forwarded, masqueraded by the table inet underpass (restarts from 0 when the table is rewritten).",
		}, func() float64 {
			st, _ := hostnat.Installed()
			return float64(st.Flows)
		}),
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	return m
}

type httpServer struct {
	srv *http.Server
	ln  net.Listener
}

func (s *httpServer) addr() string { return s.ln.Addr().String() }

func (s *httpServer) close() {
	if s.srv == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_ = s.srv.Shutdown(ctx)
}

// serveHTTP listens synchronously, so a port in use fails start-up with a
// clear error instead of a silent background failure.
func (a *Agent) serveHTTP(addr string) (*httpServer, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("metrics.listen %s: %w", addr, err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(a.metrics.reg, promhttp.HandlerOpts{ErrorLog: nil}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		// Healthy while the event loop turns; it turns at least every
		// reconcile interval. Before start-up finishes there is no beat yet.
		if beat := a.heartbeat.Load(); beat != 0 {
			if age := time.Since(time.Unix(0, beat)); age > 30*time.Second+10*a.opts.ReconcileInterval {
				http.Error(w, fmt.Sprintf("event loop stuck for %s", age.Round(time.Second)), http.StatusServiceUnavailable)
				return
			}
		}
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, r *http.Request) {
		if ok, why := a.ready(); !ok {
			http.Error(w, "not ready: "+why, http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/" {
			http.NotFound(w, r)
			return
		}
		fmt.Fprintln(w, "underpassd: /metrics /healthz /readyz")
	})
	s := &httpServer{
		srv: &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second},
		ln:  ln,
	}
	go func() {
		if err := s.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			a.log.Error("metrics server stopped", "error", err)
		}
	}()
	return s, nil
}

// samePort says whether listen address a names the port b listens on.
func samePort(a, b string) bool {
	_, pa, err := net.SplitHostPort(a)
	_, pb, errb := net.SplitHostPort(b)
	return err == nil && errb == nil && pa == pb
}

// relisten moves the HTTP server to a new address: the new one listens
// before the old one closes, unless the new one is the old port on another
// address (127.0.0.1:9775 to :9775), which collides with the agent's own
// socket: then the old one closes first, and comes back if the new one
// still cannot listen.
func (a *Agent) relisten(addr string) error {
	old := a.http
	s, err := a.serveHTTP(addr)
	if errors.Is(err, unix.EADDRINUSE) && samePort(addr, old.addr()) {
		old.close()
		if s, err = a.serveHTTP(addr); err != nil {
			back, berr := a.serveHTTP(a.httpListen)
			if berr != nil {
				return errors.Join(err, fmt.Errorf("metrics server back on %s: %w", a.httpListen, berr))
			}
			a.http = back
			return err
		}
	} else if err != nil {
		return err
	}
	a.http, a.httpListen = s, addr
	old.close()
	a.log.Info("metrics server moved", "listen", s.addr())
	return nil
}
