package observability_test

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.yaml.in/yaml/v3"

	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/testutil"
	"github.com/underpass-cni/underpass/test/netenv"
)

// deployDir is the repository's deploy/ directory.
func deployDir(t *testing.T) string {
	t.Helper()
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		t.Fatal("no caller")
	}
	return filepath.Join(filepath.Dir(file), "..", "..", "deploy")
}

func lookTool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	testutil.SkipIfNotSupported(t, testutil.NotSupported(name, err))
	return p
}

// TestRulesCheck runs promtool on the shipped rules and their unit tests,
// and on the example config.
func TestRulesCheck(t *testing.T) {
	promtool := lookTool(t, "promtool")
	dir := filepath.Join(deployDir(t), "prometheus")
	for _, args := range [][]string{
		{"check", "rules", "underpass-rules.yaml"},
		{"test", "rules", "underpass-rules.test.yaml"},
		{"check", "config", "prometheus.yaml"},
	} {
		cmd := exec.Command(promtool, args...)
		cmd.Dir = dir
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Errorf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	// Debian's promtool lacks Kubernetes discovery: the Kubernetes job is
	// checked for shape here (it must be the job the rules match).
	b, err := os.ReadFile(filepath.Join(dir, "scrape-kubernetes.yaml"))
	must(t, err)
	var jobs []struct {
		JobName string `yaml:"job_name"`
		SD      []any  `yaml:"kubernetes_sd_configs"`
	}
	must(t, yaml.Unmarshal(b, &jobs))
	if len(jobs) != 1 || jobs[0].JobName != "underpass" || len(jobs[0].SD) != 1 {
		t.Errorf("scrape-kubernetes.yaml: %+v", jobs)
	}
}

// queries are the PromQL expressions shipped in deploy/: every dashboard
// target and template variable, every rule.
type query struct {
	where string // panel or rule, for messages
	expr  string
	// mustHaveData: after the traffic this test generates, the query
	// returns series. Quiet alerts only have to evaluate.
	mustHaveData bool
}

// grafanaVars are what Grafana substitutes before sending a query: "All"
// for the selectors, and windows that suit a 1 s scrape interval.
var grafanaVars = strings.NewReplacer(
	"$__rate_interval", "5s",
	"$__range", "5m",
	"$job", "underpass",
	"$node", ".*",
	"$namespace", ".*",
	"$pod", ".*",
)

var labelValues = regexp.MustCompile(`^label_values\((.*),\s*\w+\)$`)

func dashboardQueries(t *testing.T) []query {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(deployDir(t), "grafana", "underpass.json"))
	must(t, err)
	var dash struct {
		UID        string  `json:"uid"`
		Panels     []panel `json:"panels"`
		Templating struct {
			List []struct {
				Name  string `json:"name"`
				Type  string `json:"type"`
				Query any    `json:"query"`
			} `json:"list"`
		} `json:"templating"`
	}
	must(t, json.Unmarshal(b, &dash))
	if dash.UID == "" {
		t.Error("dashboard has no uid")
	}
	var out []query
	var walk func([]panel)
	walk = func(ps []panel) {
		for _, p := range ps {
			walk(p.Panels)
			if p.Type == "row" {
				continue
			}
			if len(p.Targets) == 0 {
				t.Errorf("panel %q has no query", p.Title)
			}
			if p.Datasource.UID != "${datasource}" {
				t.Errorf("panel %q does not use the datasource variable", p.Title)
			}
			for _, tg := range p.Targets {
				out = append(out, query{where: "panel " + p.Title + "/" + tg.RefID, expr: tg.Expr, mustHaveData: true})
			}
		}
	}
	walk(dash.Panels)
	for _, v := range dash.Templating.List {
		if v.Type != "query" {
			continue
		}
		q, _ := v.Query.(map[string]any)
		s, _ := q["query"].(string)
		m := labelValues.FindStringSubmatch(s)
		if m == nil {
			t.Errorf("variable %s: query %q is not label_values(selector, label)", v.Name, s)
			continue
		}
		out = append(out, query{where: "variable " + v.Name, expr: m[1], mustHaveData: true})
	}
	if len(out) < 20 {
		t.Errorf("only %d dashboard queries", len(out))
	}
	return out
}

type panel struct {
	Type       string `json:"type"`
	Title      string `json:"title"`
	Datasource struct {
		UID string `json:"uid"`
	} `json:"datasource"`
	Targets []struct {
		Expr  string `json:"expr"`
		RefID string `json:"refId"`
	} `json:"targets"`
	Panels []panel `json:"panels"`
}

