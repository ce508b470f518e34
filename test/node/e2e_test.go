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

// conformanceTests are the upstream [sig-network] [Conformance] tests this
// single node runs (e2e.test --ginkgo.focus): pod to pod and node to pod,
// TCP (HTTP) and UDP. Not yet:
//   - the Services specs with a data path ("should serve a basic endpoint
//     from pods", "... multiport endpoints from pods", NodePort, session
//     affinity): they reach the Service by its DNS name first, and this
//     node has no cluster DNS; the DNS specs, for the same reason;
//   - the Proxy specs (the apiserver proxying to a pod, i.e. host to pod):
//     their `agnhost porter` pod never got Ready on this node, with or
//     without porter's TLS cert in the image; not understood yet;
//   - HostPort (needs the portmap plugin).
//
// The rest of the [sig-network] [Conformance] list checks API objects
// without a data path.
var conformanceTests = []string{
	"[sig-network] Networking Granular Checks: Pods should function for intra-pod communication: http [Conformance]",
	"[sig-network] Networking Granular Checks: Pods should function for intra-pod communication: udp [Conformance]",
	"[sig-network] Networking Granular Checks: Pods should function for node-pod communication: http [LinuxOnly] [Conformance]",
	"[sig-network] Networking Granular Checks: Pods should function for node-pod communication: udp [LinuxOnly] [Conformance]",
}

// baselineTests run on plain macvlan too, one e2e.test run each with its
// own time limit: the netserver pods of the Granular Checks never get
// Ready there (the kubelet cannot probe them), so each spec would wait out
// its 5-minute pod timeout; one is enough to show it.
var baselineTests = []struct {
	spec  string
	limit time.Duration
}{
	{conformanceTests[2], 2 * time.Minute},
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
	bin, err := kapi.BinDir()
	must(t, err)
	e2e := filepath.Join(bin, "e2e.test")
	if _, err := os.Stat(e2e); err != nil {
		t.Fatalf("no e2e.test in %s: run test/k8s/build.sh", bin)
	}
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
	b, err := os.ReadFile(report)
	if err != nil {
		out, _ := os.ReadFile(log)
		t.Fatalf("e2e.test wrote no report: %v\n%s", err, tail(out, 8<<10))
	}
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
	if len(out) != len(tests) {
		logOut, _ := os.ReadFile(log)
		t.Errorf("e2e.test ran %d specs, want %d (%v)\n%s", len(out), len(tests), out, tail(logOut, 8<<10))
	}
	return out
}

func tail(b []byte, n int) string {
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}
