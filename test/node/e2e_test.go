package node_test

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/underpass-cni/underpass/test/k8s/kapi"
)

// conformanceTests are the upstream [sig-network] [Conformance] tests (the
// whole list e2e.test v1.37 has, TestConformanceListIsComplete holds it to
// e2e.test's own) that this single node runs, one e2e.test run against
// underpass chained after macvlan (portmap after it, for HostPort), with
// CoreDNS as the cluster DNS on the same network. notRun would be the ones
// it does not, with why: none.
var conformanceTests = []string{
	"[sig-network] API Server should have Endpoints and EndpointSlices pointing to API Server [Conformance]",
	"[sig-network] API Server should provide secure master service [Conformance]",
	"[sig-network] DNS should provide /etc/hosts entries for the cluster [Conformance]",
	"[sig-network] DNS should provide DNS for ExternalName services [Conformance]",
	"[sig-network] DNS should provide DNS for pods for Hostname [Conformance]",
	"[sig-network] DNS should provide DNS for pods for Subdomain [Conformance]",
	"[sig-network] DNS should provide DNS for services [Conformance]",
	"[sig-network] DNS should provide DNS for the cluster [Conformance]",
	"[sig-network] DNS should resolve DNS of partial qualified names for services [LinuxOnly] [Conformance]",
	"[sig-network] DNS should support configurable pod DNS nameservers [Conformance]",
	"[sig-network] EndpointSlice should create Endpoints and EndpointSlices for Pods matching a Service [Conformance]",
	"[sig-network] EndpointSlice should create and delete EndpointSlices for a Service with a selector that matches no pods [Conformance]",
	"[sig-network] EndpointSlice should support a Service with multiple endpoint IPs specified in multiple EndpointSlices [Conformance]",
	"[sig-network] EndpointSlice should support a Service with multiple ports specified in multiple EndpointSlices [Conformance]",
	"[sig-network] EndpointSlice should support creating EndpointSlice API operations [Conformance]",
	"[sig-network] EndpointSliceMirroring should mirror a custom Endpoints resource through create update and delete [Conformance]",
	"[sig-network] Endpoints should test the lifecycle of an Endpoint [Conformance]",
	"[sig-network] EndpointsController should create Endpoints for Pods matching a Service [Conformance]",
	"[sig-network] EndpointsController should create and delete Endpoints for a Service with a selector that matches no pods [Conformance]",
	"[sig-network] HostPort validates that there is no conflict between pods with same hostPort but different hostIP and protocol [LinuxOnly] [Conformance]",
	"[sig-network] Ingress API should support creating Ingress API operations [Conformance]",
	"[sig-network] IngressClass API should support creating IngressClass API operations [Conformance]",
	"[sig-network] Networking Granular Checks: Pods should function for intra-pod communication: http [Conformance] [NodeConformance]",
	"[sig-network] Networking Granular Checks: Pods should function for intra-pod communication: udp [Conformance] [NodeConformance]",
	"[sig-network] Networking Granular Checks: Pods should function for node-pod communication: http [LinuxOnly] [Conformance] [NodeConformance]",
	"[sig-network] Networking Granular Checks: Pods should function for node-pod communication: udp [LinuxOnly] [Conformance] [NodeConformance]",
	"[sig-network] Proxy version v1 A set of valid responses are returned for both pod and service Proxy [Conformance]",
	"[sig-network] Proxy version v1 A set of valid responses are returned for both pod and service ProxyWithPath [Conformance]",
	"[sig-network] Proxy version v1 should proxy through a service and a pod [Conformance]",
	"[sig-network] Service endpoints latency should not be very high [Conformance]",
	"[sig-network] ServiceCIDR and IPAddress API should support IPAddress API operations [Conformance]",
	"[sig-network] ServiceCIDR and IPAddress API should support ServiceCIDR API operations [Conformance]",
	"[sig-network] Services should be able to change the type from ClusterIP to ExternalName [Conformance]",
	"[sig-network] Services should be able to change the type from ExternalName to ClusterIP [Conformance]",
	"[sig-network] Services should be able to change the type from ExternalName to NodePort [Conformance]",
	"[sig-network] Services should be able to change the type from NodePort to ExternalName [Conformance]",
	"[sig-network] Services should be able to create a functioning NodePort service [Conformance]",
	"[sig-network] Services should be able to switch session affinity for NodePort service [LinuxOnly] [Conformance]",
	"[sig-network] Services should be able to switch session affinity for service with type clusterIP [LinuxOnly] [Conformance]",
	"[sig-network] Services should complete a service status lifecycle [Conformance]",
	"[sig-network] Services should delete a collection of services [Conformance]",
	"[sig-network] Services should find a service from listing all namespaces [Conformance]",
	"[sig-network] Services should have session affinity work for NodePort service [LinuxOnly] [Conformance]",
	"[sig-network] Services should have session affinity work for service with type clusterIP [LinuxOnly] [Conformance]",
	"[sig-network] Services should serve a basic endpoint from pods [Conformance]",
	"[sig-network] Services should serve endpoints on same port and different protocols [Conformance]",
	"[sig-network] Services should serve multiport endpoints from pods [Conformance]",
}

// notRun: spec -> why it is not run. Empty: the node runs them all.
var notRun = map[string]string{}

// baselineTests run on plain macvlan too, one e2e.test run each with its
// own time limit: the netserver pods of the Granular Checks never get
// Ready there (the kubelet cannot probe them), so each spec would wait out
// its 5-minute pod timeout, and a pod's Service traffic (its DNS lookup of
// the Service's name first) leaves for the gateway; one of each shows it.
var baselineTests = []struct {
	spec  string
	limit time.Duration
}{
	{"[sig-network] Networking Granular Checks: Pods should function for node-pod communication: http [LinuxOnly] [Conformance] [NodeConformance]", 2 * time.Minute},
	{"[sig-network] Services should serve a basic endpoint from pods [Conformance]", 3 * time.Minute},
}

