package agent_test

// Faults under the real underpassd: pins removed from its bpffs dir, the
// parent NIC deleted and re-created, the agent SIGKILLed under load. Each
// test checks traffic, the agent's log and what is left in the pin dir.
// Times are printed, never asserted: other tests share the CPUs.

import (
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"

	"github.com/underpass-cni/underpass/internal/attach"
	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
	"github.com/underpass-cni/underpass/test/netenv"
)

// The agent's log lines for a repair (internal/agent/pins.go).
const (
	msgPinsRestored  = `msg="pins removed from under the agent; pinned the running maps and programs again"`
	msgLinksRestored = `msg="link pins removed from under the agent; restored the attachments"`
	msgRecreated     = `msg="parent re-created: program re-attached and endpoints moved"`
)

// faultDeadline bounds every wait for a repair: the agent checks every
// second, but other tests may be using both CPUs.
const faultDeadline = 30 * time.Second

// TestPinsRemoved removes pins from under a running agent with a parent
// attached and a registered endpoint, one fault after the other: a map pin,
// the parent's link pin, everything in the pin dir, the pin dir itself, and
// hides them under a fresh bpffs. Each time the plugin's loader.Open must
// work again on the same maps, the hairpin must carry traffic again, the
// repair must be logged and counted, and the pin dir must look as before,
// with no temp names left. Last, a repair that cannot work (a tmpfs over
// the dir) must fail /readyz with the reason until the tmpfs goes.
func TestPinsRemoved(t *testing.T) {
	r := setup(t)
	eth0 := r.Uplinks[0]
	netenv.MustPing(t, r.Node, r.ctr.IP4.Addr(), 5)
	ids0 := datapathIDs(t, r.dir)
	layout0 := pinTree(t, r.dir)
	linkPins := 0
	for _, p := range layout0 {
		if strings.HasPrefix(p, "links/") {
			linkPins++ // parent tc egress and, where XDP attached, parent xdp
		}
	}
	t.Logf("pins as loaded: %v", layout0)
	egressPin := attach.LinkPin(r.dir, attach.RoleParent, eth0.Index)
	var unmountBPF func()

	faults := []struct {
		name   string
		remove func() error
		pins   float64 // how much underpass_agent_repairs_total{what="pins"} grows
		links  float64 // and {what="links"}
		breaks bool    // the hairpin stops until the agent re-attaches
	}{
		{"remove one map pin (endpoints)", func() error { return os.Remove(filepath.Join(r.dir, "endpoints")) }, 1, 0, false},
		{"remove the parent's link pin", func() error { return os.Remove(egressPin) }, 0, 1, true},
		{"remove everything in the pin dir", func() error { return removeContents(r.dir) }, 1, float64(linkPins), true},
		{"remove the pin dir (rm -rf)", func() error { return os.RemoveAll(r.dir) }, 1, float64(linkPins), true},
		// Hidden, not removed: the links under the mount stay attached and
		// are pinned again in the new bpffs, not attached twice.
		{"mount a fresh bpffs over the pin dir", func() error { unmountBPF = mountOver(t, r.dir, "bpf"); return nil }, 1, float64(linkPins), false},
	}
	for _, f := range faults {
		t.Logf("--- %s", f.name)
		pins0 := r.metric("underpass_agent_repairs_total", `what="pins"`)
		links0 := r.metric("underpass_agent_repairs_total", `what="links"`)
		logPins0 := strings.Count(r.ag.Out.String(), msgPinsRestored)
		logLinks0 := strings.Count(r.ag.Out.String(), msgLinksRestored)

		pings := startPings(t, r, 600)
		time.Sleep(200 * time.Millisecond) // traffic flows before the fault
		at := time.Now()
		if err := f.remove(); err != nil {
			t.Fatalf("%s: %v", f.name, err)
		}
		dp := waitOpen(t, r.dir)
		openAgain := time.Since(at)
		waitFor(t, faultDeadline, "parent link pinned again", func() bool { return pinExists(egressPin) })
		linkAgain := time.Since(at)
		ids := objectIDs(t, dp)
		if !reflect.DeepEqual(ids, ids0) {
			t.Fatalf("%s: after the repair loader.Open sees other objects:\n got %v\nwant %v", f.name, ids, ids0)
		}
		pings.wait()
		t.Logf("%s: loader.Open worked again after %s, the parent link was pinned after %s; traffic %s",
			f.name, openAgain.Round(time.Millisecond), linkAgain.Round(time.Millisecond), pings)
		if !f.breaks && pings.lost() != 0 {
			t.Fatalf("%s: traffic broke, and nothing it needs was removed: %s", f.name, pings)
		}
		netenv.MustPing(t, r.Node, r.ctr.IP4.Addr(), 10)
		netenv.MustPing(t, r.ctr.NS, r.nodeIP(), 10)

		r.waitMetric("underpass_agent_repairs_total", `what="pins"`, pins0+f.pins)
		r.waitMetric("underpass_agent_repairs_total", `what="links"`, links0+f.links)
		out := r.ag.Out.String()
		if got := strings.Count(out, msgPinsRestored) - logPins0; got != int(f.pins) {
			t.Fatalf("%s: %d pin repair warnings logged, want %v", f.name, got, f.pins)
		}
		if got := strings.Count(out, msgLinksRestored) - logLinks0; (got > 0) != (f.links > 0) {
			t.Fatalf("%s: %d link repair warnings logged, want them when links were re-attached (%v)", f.name, got, f.links)
		}
		checkPinDir(t, f.name, r.dir, layout0)
		checkOneParentProgram(t, r.lab, eth0.Index)
		if code, body, err := r.get("/readyz"); err != nil || code != http.StatusOK {
			t.Fatalf("%s: /readyz after the repair: %d %q %v", f.name, code, body, err)
		}
	}

	if !strings.Contains(r.ag.Out.String(), "(still attached: pinned again)") {
		t.Fatal("the links hidden by the mount were not adopted")
	}
	// Unmounted, the pins underneath are back: nothing to repair.
	pins0 := r.metric("underpass_agent_repairs_total", `what="pins"`)
	unmountBPF()
	checkPinDir(t, "bpffs unmounted", r.dir, layout0)
	if ids := datapathIDs(t, r.dir); !reflect.DeepEqual(ids, ids0) {
		t.Fatalf("bpffs unmounted: loader.Open sees other objects:\n got %v\nwant %v", ids, ids0)
	}
	time.Sleep(2 * time.Second) // two checks
	if v := r.metric("underpass_agent_repairs_total", `what="pins"`); v != pins0 {
		t.Fatalf("repairs{what=pins} %v -> %v after the mount went, with nothing missing", pins0, v)
	}
	checkOneParentProgram(t, r.lab, eth0.Index)

	// The plugin's path works on the restored pins: a new pod is registered
	// through loader.Open and reached through the re-attached hairpin.
	dp := waitOpen(t, r.dir)
	c2 := r.AddMacvlanContainer("ctr2", eth0.IP4(13), eth0.IP6(13))
	r.register(dp, c2, "ctr2")
	netenv.MustPing(t, r.Node, c2.IP4.Addr(), 10)
	netenv.MustPing(t, c2.NS, r.nodeIP(), 10)
	t.Logf("repairs logged:\n%s", grepLines(r.ag.Out.String(), "removed from under the agent"))
	if strings.Contains(r.ag.Out.String(), "level=ERROR") {
		t.Fatalf("the agent logged errors while repairing:\n%s", grepLines(r.ag.Out.String(), "level=ERROR"))
	}

	t.Log("--- a repair that cannot work: a tmpfs mounted over the pin dir")
	unmount := mountOver(t, r.dir, "tmpfs")
	var body string
	waitFor(t, faultDeadline, "/readyz failing with the reason", func() bool {
		code, b, err := r.get("/readyz")
		body = b
		return err == nil && code == http.StatusServiceUnavailable && strings.Contains(b, "not restored")
	})
	t.Logf("/readyz said: %s", strings.TrimSpace(body))
	if v := r.metric("underpass_agent_ready", ""); v != 0 {
		t.Fatalf("underpass_agent_ready = %v while the pins cannot be restored", v)
	}
	if !strings.Contains(r.ag.Out.String(), `msg="pins removed from under the agent cannot be restored`) {
		t.Fatal("the failed repair was not logged")
	}
	// The links under the mount are still pinned: the datapath runs on.
	netenv.MustPing(t, r.Node, r.ctr.IP4.Addr(), 10)
	netenv.MustPing(t, r.ctr.NS, r.nodeIP(), 10)
	unmount()
	r.ag.waitReady()
	if ids := datapathIDs(t, r.dir); !reflect.DeepEqual(ids, ids0) {
		t.Fatalf("after the mount went: loader.Open sees other objects:\n got %v\nwant %v", ids, ids0)
	}
	checkPinDir(t, "after the mount went", r.dir, layout0)
	checkOneParentProgram(t, r.lab, eth0.Index)
	netenv.MustPing(t, r.Node, r.ctr.IP4.Addr(), 10)
	// /readyz reads the repair state from the HTTP goroutines (UNDERPASS_RACE=1).
	if out := r.ag.Out.String(); strings.Contains(out, "DATA RACE") {
		t.Fatalf("data race in the agent:\n%s", out)
	}
}

