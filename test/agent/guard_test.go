package agent_test

import (
	"fmt"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
	"github.com/underpass-cni/underpass/test/netenv"
)

// deadKubeconfig points at port 1 on the node netns's own loopback, where
// nothing listens: the informers can never list, so the agent never syncs.
const deadKubeconfig = `apiVersion: v1
kind: Config
clusters: [{name: dead, cluster: {server: "https://127.0.0.1:1", insecure-skip-tls-verify: true}}]
users: [{name: u, user: {token: x}}]
contexts: [{name: c, context: {cluster: dead, user: u}}]
current-context: c
`

const guardConfig = `
staleServices:
  cidrs: [10.96.0.0/16]
services:
  static: [10.96.0.1]
`

// TestStaleGuardWaitsForFirstSync: on a fresh datapath the stale guard stays
// disarmed (ServicesSynced off, nothing in a service CIDR judged stale) for as
// long as a configured source, here an unreachable Kubernetes API, has not
// synced; a live reload to the static list alone arms it.
func TestStaleGuardWaitsForFirstSync(t *testing.T) {
	l := newLab(t, netenv.Options{})
	ctr := l.AddMacvlanContainer("ctr", l.Uplinks[0].IP4(10), l.Uplinks[0].IP6(10))
	kubeconfig := filepath.Join(t.TempDir(), "kubeconfig")
	must(t, os.WriteFile(kubeconfig, []byte(deadKubeconfig), 0o600))
	l.writeConfig(guardConfig + "  kubernetes: \"true\"\n  kubeconfig: " + kubeconfig + "\n")
	ag := l.start(agentBin)

	// Running and attached, but not ready: only the service sync is missing.
	var last string
	waitFor(t, 30*time.Second, "/readyz to wait only for the service sync", func() bool {
		if ag.Exited() {
			t.Fatalf("underpassd exited: %v", ag.Err())
		}
		code, body, err := l.get("/readyz")
		last = fmt.Sprint(code, " ", strings.TrimSpace(body), " ", err)
		return err == nil && code == http.StatusServiceUnavailable &&
			strings.Contains(body, "live services not synced yet") && !strings.Contains(body, "not attached")
	})
	t.Logf("/readyz: %s", last)
	dp := l.openOnce()
	synced := func() bool {
		c, _, err := datapath.GetConfig(&dp.Maps)
		must(t, err)
		return c.ServicesSynced
	}
	l.register(dp, ctr, "ctr")
	l.waitParentAttached(l.Uplinks[0].Index)
	staleDrops := func() uint64 {
		d, err := datapath.Drops(&dp.Maps)
		must(t, err)
		return d[loader.DropStaleService].Packets
	}
	stale := netip.MustParseAddr("10.96.0.99") // in the CIDR, not live
	// disarmed checks that the guard stays disarmed through a few
	// reconcile ticks (1 s each) and judges a stale VIP not stale.
	disarmed := func(when string, ticks time.Duration) {
		t.Helper()
		d := staleDrops()
		for end := time.Now().Add(ticks * time.Second); time.Now().Before(end); time.Sleep(50 * time.Millisecond) {
			if synced() {
				t.Fatalf("%s: ServicesSynced set while the Kubernetes API has never answered", when)
			}
		}
		netenv.Ping(t, ctr.NS, stale, 3)
		if got := staleDrops() - d; got != 0 {
			t.Fatalf("%s: %d stale drops, want 0 until the informers sync", when, got)
		}
	}
	d0 := staleDrops()
	disarmed("before the first sync", 3)
	if code, body, _ := l.get("/readyz"); code == http.StatusOK {
		t.Fatalf("/readyz ok before the first sync: %q", body)
	}
	if synced() {
		t.Fatal("ServicesSynced set while the Kubernetes API has never answered")
	}

	// Static only, reloaded live (a kubeconfig with kubernetes off is
	// refused): every source has synced, the guard arms.
	l.writeConfig(guardConfig + "  kubernetes: \"false\"\n")
	l.waitMetric("underpass_config_reloads_total", `result="success"`, 1)
	waitFor(t, 10*time.Second, "ServicesSynced in the config word", synced)
	ag.waitReady()
	netenv.Ping(t, ctr.NS, stale, 3)
	if got := staleDrops() - d0; got != 3 {
		t.Fatalf("%d stale drops for 3 pings to a stale VIP once armed, want 3", got)
	}

	// Kubernetes switched on again, live: the armed set (static only)
	// lacks every ClusterIP, so the guard disarms until the informers
	// sync, which they never do here. Until December 2026 it stayed armed,
	// and every ClusterIP was stale.
	l.writeConfig(guardConfig + "  kubernetes: \"true\"\n  kubeconfig: " + kubeconfig + "\n")
	l.waitMetric("underpass_config_reloads_total", `result="success"`, 2)
	waitFor(t, 10*time.Second, "the guard disarmed", func() bool { return !synced() })
	disarmed("Kubernetes switched on", 2)

	// A restart onto Kubernetes, over a datapath armed by the static list
	// alone (the restart before the reload above would have found it so):
	// the pinned guard is not adopted either.
	l.writeConfig(guardConfig + "  kubernetes: \"false\"\n")
	l.waitMetric("underpass_config_reloads_total", `result="success"`, 3)
	waitFor(t, 10*time.Second, "ServicesSynced in the config word", synced)
	ag.stop()
	l.writeConfig(guardConfig + "  kubernetes: \"true\"\n  kubeconfig: " + kubeconfig + "\n")
	ag = l.start(agentBin)
	waitFor(t, 30*time.Second, "the restarted agent to disarm the guard", func() bool {
		if ag.Exited() {
			t.Fatalf("underpassd exited: %v", ag.Err())
		}
		return !synced()
	})
	disarmed("restarted onto Kubernetes", 2)
}
