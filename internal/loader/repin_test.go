package loader_test

import (
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/underpass-cni/underpass/internal/attach"
	"github.com/underpass-cni/underpass/internal/loader"
	"github.com/underpass-cni/underpass/internal/testutil"
	"github.com/underpass-cni/underpass/test/netenv"
)

// Pins removed under a loaded datapath (rm -rf of the pin dir, a tool that
// unpins one map) are restored by Repin with the same objects: Open then
// finds the maps and programs the running datapath uses, by ID.
func TestRepin(t *testing.T) {
	testutil.RequireRoot(t)
	root := testutil.MountBPFFS(t)
	dir := filepath.Join(root, "underpass")
	dp, err := loader.Load(dir, loader.Options{})
	must(t, err)
	t.Cleanup(func() { dp.Close() })
	want := objectIDs(t, dp)
	layout := pinLayout(t, dir)

	if got := dp.MissingPins(); len(got) != 0 {
		t.Fatalf("fresh load: missing pins %v", got)
	}
	if got, err := dp.Repin(); err != nil || len(got) != 0 {
		t.Fatalf("repin with nothing missing: %v %v", got, err)
	}

	// Every step twice: a second repin of the same objects must pin too.
	steps := []struct {
		name   string
		remove []string // relative to dir; "." is dir itself
		want   []string // what Repin reports
	}{
		{"one map", []string{"endpoints"}, []string{"endpoints"}},
		{"one map again", []string{"endpoints"}, []string{"endpoints"}},
		{"a map and a program", []string{"parents", "progs/parent_egress"}, []string{"parents", "progs/parent_egress"}},
		{"progs dir", []string{"progs"}, progNames()},
		{"contents", entries(t, dir), allNames()},
		{"directory", []string{"."}, allNames()},
		{"directory again", []string{"."}, allNames()},
	}
	for _, s := range steps {
		for _, rel := range s.remove {
			must(t, os.RemoveAll(filepath.Join(dir, rel)))
		}
		if _, err := loader.Open(dir); err == nil {
			t.Fatalf("%s: Open works with pins removed", s.name)
		}
		missing := dp.MissingPins()
		slices.Sort(missing)
		if !slices.Equal(missing, s.want) {
			t.Fatalf("%s: MissingPins %v, want %v", s.name, missing, s.want)
		}
		restored, err := dp.Repin()
		if err != nil {
			t.Fatalf("%s: %v", s.name, err)
		}
		slices.Sort(restored)
		if !slices.Equal(restored, s.want) {
			t.Fatalf("%s: Repin restored %v, want %v", s.name, restored, s.want)
		}
		dp2, err := loader.Open(dir)
		if err != nil {
			t.Fatalf("%s: Open after Repin: %v", s.name, err)
		}
		got := objectIDs(t, dp2)
		dp2.Close()
		if !maps.Equal(got, want) {
			t.Fatalf("%s: Open after Repin sees other objects:\n got %v\nwant %v", s.name, got, want)
		}
		if l := pinLayout(t, dir); !slices.Equal(l, layout) {
			t.Fatalf("%s: pins after Repin %v, want %v (as Load made them)", s.name, l, layout)
		}
		if left, _ := filepath.Glob(filepath.Join(root, "*_loading_*")); len(left) != 0 {
			t.Fatalf("%s: temp dirs left: %v", s.name, left)
		}
	}

	// The loaded objects are still the datapath's: a new Load adopts the
	// restored maps.
	dp3, err := loader.Load(dir, loader.Options{})
	must(t, err)
	defer dp3.Close()
	for name, id := range objectIDs(t, dp3) {
		if !strings.HasPrefix(name, "progs/") && want[name] != id {
			t.Fatalf("Load after Repin: map %s is %d, want the restored %d", name, id, want[name])
		}
	}
}

// objectIDs returns the kernel IDs of dp's maps ("parents") and programs
// ("progs/parent_egress").
func objectIDs(tb testing.TB, dp *loader.Objects) map[string]uint32 {
	tb.Helper()
	out := map[string]uint32{}
	for name, m := range mapsOf(dp) {
		info, err := m.Info()
		must(tb, err)
		id, ok := info.ID()
		if !ok {
			tb.Fatalf("map %s: no ID", name)
		}
		out[name] = uint32(id)
	}
	for name, p := range progsOf(dp) {
		out["progs/"+name] = uint32(progID(tb, p))
	}
	return out
}

func mapsOf(dp *loader.Objects) map[string]*ebpf.Map {
	m := &dp.Maps
	return map[string]*ebpf.Map{
		"config": m.Config, "parents": m.Parents, "ep_by_mac": m.EpByMac, "ep_by_ip": m.EpByIp,
		"endpoints": m.Endpoints, "ep_stats": m.EpStats, "stats": m.Stats, "drops": m.Drops,
		"svc_cidrs": m.SvcCidrs, "live_svcs": m.LiveSvcs, "host_cidrs": m.HostCidrs, "trace": m.Trace,
		"events": m.Events, "prefilter": m.Prefilter, "ep_progs": m.EpProgs, "ep_names": m.EpNames,
		"wire_addrs": m.WireAddrs, "svc_flows": m.SvcFlows,
		"svc_frontends": m.SvcFrontends, "svc_slots": m.SvcSlots, "svc_backends": m.SvcBackends, "svc_ct": m.SvcCt,
		"svc_rev": m.SvcRev, "svc_affinity": m.SvcAffinity, "svc_stats": m.SvcStats,
		"svc_counters": m.SvcCounters, "svc_names": m.SvcNames, "svc_frags": m.SvcFrags,
	}
}