// mountOver mounts an empty filesystem of type fstype over dir, hiding the
// pins: nothing can be pinned on a tmpfs, a bpffs is a fresh place for
// them. The returned func (also run at cleanup) unmounts it.
func mountOver(t *testing.T, dir, fstype string) func() {
	t.Helper()
	if err := unix.Mount(fstype, dir, fstype, 0, "mode=0700"); err != nil {
		t.Fatalf("mount %s over %s: %v", fstype, dir, err)
	}
	var once sync.Once
	unmount := func() {
		once.Do(func() {
			if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
				t.Errorf("unmount %s: %v", dir, err)
			}
		})
	}
	t.Cleanup(unmount)
	return unmount
}

// TestParentRecreated deletes the parent NIC and re-creates it with the same
// name (a new ifindex), first under the running agent, then while the agent
// is down. The agent must attach the new NIC, move the parents entry and
// leave nothing of the old ifindex behind; a pod on the new NIC must reach
// the host and back. (TestParentEvents covers the endpoints that survive
// the deletion; this one covers traffic and leftovers.)
// An emptied ep_progs slot (bpftool map delete …/ep_progs key 1) lets
// every pod's traffic through unchecked and uncounted: the agent puts the
// program back on its next tick, counts the repair and logs it.
func TestEndpointProgramsRemoved(t *testing.T) {
	r := setup(t)
	must(t, attach.Endpoint(r.dp.EndpointTarget(r.ep, r.ctr.Path, r.ctr.Index)))
	netenv.MustPing(t, r.ctr.NS, r.nodeIP(), 3)
	tx0 := r.epTx(t)
	if tx0 < 3 {
		t.Fatalf("tx counter %d after 3 pings with the programs in place", tx0)
	}
	repairs0 := r.metric("underpass_agent_repairs_total", `what="endpoint_programs"`)
	must(t, r.dp.Maps.EpProgs.Delete(uint32(loader.EpProgEgress)))
	at := time.Now()
	r.waitMetric("underpass_agent_repairs_total", `what="endpoint_programs"`, repairs0+1)
	t.Logf("endpoint programs back in ep_progs after %s", time.Since(at).Round(time.Millisecond))
	must(t, r.dp.CheckEndpointPrograms())
	tx1 := r.epTx(t)
	netenv.MustPing(t, r.ctr.NS, r.nodeIP(), 3)
	if tx := r.epTx(t); tx < tx1+3 {
		t.Fatalf("tx counter moved %d -> %d over 3 pings after the repair", tx1, tx)
	}
	if !strings.Contains(r.ag.Out.String(), "endpoint programs removed from under the agent") {
		t.Fatalf("the repair was not logged:\n%s", r.ag.Out.String())
	}
	if code, body, err := r.get("/readyz"); err != nil || code != http.StatusOK {
		t.Fatalf("/readyz after the repair: %d %q %v", code, body, err)
	}
}

