package soak_test

import (
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestChurnAcrossAgentKills churns pods through the plugin while underpassd
// is SIGKILLed and started again over and over (the OOM killer, a node
// under pressure, a crash loop): every ADD and DEL must succeed whether
// the agent is up, down or starting (the plugin works on the pins alone),
// no ping between the stable pods and the host may be lost, and afterwards
// nothing of the churned pods is left and the last agent is ready.
//
// Sizes: UNDERPASS_SOAK_KILL_CYCLES (default 100) cycles, 8 in parallel
// (UNDERPASS_SOAK_PARALLEL), one kill every UNDERPASS_SOAK_KILL_EVERY_MS
// (default 400) with the agent down for 150 ms before it is started again.
func TestChurnAcrossAgentKills(t *testing.T) {
	cycles := envInt(t, "UNDERPASS_SOAK_KILL_CYCLES", 100)
	parallel := envInt(t, "UNDERPASS_SOAK_PARALLEL", 8)
	every := time.Duration(envInt(t, "UNDERPASS_SOAK_KILL_EVERY_MS", 400)) * time.Millisecond

	l := newLab(t)
	a, b := l.stablePod("pod-a"), l.stablePod("pod-b")
	checkStablePaths(t, l, a, b)
	time.Sleep(2500 * time.Millisecond) // the agent has seen the stable pods
	base := l.snapshot()
	wantStable(t, base, a, b)

	stop := make(chan struct{})
	var bg sync.WaitGroup
	trafficProbs := &problems{}
	pings := stablePings(l, a, b)
	for _, f := range pings {
		bg.Go(func() { f.run(t, stop, trafficProbs) })
	}
	// The killer: the agent is replaced while the churn runs. Only this
	// goroutine touches l.ag until the churn is over.
	kills := 0
	var readyAfter []time.Duration
	killerDone := make(chan struct{})
	go func() {
		defer close(killerDone)
		for {
			select {
			case <-stop:
				return
			case <-time.After(every):
			}
			l.ag.Kill()
			kills++
			time.Sleep(150 * time.Millisecond) // ADDs and DELs with no agent at all
			l.ag = l.startAgent()
			t0 := time.Now()
			l.waitReady()
			readyAfter = append(readyAfter, time.Since(t0))
		}
	}()

	run := l.churn(t, a, cycles, parallel)
	close(stop)
	<-killerDone
	bg.Wait()

	for _, f := range run.failures {
		t.Errorf("churn: %s", f)
	}
	trafficProbs.report(t, "traffic during the churn")
	if kills == 0 {
		t.Fatal("the agent was never killed: the churn was over before the first kill, the test proves nothing")
	}

	// The last agent settles (its first reconcile and GC run), then the
	// node must look as it did before the churn.
	l.waitReady()
	var after state
	deadline := time.Now().Add(20 * time.Second)
	for {
		time.Sleep(500 * time.Millisecond)
		after = l.snapshot()
		if (after.agentFDs <= base.agentFDs+fdMargin && after.goroutines <= base.goroutines+goroutineMargin) || time.Now().After(deadline) {
			break
		}
	}
	compareState(t, base, after)
	wantStable(t, after, a, b)
	for _, p := range []*pod{a, b} {
		if err := l.check(p); err != nil {
			t.Errorf("CHECK %s after the churn: %v", p.name, err)
		}
	}
	if code, body, err := l.get("/readyz"); err != nil || code != http.StatusOK {
		t.Errorf("agent not ready after the churn: %d %q %v", code, strings.TrimSpace(body), err)
	}

	var sent, lost int64
	for _, f := range pings {
		sent += f.sent.Load()
		lost += f.lost.Load()
	}
	slowest := time.Duration(0)
	for _, d := range readyAfter {
		slowest = max(slowest, d)
	}
	t.Logf("agent kills: cycles=%d parallel=%d duration=%s kills=%d (ready again within %s) failures=%d | ADD p50=%s p99=%s | DEL p50=%s p99=%s | pings sent=%d lost=%d (6 flows) | churn pod pings sent=%d lost=%d",
		cycles, parallel, run.took.Round(time.Millisecond), kills, slowest.Round(time.Millisecond), len(run.failures),
		pct(run.addDur, 0.50), pct(run.addDur, 0.99), pct(run.delDur, 0.50), pct(run.delDur, 0.99),
		sent, lost, run.sent.Load(), run.sent.Load()-run.recv.Load())
}