func progsOf(dp *loader.Objects) map[string]*ebpf.Program {
	p := &dp.Programs
	return map[string]*ebpf.Program{
		"parent_egress": p.ParentEgress, "uplink_egress": p.UplinkEgress, "endpoint_ingress": p.EndpointIngress,
		"endpoint_egress": p.EndpointEgress, "ep_ingress_body": p.EpIngressBody,
		"ep_egress_body": p.EpEgressBody, "parent_xdp": p.ParentXdp,
	}
}

func allNames() []string {
	var names []string
	for name := range mapsOf(&loader.Objects{}) {
		names = append(names, name)
	}
	names = append(names, progNames()...)
	slices.Sort(names)
	return names
}

func progNames() []string {
	var names []string
	for name := range progsOf(&loader.Objects{}) {
		names = append(names, "progs/"+name)
	}
	slices.Sort(names)
	return names
}

// entries lists the names in dir.
func entries(tb testing.TB, dir string) []string {
	tb.Helper()
	es, err := os.ReadDir(dir)
	must(tb, err)
	var names []string
	for _, e := range es {
		names = append(names, e.Name())
	}
	return names
}

// pinLayout lists every path under dir, relative to it.
func pinLayout(tb testing.TB, dir string) []string {
	tb.Helper()
	var out []string
	must(tb, filepath.WalkDir(dir, func(path string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, path)
		out = append(out, rel)
		return nil
	}))
	slices.Sort(out)
	return out
}

// A removed link pin is restored by pinning the link again while it is
// still attached (someone else held it open), and by attaching afresh once
// the removal detached it.
func TestRestoreLinks(t *testing.T) {
	testutil.RequireRoot(t)
	if rel, tcx := kernelHasTCX(t); !tcx {
		testutil.SkipIfNotSupported(t, testutil.NotSupported("tcx", fmt.Errorf("kernel %s", rel)))
	}
	dp, dir := testutil.LoadDatapathDir(t)
	env := netenv.New(t, netenv.Options{})
	u := env.Uplinks[0]
	inNode := func(fn func() error) { t.Helper(); must(t, env.Node.Do(fn)) }
	inNode(func() error { _, err := attach.Egress(dp.EgressTarget(attach.RoleParent, u.Index)); return err })
	inNode(func() error { _, err := attach.XDP(dp.XDPTarget(u.Index, attach.XDPAuto)); return err })
	pins := []string{attach.LinkPin(dir, attach.RoleParent, u.Index), attach.XDPLinkPin(dir, u.Index)}
	restore := func(step string, wantAdopted bool) {
		t.Helper()
		inNode(func() error {
			for i, fn := range []func() (bool, error){
				func() (bool, error) { return attach.RestoreEgress(dp.EgressTarget(attach.RoleParent, u.Index)) },
				func() (bool, error) { return attach.RestoreXDP(dp.XDPTarget(u.Index, attach.XDPAuto)) },
			} {
				adopted, err := fn()
				if err != nil {
					return fmt.Errorf("%s: restore %s: %w", step, pins[i], err)
				}
				if adopted != wantAdopted {
					return fmt.Errorf("%s: restore %s: adopted %v, want %v", step, pins[i], adopted, wantAdopted)
				}
			}
			return nil
		})
	}
	// attached checks the programs on the parent and returns the link IDs.
	attached := func(step string) []link.ID {
		t.Helper()
		ids, _ := egressPrograms(t, env.Node, u.Index, true)
		if len(ids) != 1 || ids[0] != progID(t, dp.Programs.ParentEgress) {
			t.Fatalf("%s: tcx egress programs %v, want only parent_egress", step, ids)
		}
		l, err := env.Node.Netlink().LinkByIndex(u.Index)
		must(t, err)
		if x := l.Attrs().Xdp; x == nil || ebpf.ProgramID(x.ProgId) != progID(t, dp.Programs.ParentXdp) {
			t.Fatalf("%s: xdp %+v, want parent_xdp", step, x)
		}
		return pinnedLinkIDs(t, pins)
	}
	ids0 := attached("attached")

	// Removed while another process holds the links: they stay attached,
	// and attaching again would fail (tcx: EEXIST, XDP: EBUSY).
	var holders []link.Link
	for _, pin := range pins {
		l, err := link.LoadPinnedLink(pin, nil)
		must(t, err)
		holders = append(holders, l)
		must(t, os.Remove(pin))
	}
	restore("links held open", true)
	if ids := attached("links held open"); !slices.Equal(ids, ids0) {
		t.Fatalf("links held open: links %v after restore, want the same %v", ids, ids0)
	}
	for _, l := range holders {
		must(t, l.Close())
	}
	attached("holders closed") // the restored pins keep them

	// Removed with nothing else holding them: the kernel detaches them.
	for _, pin := range pins {
		must(t, os.Remove(pin))
	}
	// The kernel drops a pin's reference after an RCU grace period.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		ids, _ := egressPrograms(t, env.Node, u.Index, true)
		if len(ids) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("tcx programs %v still attached 10s after their only pin was removed", ids)
		}
	}
	restore("links gone", false)
	if ids := attached("links gone"); slices.Equal(ids, ids0) {
		t.Fatalf("links gone: restored links %v are the old ones", ids)
	}
}

func pinnedLinkIDs(tb testing.TB, pins []string) []link.ID {
	tb.Helper()
	var ids []link.ID
	for _, pin := range pins {
		l, err := link.LoadPinnedLink(pin, nil)
		must(tb, err)
		info, err := l.Info()
		l.Close()
		must(tb, err)
		ids = append(ids, info.ID)
	}
	return ids
}