func TestParentRecreated(t *testing.T) {
	r := setup(t)
	eth0 := r.Uplinks[0]
	nl := r.Node.Netlink()
	netenv.MustPing(t, r.Node, r.ctr.IP4.Addr(), 5)

	recreate := func() (old int) {
		t.Helper()
		old = eth0.Index
		l, err := nl.LinkByIndex(old)
		if err != nil {
			t.Fatal(err)
		}
		if err := nl.LinkDel(l); err != nil {
			t.Fatal(err)
		}
		recreateUplink(t, r.lab, eth0)
		if eth0.Index == old {
			t.Fatalf("re-created %s has the old ifindex %d; the test needs a new one", eth0.Name, old)
		}
		return old
	}

	t.Log("--- agent running")
	dead := r.ctr
	old := recreate()
	at := time.Now()
	waitFor(t, faultDeadline, "parent deletion logged", func() bool {
		return strings.Contains(r.ag.Out.String(), `msg="parent interface deleted`)
	})
	pod := checkRecreated(t, r, r.ag, old, dead, "ctr2", 13)
	t.Logf("agent running: %s ifindex %d -> %d, new pod reached %s after the re-creation",
		eth0.Name, old, eth0.Index, time.Since(at).Round(time.Millisecond))

	t.Log("--- agent down")
	r.ag.Kill()
	old = recreate()
	// The dead agent could not drop the deleted parent's link pins.
	if !pinExists(attach.LinkPin(r.dir, attach.RoleParent, old)) {
		t.Fatal("no link pin of the deleted parent before the restart: the test would prove nothing")
	}
	at = time.Now()
	ag2 := r.start(agentBin)
	ag2.waitReady()
	checkRecreated(t, r, ag2, old, pod, "ctr3", 14)
	t.Logf("agent down: %s ifindex %d -> %d, new pod reached %s after the restart",
		eth0.Name, old, eth0.Index, time.Since(at).Round(time.Millisecond))
	if strings.Contains(ag2.Out.String(), `msg="parent interface is gone`) {
		t.Fatal("the restarted agent waited for a parent that had been re-created already")
	}
}

