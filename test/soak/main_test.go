// Package soak_test churns short-lived pods through the real underpass CNI
// plugin while the real underpassd runs, and checks that nothing degrades or
// leaks.
//
// TestChurn builds a node netns (test/netenv) with underpassd running in it
// (nsenter --net, as test/agent does) and the plugin in main mode on the
// node's eth0 (macvlan bridge, dual-stack host-local IPAM with its own
// dataDir), driven through libcni as a container runtime does. Two stable
// pods come up first; then N ADD/DEL cycles of short-lived pods run, P at a
// time (each cycle: a new netns, ADD, two pings from it to a stable pod,
// DEL, the netns removed). All the while traffic flows between the stable
// pods and between the host and the stable pods (ICMP both families, and
// two TCP echo streams: host->pod and pod->host).
//
// It asserts: every ADD and DEL succeeds (each failure is reported with its
// error); no ping between the stable pods or between the host and a stable
// pod is lost, no TCP round trip fails, and every churned pod reached the
// stable pod; the agent answers every /metrics and /readyz scrape during the
// churn. Afterwards, against a baseline taken once the stable pods were up:
// the node netns has the same links, the lab has the same namespaces, the
// IPAM dataDir holds only the stable pods' leases, the endpoints, ep_by_ip,
// ep_by_mac and ep_stats maps hold only the stable pods' entries (and
// parents the same ones), the bpffs pin dir holds the same files, the
// agent's open fds (/proc/<pid>/fd) and goroutines (go_goroutines) are back
// within a small margin and neither the agent nor the test process holds a
// network namespace fd more, the agent is still ready and stops cleanly on
// SIGTERM, CHECK passes on the stable pods, and the agent's output during
// the churn is log records only, none a warning or an error, and none names
// a churned pod (the agent's endpoint GC removes none: see checkAgentLog).
//
// Latencies and counts are printed (t.Logf, so with -v) as one summary
// line; they are never asserted against the wall clock. The timeouts that
// remain (a ping reply within 1s of the burst, TCP echo 10s, scrapes 15s)
// only catch traffic that is lost or an agent that does not answer.
//
// Sizes: N=100 cycles, P=8 in parallel by default (part of `make test`).
// For the long run set UNDERPASS_SOAK_CYCLES (and optionally
// UNDERPASS_SOAK_PARALLEL):
//
//	sudo UNDERPASS_SOAK_CYCLES=2000 go test -count=1 -timeout 60m -v -run TestChurn ./test/soak
//
// TestChurnAcrossAgentKills runs the same churn while underpassd is
// SIGKILLed and restarted every 400 ms (see its comment); its long run is
// UNDERPASS_SOAK_KILL_CYCLES=2000.
//
// UNDERPASS_SOAK_LOG_DIR=<dir> writes the agent's log (agent.log) and one
// line per cycle with its ADD/DEL start times and durations (cycles.tsv)
// there. UNDERPASS_RACE=1 builds the agent with the race detector, as
// test/agent does.
package soak_test

import (
	"path/filepath"
	"testing"

	"github.com/underpass-cni/underpass/internal/testutil"
)

var (
	pluginDir string // the freshly built underpass plugin
	refDir    string // the reference plugins (host-local), cached across runs
	agentBin  string // the freshly built underpassd
)

func TestMain(m *testing.M) {
	testutil.Main(m, "test/soak", func(tmp string) (err error) {
		pluginDir, agentBin = filepath.Join(tmp, "plugins"), filepath.Join(tmp, "underpassd")
		if err := testutil.BuildPlugin(filepath.Join(pluginDir, "underpass")); err != nil {
			return err
		}
		if refDir, err = testutil.ReferencePlugins(); err != nil {
			return err
		}
		return testutil.BuildAgent(agentBin)
	})
}