// firing are the alerts this test's traffic makes pending or firing.
var firing = map[string]bool{"UnderpassStaleServiceTraffic": true, "UnderpassIPConflict": true, "UnderpassConfigReloadFailed": true}

func ruleQueries(t *testing.T) []query {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(deployDir(t), "prometheus", "underpass-rules.yaml"))
	must(t, err)
	var rules struct {
		Groups []struct {
			Rules []struct {
				Alert string `yaml:"alert"`
				Expr  string `yaml:"expr"`
			} `yaml:"rules"`
		} `yaml:"groups"`
	}
	must(t, yaml.Unmarshal(b, &rules))
	var out []query
	for _, g := range rules.Groups {
		for _, r := range g.Rules {
			out = append(out, query{where: "alert " + r.Alert, expr: r.Expr, mustHaveData: firing[r.Alert]})
		}
	}
	return out
}

// promServer is a Prometheus run for the test.
type promServer struct {
	url string
}

// startPrometheus runs a real Prometheus scraping target every second and
// evaluating the shipped rules.
func startPrometheus(t *testing.T, target string) *promServer {
	t.Helper()
	bin := lookTool(t, "prometheus")
	dir := t.TempDir()
	rules, err := filepath.Abs(filepath.Join(deployDir(t), "prometheus", "underpass-rules.yaml"))
	must(t, err)
	cfg := fmt.Sprintf(`global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: [%q]
scrape_configs:
  - job_name: underpass
    static_configs:
      - targets: [%q]
`, rules, target)
	must(t, os.WriteFile(filepath.Join(dir, "prometheus.yml"), []byte(cfg), 0o644))
	addr := freePort(t)
	log, err := os.Create(filepath.Join(dir, "prometheus.log"))
	must(t, err)
	cmd := exec.Command(bin, "--config.file="+filepath.Join(dir, "prometheus.yml"),
		"--storage.tsdb.path="+filepath.Join(dir, "data"), "--web.listen-address="+addr)
	cmd.Stdout, cmd.Stderr = log, log
	must(t, cmd.Start())
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		log.Close()
		if t.Failed() {
			b, _ := os.ReadFile(log.Name())
			t.Logf("prometheus log:\n%s", lastLines(string(b), 30))
		}
	})
	p := &promServer{url: "http://" + addr}
	eventually(t, "prometheus ready", func() bool {
		resp, err := http.Get(p.url + "/-/ready")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
	return p
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func freePort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	must(t, err)
	defer ln.Close()
	return ln.Addr().String()
}

type apiResponse struct {
	Status    string          `json:"status"`
	ErrorType string          `json:"errorType"`
	Error     string          `json:"error"`
	Warnings  []string        `json:"warnings"`
	Data      json.RawMessage `json:"data"`
}

func (p *promServer) api(t *testing.T, path string, params url.Values) (json.RawMessage, error) {
	t.Helper()
	resp, err := http.Get(p.url + path + "?" + params.Encode())
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	var r apiResponse
	if err := json.Unmarshal(body, &r); err != nil {
		return nil, fmt.Errorf("%s: %s: %w", path, body, err)
	}
	if r.Status != "success" {
		return nil, fmt.Errorf("%s: %s: %s", path, r.ErrorType, r.Error)
	}
	return r.Data, nil
}

// query evaluates expr now and returns the number of series (or 1 for a
// scalar).
func (p *promServer) query(t *testing.T, expr string) (int, error) {
	t.Helper()
	data, err := p.api(t, "/api/v1/query", url.Values{"query": {expr}})
	if err != nil {
		return 0, err
	}
	var res struct {
		ResultType string          `json:"resultType"`
		Result     json.RawMessage `json:"result"`
	}
	if err := json.Unmarshal(data, &res); err != nil {
		return 0, err
	}
	if res.ResultType != "vector" && res.ResultType != "matrix" {
		return 1, nil
	}
	var series []json.RawMessage
	if err := json.Unmarshal(res.Result, &series); err != nil {
		return 0, err
	}
	return len(series), nil
}

// TestPrometheus: a real Prometheus scrapes the collector (served by
// promhttp, as underpassd does) while pods generate host, wire and stale
// traffic and a conflict; then every query of the dashboard and the alert
// rules is evaluated through the HTTP API.
func TestPrometheus(t *testing.T) {
	lookTool(t, "prometheus")
	l := newLab(t)
	a := l.pod(t, "a", 10)
	client := l.pod(t, "client", 11)
	wire := l.env.AddWireHost("w", l.up.IP4(50), netip.Prefix{})
	// A Service frontend (services.mode ebpf's tables), so that the
	// per-Service series exist for the Services panels.
	must(t, datapath.SyncFrontends(&l.dp.Maps, []datapath.Frontend{{VIP: netenv.LiveVIP4, Port: 80, Proto: datapath.ProtoTCP,
		Backends: []netip.AddrPort{netip.AddrPortFrom(a.IP4.Addr(), 8080)}, Service: "default/web", PortName: "http"}}))

	// The registry underpassd serves: the datapath collector plus the
	// agent's own metrics (stand-ins: their names are the contract).
	reg := prometheus.NewPedanticRegistry()
	must(t, reg.Register(l.collector()))
	reloads := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "underpass_config_reloads_total", Help: "agent stand-in"}, []string{"result"})
	reloads.WithLabelValues("success")
	reloads.WithLabelValues("error")
	ready := prometheus.NewGauge(prometheus.GaugeOpts{Name: "underpass_agent_ready", Help: "agent stand-in"})
	ready.Set(1)
	reg.MustRegister(reloads, ready)

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	must(t, err)
	srv := &http.Server{Handler: promhttp.HandlerFor(reg, promhttp.HandlerOpts{ErrorHandling: promhttp.HTTPErrorOnError}),
		ReadHeaderTimeout: 5 * time.Second}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })

	p := startPrometheus(t, ln.Addr().String())
	// The first scrapes are in before the traffic, so that increase() and
	// rate() see the counters move.
	// Service discovery hands targets over every 5 s: the first scrape
	// comes 5-6 s after start.
	eventuallyWithin(t, 30*time.Second, "two scrapes", func() bool {
		n, err := p.query(t, `count_over_time(up{job="underpass"}[1m]) >= 2`)
		return err == nil && n == 1
	})
	if n, err := p.query(t, `up{job="underpass"} == 1`); err != nil || n != 1 {
		t.Fatalf("target not up: %d series, %v", n, err)
	}

	// Traffic across several scrapes: host<->pod, wire->pod, pod->stale
	// VIP, an IP conflict and a rejected config.
	netenv.MustPing(t, client.NS, l.up.Gateway4, 1)
	deadline := time.Now().Add(4 * time.Second)
	for time.Now().Before(deadline) {
		netenv.MustPing(t, l.env.Node, a.IP4.Addr(), 10)
		netenv.MustPing(t, wire.NS, a.IP4.Addr(), 10)
		netenv.Ping(t, client.NS, netenv.StaleVIP4, 5)
	}
	sendGratuitousARP(t, wire, a.IP4.Addr())
	reloads.WithLabelValues("error").Inc()
	// A few more scrapes, so rate windows hold the traffic and the rules
	// have evaluated it.
	time.Sleep(3 * time.Second)
	if n, err := p.query(t, `sum(underpass_stale_service_packets_total{pod="client", action="dropped"}) > 0`); err != nil || n != 1 {
		t.Fatalf("stale traffic not scraped: %d, %v", n, err)
	}

	for _, q := range append(dashboardQueries(t), ruleQueries(t)...) {
		expr := grafanaVars.Replace(q.expr)
		if strings.Contains(expr, "$") {
			t.Errorf("%s: unsubstituted variable in %q", q.where, expr)
			continue
		}
		n, err := p.query(t, expr)
		switch {
		case err != nil:
			t.Errorf("%s: %q: %v", q.where, expr, err)
		case q.mustHaveData && n == 0:
			t.Errorf("%s: %q returned no data after the test traffic", q.where, expr)
		default:
			t.Logf("%s: %d series", q.where, n)
		}
	}

	// The rules loaded into Prometheus and evaluate without errors; the
	// traffic's alerts are pending or firing.
	eventuallyWithin(t, 30*time.Second, "rules evaluated", func() bool {
		data, err := p.api(t, "/api/v1/rules", url.Values{})
		if err != nil {
			return false
		}
		var rules struct {
			Groups []struct {
				Rules []struct {
					Name   string `json:"name"`
					Health string `json:"health"`
					State  string `json:"state"`
					Error  string `json:"lastError"`
				} `json:"rules"`
			} `json:"groups"`
		}
		if json.Unmarshal(data, &rules) != nil || len(rules.Groups) != 1 {
			return false
		}
		active := 0
		for _, r := range rules.Groups[0].Rules {
			if r.Health == "err" {
				t.Fatalf("rule %s: %s", r.Name, r.Error)
			}
			if r.Health != "ok" {
				return false
			}
			if firing[r.Name] && r.State != "inactive" {
				active++
			}
			if !firing[r.Name] && r.State != "inactive" {
				t.Fatalf("alert %s is %s: it should be quiet here", r.Name, r.State)
			}
		}
		return active == len(firing)
	})
}