// checkRecreated checks the agent moved everything from parent ifindex old
// to the re-created NIC, that dead (a pod on the old NIC, its macvlan gone
// with it) is collected, and that a new pod works; it returns the new pod.
func checkRecreated(t *testing.T, r *rig, ag *agent, old int, dead *netenv.Container, name string, n int) *netenv.Container {
	t.Helper()
	eth0 := r.Uplinks[0]
	m := &r.dp.Maps
	r.waitParentAttached(eth0.Index)
	waitFor(t, faultDeadline, "re-creation logged", func() bool { return strings.Contains(ag.Out.String(), msgRecreated) })
	waitFor(t, faultDeadline, "parents map: only the new ifindex", func() bool {
		ps, err := datapath.Parents(m)
		_, ok := ps[eth0.Index]
		return err == nil && ok && len(ps) == 1
	})
	waitFor(t, faultDeadline, "the old pod collected", func() bool {
		eps, _ := datapath.Endpoints(m)
		for _, ep := range eps {
			if slices.Equal(ep.MAC, dead.MAC) {
				return false
			}
		}
		return true
	})
	// Nothing of the old ifindex: no link pins, no references.
	for _, pin := range []string{attach.LinkPin(r.dir, attach.RoleParent, old), attach.XDPLinkPin(r.dir, old)} {
		if pinExists(pin) {
			t.Fatalf("link pin of the deleted parent left: %s", pin)
		}
	}
	for _, att := range mustAttachments(t, r.dir) {
		if att.Ifindex != eth0.Index {
			t.Fatalf("attachment left on ifindex %d (new parent %d): %+v", att.Ifindex, eth0.Index, att)
		}
	}
	checkOneParentProgram(t, r.lab, eth0.Index)

	pod := r.AddMacvlanContainer(name, eth0.IP4(n), eth0.IP6(n))
	r.register(r.dp, pod, name)
	netenv.MustPing(t, r.Node, pod.IP4.Addr(), 10)
	netenv.MustPing(t, r.Node, pod.IP6.Addr(), 10)
	netenv.MustPing(t, pod.NS, r.nodeIP(), 10)
	eps, err := datapath.Endpoints(m)
	if err != nil {
		t.Fatal(err)
	}
	for id, ep := range eps {
		if int(ep.ParentIfindex) != eth0.Index {
			t.Fatalf("endpoint %d still on parent ifindex %d, want %d", id, ep.ParentIfindex, eth0.Index)
		}
	}
	// A deleted parent takes its link pins along: that is no repair.
	for _, what := range []string{"pins", "links"} {
		if v := r.metric("underpass_agent_repairs_total", `what="`+what+`"`); v != 0 {
			t.Fatalf("underpass_agent_repairs_total{what=%q} = %v after a parent re-creation", what, v)
		}
	}
	return pod
}

