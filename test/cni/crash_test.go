package cni_test

import (
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"

	"github.com/underpass-cni/underpass/internal/attach"
	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/test/netenv"
)

// The plugin SIGKILLed at each step of ADD (the runtime's timeout, the OOM
// killer, a node losing power): the runtime's next DEL removes everything,
// and the node's other pods never notice.
func TestKilledMidAdd(t *testing.T) {
	h, l := newMainHarness(t, "up-kill-add", true)
	stable := h.addFirstPod(l, "stable")
	for _, step := range []string{"add-link", "add-ipam", "add-register", "add-attach"} {
		t.Run(step, func(t *testing.T) {
			p := h.newPod(step)
			killAt(t, h.failpoints(t, step+"=hang"), step, func() error { _, err := h.tryAdd(l, p); return err })
			t.Setenv("UNDERPASS_FAILPOINTS", "")
			h.del(l, p)
			h.assertNoLeak(t, []*pod{stable}, p.ns)
			h.checkRegistered(t, stable)
			netenv.MustPing(t, h.env.Node, stable.ip4, 2)
		})
	}
	h.del(l, stable)
	h.assertNoLeak(t, nil, stable.ns)
}

// Killed after registering and attaching, and the runtime never sends the
// DEL but GCs (CNI 1.1): the registration and the programs go although the
// pod's netns and interface are still there.
func TestKilledMidAddThenGC(t *testing.T) {
	h, l := newMainHarness(t, "up-kill-gc", false)
	p := h.newPod("p")
	killAt(t, h.failpoints(t, "add-attach=hang"), "add-attach", func() error { _, err := h.tryAdd(l, p); return err })
	t.Setenv("UNDERPASS_FAILPOINTS", "")
	h.baselineParents() // the parent's registration is node state, kept
	id, _ := h.endpointOf(t, p)
	if err := h.gc(l); err != nil {
		t.Fatalf("GC: %v", err)
	}
	if got, _, _ := datapath.Find(&h.dp.Maps, p.id, p.ifname); got != 0 {
		t.Fatalf("endpoint %d still registered after GC", got)
	}
	if att, err := attach.InspectEndpoint(p.netns, mustIndex(t, p)); err != nil || att != (attach.EndpointFilters{}) {
		t.Fatalf("after GC, endpoint %d's interface has filters %+v (%v)", id, att, err)
	}
	// host-local v1.9.1 has no GC of its own: the lease goes with the
	// runtime's eventual DEL (or stays, as with the reference plugins).
	h.del(l, p)
	h.assertNoLeak(t, nil, p.ns)
}

// Killed at each step of DEL: the runtime retries DEL, which finishes the
// job.
func TestKilledMidDel(t *testing.T) {
	h, l := newMainHarness(t, "up-kill-del", true)
	for _, step := range []string{"del-link", "del-unregister"} {
		t.Run(step, func(t *testing.T) {
			p := h.newPod(step)
			h.add(l, p)
			h.baselineParents()
			killAt(t, h.failpoints(t, step+"=hang"), step, func() error { return h.tryDel(l, p) })
			t.Setenv("UNDERPASS_FAILPOINTS", "")
			h.del(l, p)
			h.assertNoLeak(t, nil, p.ns)
		})
	}
}

// killAt runs verb, which must reach failpoint step and hang there, kills
// the plugin with SIGKILL and checks that verb failed.
func killAt(t *testing.T, markers, step string, verb func() error) {
	t.Helper()
	errc := make(chan error, 1)
	go func() { errc <- verb() }()
	var pid int
	waitFor(t, "the plugin to reach "+step, func() bool {
		b, err := os.ReadFile(filepath.Join(markers, step))
		if err != nil || len(b) == 0 {
			return false
		}
		pid, err = strconv.Atoi(string(b))
		return err == nil
	})
	must(t, syscall.Kill(pid, syscall.SIGKILL))
	if err := <-errc; err == nil {
		t.Fatalf("the plugin was killed at %s, yet the verb succeeded", step)
	} else {
		t.Logf("killed at %s: %v", step, err)
	}
}