// TestConformanceListIsComplete holds conformanceTests and notRun to the
// [sig-network] [Conformance] specs of the e2e.test that make test builds
// (a dry run: nothing starts): a spec the next Kubernetes version adds or
// renames cannot go unrun without a reason.
func TestConformanceListIsComplete(t *testing.T) {
	bin, err := kapi.BinDir()
	must(t, err)
	dir := t.TempDir()
	report := filepath.Join(dir, "dry.json")
	out, err := exec.Command(filepath.Join(bin, "e2e.test"), "--ginkgo.dry-run", "--kubeconfig", os.DevNull,
		"--ginkgo.focus", `\[sig-network\].*\[Conformance\]`, "--ginkgo.json-report", report, "--report-dir", dir).CombinedOutput()
	if err != nil {
		t.Fatalf("e2e.test --ginkgo.dry-run: %v\n%s", err, tail(out, 4<<10))
	}
	specs := map[string]bool{}
	for _, r := range readReport(t, report) {
		specs[r.name] = true
	}
	listed := map[string]bool{}
	for _, s := range conformanceTests {
		listed[s] = true
		if notRun[s] != "" {
			t.Errorf("%q is both run and not run", s)
		}
	}
	for s := range notRun {
		listed[s] = true
	}
	for s := range specs {
		if !listed[s] {
			t.Errorf("e2e.test has %q: run it (conformanceTests) or say why not (notRun)", s)
		}
	}
	for s := range listed {
		if !specs[s] {
			t.Errorf("%q is not a [sig-network] [Conformance] spec of this e2e.test", s)
		}
	}
	t.Logf("%d [sig-network] [Conformance] specs: %d run, %d not run", len(specs), len(conformanceTests), len(notRun))
}

// e2eResult is one spec's outcome in e2e.test's JSON report.
type e2eResult struct {
	name    string
	state   string // passed, failed, ...
	runTime time.Duration
	failure string
}

// runConformance runs e2e.test against the node with the focus on tests,
// and returns each spec's result. timeout bounds the whole suite (a
// network whose pods never get Ready fails by timing out).
func runConformance(t *testing.T, c *kapi.Cluster, tests []string, timeout time.Duration) []e2eResult {
	t.Helper()
	bin := kapi.NeedBins(t, "e2e.test")
	e2e := filepath.Join(bin, "e2e.test")
	var focus []string
	for _, name := range tests {
		focus = append(focus, regexp.QuoteMeta(name))
	}
	dir := t.TempDir()
	report := filepath.Join(dir, "report.json")
	cmd := exec.Command(e2e,
		"--kubeconfig", c.Kubeconfig,
		"--provider", "skeleton",
		"--kubectl-path", filepath.Join(bin, "kubectl"),
		"--num-nodes", "1",
		"--ginkgo.focus", strings.Join(focus, "|"),
		"--ginkgo.no-color",
		"--ginkgo.timeout", timeout.String(),
		"--ginkgo.json-report", report,
		"--report-dir", dir,
	)
	log := filepath.Join(dir, "e2e.log")
	f, err := os.Create(log)
	must(t, err)
	cmd.Stdout, cmd.Stderr = f, f
	start := time.Now()
	runErr := cmd.Run()
	f.Close()
	t.Logf("e2e.test (%d focused specs) ran %s: %v", len(tests), time.Since(start).Round(time.Second), runErr)
	if runErr != nil {
		// What the failed specs tried, from e2e.test's own log.
		logOut, _ := os.ReadFile(log)
		var lines []string
		for _, l := range strings.Split(string(logOut), "\n") {
			if strings.Contains(l, "Failed to execute") || strings.Contains(l, "[FAILED]") || strings.Contains(l, "Going to poll") {
				lines = append(lines, l)
			}
		}
		if len(lines) > 40 {
			lines = lines[len(lines)-40:]
		}
		t.Logf("e2e.test log (%s), failures:\n%s", log, strings.Join(lines, "\n"))
	}
	if _, err := os.Stat(report); err != nil {
		out, _ := os.ReadFile(log)
		t.Fatalf("e2e.test wrote no report: %v\n%s", err, tail(out, 8<<10))
	}
	out := readReport(t, report)
	if len(out) != len(tests) {
		logOut, _ := os.ReadFile(log)
		t.Errorf("e2e.test ran %d specs, want %d (%v)\n%s", len(out), len(tests), out, tail(logOut, 8<<10))
	}
	return out
}

// readReport reads the specs (ginkgo "It" nodes) that ran, or would run in
// a dry run, from e2e.test's JSON report.
func readReport(t *testing.T, report string) []e2eResult {
	t.Helper()
	b, err := os.ReadFile(report)
	must(t, err)
	var suites []struct {
		SpecReports []struct {
			ContainerHierarchyTexts []string
			LeafNodeText            string
			LeafNodeType            string
			State                   string
			RunTime                 int64
			Failure                 *struct{ Message string }
		}
	}
	must(t, json.Unmarshal(b, &suites))
	var out []e2eResult
	for _, s := range suites {
		for _, r := range s.SpecReports {
			if r.LeafNodeType != "It" || r.State == "skipped" {
				continue
			}
			res := e2eResult{name: strings.Join(append(r.ContainerHierarchyTexts, r.LeafNodeText), " "), state: r.State, runTime: time.Duration(r.RunTime)}
			if r.Failure != nil {
				res.failure = r.Failure.Message
			}
			out = append(out, res)
		}
	}
	return out
}

func tail(b []byte, n int) string {
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}