// TestAgentKilledUnderLoad SIGKILLs the agent while pings run host<->pod
// and a CNI-like loop opens the pinned datapath and registers and
// unregisters a pod: the datapath needs no agent, so nothing may be lost,
// and the restarted agent adopts what is pinned (same maps, same links)
// without adding anything.
func TestAgentKilledUnderLoad(t *testing.T) {
	r := setup(t)
	eth0 := r.Uplinks[0]
	churnCtr := r.AddMacvlanContainer("churn", eth0.IP4(12), eth0.IP6(12))
	netenv.MustPing(t, r.Node, r.ctr.IP4.Addr(), 5)
	maps0 := mapIDs(objectIDs(t, r.dp))
	links0 := linkIDs(t, r.dir)
	layout0 := pinTree(t, r.dir)

	churn := startChurn(t, r, churnCtr)
	pings := startPings(t, r, 500)
	time.Sleep(time.Second)
	r.ag.Kill()
	killed := churn.ops.Load()
	time.Sleep(1500 * time.Millisecond) // no agent at all for a while
	withoutAgent := churn.ops.Load() - killed
	ag2 := r.start(agentBin)
	took := ag2.waitReady()
	pings.wait()
	churn.stop()
	t.Logf("ready %s after the restart; traffic %s; plugin loop: %d register/unregister rounds, %d of them with no agent",
		took.Round(time.Millisecond), pings, churn.ops.Load(), withoutAgent)
	if pings.lost() != 0 {
		t.Fatalf("pings lost across SIGKILL and restart: %s", pings)
	}
	if err := churn.err(); err != nil {
		t.Fatalf("the plugin's open/register/unregister failed: %v", err)
	}
	if withoutAgent == 0 {
		t.Fatal("the plugin loop made no progress while the agent was down")
	}

	if got := mapIDs(objectIDs(t, waitOpen(t, r.dir))); !reflect.DeepEqual(got, maps0) {
		t.Fatalf("the restarted agent did not adopt the pinned maps:\n got %v\nwant %v", got, maps0)
	}
	if got := linkIDs(t, r.dir); !reflect.DeepEqual(got, links0) {
		t.Fatalf("links replaced instead of adopted: %v, before %v", got, links0)
	}
	checkPinDir(t, "after the restart", r.dir, layout0)
	checkOneParentProgram(t, r.lab, eth0.Index)
	r.waitMetric("underpass_endpoints", "", 1)
	netenv.MustPing(t, r.Node, r.ctr.IP4.Addr(), 10)
	netenv.MustPing(t, r.ctr.NS, r.nodeIP(), 10)
	// A restart is no repair: nothing was missing.
	for _, what := range []string{"pins", "links"} {
		if v := r.metric("underpass_agent_repairs_total", `what="`+what+`"`); v != 0 {
			t.Fatalf("underpass_agent_repairs_total{what=%q} = %v after a plain restart", what, v)
		}
	}
	if out := ag2.Out.String(); strings.Contains(out, msgPinsRestored) || strings.Contains(out, msgLinksRestored) {
		t.Fatal("the restarted agent logged a repair")
	}
}

// pingPair pings host->pod and pod->host at 100/s in the background.
type pingPair struct {
	wg            sync.WaitGroup
	toPod, toHost netenv.PingResult
}

func startPings(t *testing.T, r *rig, count int) *pingPair {
	p := &pingPair{}
	p.wg.Go(func() { p.toPod = netenv.Ping(t, r.Node, r.ctr.IP4.Addr(), count) })
	p.wg.Go(func() { p.toHost = netenv.Ping(t, r.ctr.NS, r.nodeIP(), count) })
	return p
}

func (p *pingPair) wait() { p.wg.Wait() }

func (p *pingPair) lost() int { return p.toPod.Lost() + p.toHost.Lost() }

// String says how long traffic was broken, from the lost pings (one every
// 10 ms).
func (p *pingPair) String() string {
	broken := 10 * time.Millisecond * time.Duration(max(p.toPod.Lost(), p.toHost.Lost()))
	return fmt.Sprintf("broken for ~%s (host->pod %d/%d lost, pod->host %d/%d lost)",
		broken, p.toPod.Lost(), p.toPod.Sent, p.toHost.Lost(), p.toHost.Sent)
}

// churn is a CNI plugin's work in a loop: open the pinned datapath,
// register a pod, unregister it.
type churn struct {
	ops  atomic.Int64
	done chan struct{}
	wg   sync.WaitGroup
	mu   sync.Mutex
	errs []error
}

func startChurn(t *testing.T, r *rig, c *netenv.Container) *churn {
	ch := &churn{done: make(chan struct{})}
	t.Cleanup(ch.stop)
	ch.wg.Go(func() {
		for {
			select {
			case <-ch.done:
				return
			default:
			}
			if err := churnOnce(r, c); err != nil {
				ch.mu.Lock()
				ch.errs = append(ch.errs, err)
				ch.mu.Unlock()
			}
			ch.ops.Add(1)
			time.Sleep(5 * time.Millisecond)
		}
	})
	return ch
}

func churnOnce(r *rig, c *netenv.Container) error {
	dp, err := loader.Open(r.dir)
	if err != nil {
		return fmt.Errorf("open: %w", err)
	}
	defer dp.Close()
	id, err := datapath.Register(&dp.Maps, datapath.Endpoint{
		ContainerID: "churn", IfName: c.IfName, Netns: c.Path,
		ParentIfindex: c.ParentIndex, ParentName: c.Parent, Ifindex: c.Index,
		Mode: loader.ModeMacvlan, MAC: c.MAC, Addrs: []netip.Prefix{c.IP4, c.IP6},
		PodName: "churn", PodNamespace: "test",
	})
	if err != nil {
		return fmt.Errorf("register: %w", err)
	}
	if err := datapath.Unregister(&dp.Maps, id); err != nil {
		return fmt.Errorf("unregister: %w", err)
	}
	return nil
}

func (ch *churn) stop() {
	select {
	case <-ch.done:
	default:
		close(ch.done)
	}
	ch.wg.Wait()
}

func (ch *churn) err() error {
	ch.mu.Lock()
	defer ch.mu.Unlock()
	return errors.Join(ch.errs...)
}

// waitOpen waits until loader.Open works on dir, as the CNI plugin's next
// ADD would.
func waitOpen(t *testing.T, dir string) *loader.Objects {
	t.Helper()
	deadline := time.Now().Add(faultDeadline)
	for {
		dp, err := loader.Open(dir)
		if err == nil {
			t.Cleanup(func() { dp.Close() })
			return dp
		}
		if time.Now().After(deadline) {
			t.Fatalf("loader.Open still fails after %s: %v", faultDeadline, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// datapathIDs opens dir and returns the IDs of its maps and programs.
func datapathIDs(t *testing.T, dir string) map[string]uint32 {
	t.Helper()
	dp, err := loader.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer dp.Close()
	return objectIDs(t, dp)
}

// objectIDs returns the kernel IDs of dp's maps (by field name) and programs
// ("prog:" and field name): the same IDs mean the same objects.
func objectIDs(t *testing.T, dp *loader.Objects) map[string]uint32 {
	t.Helper()
	out := map[string]uint32{}
	add := func(prefix string, v reflect.Value, id func(any) (uint32, error)) {
		for i := range v.NumField() {
			n, err := id(v.Field(i).Interface())
			if err != nil {
				t.Fatalf("%s%s: %v", prefix, v.Type().Field(i).Name, err)
			}
			out[prefix+v.Type().Field(i).Name] = n
		}
	}
	add("", reflect.ValueOf(dp.Maps), func(o any) (uint32, error) { return kernelID(o.(*ebpf.Map).Info()) })
	add("prog:", reflect.ValueOf(dp.Programs), func(o any) (uint32, error) { return kernelID(o.(*ebpf.Program).Info()) })
	return out
}

// kernelID is the kernel's ID of a map or a program, from what its Info
// returned.
func kernelID[I interface{ ID() (T, bool) }, T ~uint32](info I, err error) (uint32, error) {
	if err != nil {
		return 0, err
	}
	id, _ := info.ID()
	return uint32(id), nil
}

// mapIDs keeps the maps of objectIDs: programs are reloaded on every start.
func mapIDs(ids map[string]uint32) map[string]uint32 {
	out := map[string]uint32{}
	for k, v := range ids {
		if !strings.HasPrefix(k, "prog:") {
			out[k] = v
		}
	}
	return out
}

// linkIDs returns the link IDs of the link pins in dir by pin name.
func linkIDs(t *testing.T, dir string) map[string]link.ID {
	t.Helper()
	out := map[string]link.ID{}
	pins, _ := filepath.Glob(filepath.Join(dir, "links", "*"))
	for _, pin := range pins {
		l, err := link.LoadPinnedLink(pin, nil)
		if err != nil {
			t.Fatalf("open link pin %s: %v", pin, err)
		}
		info, err := l.Info()
		l.Close()
		if err != nil {
			t.Fatal(err)
		}
		out[filepath.Base(pin)] = info.ID
	}
	return out
}

// pinTree lists every path under dir, relative to it.
func pinTree(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(dir, func(path string, _ fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, path)
		// maps.debug and progs.debug are a bpffs root's own (bpf_preload).
		if rel != "." && !(filepath.Dir(path) == dir && strings.HasSuffix(rel, ".debug")) {
			out = append(out, rel)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(out)
	return out
}

// checkPinDir says the pin dir is laid out as want, with no temp names in
// it or next to it (the repair pins through temp names and renames).
func checkPinDir(t *testing.T, step, dir string, want []string) {
	t.Helper()
	if got := pinTree(t, dir); !slices.Equal(got, want) {
		t.Fatalf("%s: pins %v, want %v", step, got, want)
	}
	for _, pattern := range []string{"*_loading_*", "*_tmp", "*/*_tmp", "*/*/*_tmp"} {
		if left, _ := filepath.Glob(filepath.Join(filepath.Dir(dir), pattern)); len(left) != 0 {
			t.Fatalf("%s: temp pins left: %v", step, left)
		}
	}
}

// checkOneParentProgram says exactly one tcx program runs on the parent's
// egress, the pinned parent_egress.
func checkOneParentProgram(t *testing.T, l *lab, ifindex int) {
	t.Helper()
	want := pinnedProgramID(t, filepath.Join(l.dir, "progs", "parent_egress"))
	if got := tcxPrograms(t, l.Node, ifindex); len(got) != 1 || got[0] != want {
		t.Fatalf("tcx egress programs on ifindex %d: %v, want only parent_egress (%d)", ifindex, got, want)
	}
}

// removeContents removes what is in dir, not dir.
func removeContents(dir string) error {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	for _, e := range entries {
		if err := os.RemoveAll(filepath.Join(dir, e.Name())); err != nil {
			return err
		}
	}
	return nil
}

func pinExists(path string) bool {
	_, err := os.Lstat(path)
	return err == nil
}

func grepLines(s, sub string) string {
	var out []string
	for _, line := range strings.Split(s, "\n") {
		if strings.Contains(line, sub) {
			out = append(out, line)
		}
	}
	return strings.Join(out, "\n")
}

// A plugin's first ADD on a parent nobody had attached registers and
// attaches the parent, the agent attaches it too (it has an endpoint now),
// and the ADD then fails late: its rollback takes the parent back
// (registration and link). The agent must not count that as a repair and
// put the parent program back on a parent with no pods: it forgets the
// parent, and its XDP link with it. The rollback is the real one
// (datapath.AddEndpoint, what the plugin calls); only the failure is
// injected, after the agent has seen the parent's link pin.
func TestFailedFirstADDReleasesParent(t *testing.T) {
	l := newLab(t, netenv.Options{SecondUplink: true})
	eth1 := l.Uplinks[1]
	c := l.AddMacvlanContainerOn(eth1, "late", eth1.IP4(10), netip.Prefix{})
	// eth1 is an uplink too: its uplink program gives way to the parent
	// program while it is a parent, and must be back once it is not.
	l.writeConfig(cfgReach(true) + "uplinks: [" + eth1.Name + "]\n")
	ag := l.start(agentBin)
	ag.waitReady()
	dp := l.open()
	attached := fmt.Sprintf(`msg="parent program attached" parent=%s ifindex=%d`, eth1.Name, eth1.Index)
	netns, err := ns.GetNS(c.Path)
	must(t, err)
	defer netns.Close()
	ep := &datapath.Endpoint{ContainerID: "late", IfName: c.IfName, Netns: c.Path, Ifindex: c.Index,
		MAC: c.MAC, Addrs: []netip.Prefix{c.IP4}, ParentIfindex: eth1.Index, ParentName: eth1.Name, ParentMAC: eth1.MAC,
		Mode: loader.ModeMacvlan, PodName: "late", PodNamespace: "test"}
	late := errors.New("injected: the ADD fails after the registration")
	err = l.Node.Do(func() error {
		_, err := datapath.AddEndpoint(dp, netns, ep, datapath.AddOptions{}, func() error {
			// Not waitFor: this runs on ns.Do's goroutine, where t.Fatal
			// may not be called.
			for end := time.Now().Add(faultDeadline); !strings.Contains(ag.Out.String(), attached); time.Sleep(50 * time.Millisecond) {
				if time.Now().After(end) {
					return fmt.Errorf("the agent did not attach %s within %s", eth1.Name, faultDeadline)
				}
			}
			time.Sleep(2500 * time.Millisecond) // two ticks: the agent has seen the link pin
			return late
		})
		return err
	})
	if !errors.Is(err, late) {
		t.Fatalf("AddEndpoint: %v, want the injected failure", err)
	}
	waitFor(t, faultDeadline, "the agent acting on the parent's missing link pin", func() bool {
		out := ag.Out.String()
		return strings.Contains(out, `msg="parent released: `) || strings.Contains(out, msgLinksRestored)
	})
	time.Sleep(2500 * time.Millisecond) // and two ticks more: nothing comes back
	if strings.Contains(ag.Out.String(), msgLinksRestored) {
		t.Errorf("the rollback's detach was taken for a removed link pin and repaired")
	}
	if v := l.metric("underpass_agent_repairs_total", `what="links"`); v != 0 {
		t.Errorf(`underpass_agent_repairs_total{what="links"} = %v, want 0`, v)
	}
	for _, pin := range []string{attach.LinkPin(l.dir, attach.RoleParent, eth1.Index), attach.XDPLinkPin(l.dir, eth1.Index)} {
		if pinExists(pin) {
			t.Errorf("link pin of the released parent left: %s", pin)
		}
	}
	if !pinExists(attach.LinkPin(l.dir, attach.RoleUplink, eth1.Index)) {
		t.Errorf("%s, an uplink, has no uplink program back after the parent was released", eth1.Name)
	}
	if ids := tcxPrograms(t, l.Node, eth1.Index); len(ids) != 1 {
		t.Errorf("programs on %s's tcx egress: %v, want the uplink program alone", eth1.Name, ids)
	}
	if _, err := datapath.GetParent(&dp.Maps, eth1.Index); !errors.Is(err, datapath.ErrNoParent) {
		t.Errorf("%s still registered: %v", eth1.Name, err)
	}
	// The ADD again, succeeding: the parent is attached again, and stays.
	must(t, l.Node.Do(func() error {
		_, err := datapath.AddEndpoint(dp, netns, ep, datapath.AddOptions{}, nil)
		return err
	}))
	l.waitParentAttached(eth1.Index)
	time.Sleep(2500 * time.Millisecond)
	if _, ok := l.parentLink(eth1.Index); !ok {
		t.Errorf("%s lost its parent program after a successful ADD", eth1.Name)
	}
}
