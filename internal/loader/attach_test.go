package loader_test

import (
	"errors"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/underpass-cni/underpass/internal/attach"
	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
	"github.com/underpass-cni/underpass/internal/testutil"
	"github.com/underpass-cni/underpass/test/netenv"
)

// kernelHasTCX says whether the running kernel has tcx (Linux 6.6).
func kernelHasTCX(tb testing.TB) (string, bool) {
	rel, major, minor := testutil.KernelRelease(tb)
	return rel, major > 6 || major == 6 && minor >= 6
}

func progID(tb testing.TB, p *ebpf.Program) ebpf.ProgramID {
	tb.Helper()
	info, err := p.Info()
	must(tb, err)
	id, ok := info.ID()
	if !ok {
		tb.Fatal("program info without an ID")
	}
	return id
}

// egressPrograms lists the IDs of the programs on ifindex's egress in ns:
// tcx programs and our cls_bpf filters.
func egressPrograms(tb testing.TB, ns *netenv.NS, ifindex int, tcx bool) (tcxIDs []ebpf.ProgramID, legacy []*netlink.BpfFilter) {
	tb.Helper()
	if tcx {
		must(tb, ns.Do(func() error {
			res, err := link.QueryPrograms(link.QueryOptions{Target: ifindex, Attach: ebpf.AttachTCXEgress})
			if err != nil {
				return err
			}
			for _, p := range res.Programs {
				tcxIDs = append(tcxIDs, p.ID)
			}
			return nil
		}))
	}
	l, err := ns.Netlink().LinkByIndex(ifindex)
	must(tb, err)
	filters, err := ns.Netlink().FilterList(l, netlink.HANDLE_MIN_EGRESS)
	if err != nil {
		return tcxIDs, nil // no clsact qdisc: no filters
	}
	for _, f := range filters {
		if bf, ok := f.(*netlink.BpfFilter); ok && strings.HasPrefix(bf.Name, "underpass-") {
			legacy = append(legacy, bf)
		}
	}
	return tcxIDs, legacy
}

// The parent's egress attachment: tcx where the kernel has it, the legacy
// clsact qdisc + cls_bpf filter before 6.6 (Debian 12's 6.1 in the VM
// matrix). Attaching again replaces in place, also with the programs of a
// new load (the upgrade path), and detaching removes ours and only ours.
func TestAttachEgress(t *testing.T) {
	testutil.RequireRoot(t)
	rel, tcx := kernelHasTCX(t)
	dp, dir := testutil.LoadDatapathDir(t)

	env := netenv.New(t, netenv.Options{})
	u := env.Uplinks[0]
	must(t, datapath.PutParent(&dp.Maps, u.Index, u.MAC, loader.ModeMacvlan))
	must(t, datapath.SetConfig(&dp.Maps, datapath.Config{ServicesSynced: true, HostReachable: true}, 1))
	// The node's own address, as underpassd writes it: a pod frame to the
	// parent's MAC for anything else is not the host's to take.
	hosts := datapath.HostSet{}
	hosts.Add(netip.PrefixFrom(u.Node4.Addr(), 32), loader.HostLocal)
	must(t, datapath.SyncHostCIDRs(&dp.Maps, hosts))
	c := env.AddMacvlanContainer("c1", u.IP4(10), netip.Prefix{})
	_, err := datapath.Register(&dp.Maps, datapath.Endpoint{
		ContainerID: "attach-egress", IfName: "eth0", ParentIfindex: u.Index, Ifindex: c.Index,
		Mode: loader.ModeMacvlan, MAC: c.MAC, Addrs: []netip.Prefix{c.IP4},
	})
	must(t, err)

	attachParent := func(dp *loader.Objects) attach.Attachment {
		t.Helper()
		var att attach.Attachment
		must(t, env.Node.Do(func() error {
			var err error
			att, err = attach.Egress(dp.EgressTarget(attach.RoleParent, u.Index))
			return err
		}))
		return att
	}
	// check: exactly one program on the egress, prog.
	check := func(step string, prog *ebpf.Program) {
		t.Helper()
		want := progID(t, prog)
		ids, filters := egressPrograms(t, env.Node, u.Index, tcx)
		if tcx {
			if len(ids) != 1 || ids[0] != want || len(filters) != 0 {
				t.Fatalf("%s: tcx programs %v and legacy filters %d, want only program %d", step, ids, len(filters), want)
			}
			return
		}
		if len(filters) != 1 {
			t.Fatalf("%s: %d underpass cls_bpf filters on egress, want 1", step, len(filters))
		}
		f := filters[0]
		if ebpf.ProgramID(f.Id) != want || !f.DirectAction || f.Name != "underpass-parent" {
			t.Fatalf("%s: filter %+v, want direct-action underpass-parent running program %d", step, f, want)
		}
	}

	att := attachParent(dp)
	wantMode := attach.Legacy
	if tcx {
		wantMode = attach.TCX
	}
	if att.Mode != wantMode {
		t.Fatalf("kernel %s: attached with %s, want %s", rel, att.Mode, wantMode)
	}
	t.Logf("kernel %s: parent egress attached with %s", rel, att.Mode)
	check("attach", dp.Programs.ParentEgress)
	netenv.MustPing(t, env.Node, c.IP4.Addr(), 3) // the hairpin runs

	if again := attachParent(dp); again.Mode != wantMode {
		t.Fatalf("re-attach with %s, want %s", again.Mode, wantMode)
	}
	check("re-attach", dp.Programs.ParentEgress)

	// An upgrade: a new load into the same pins, then attach replaces the
	// running program without a moment with none.
	dp2, err := loader.Load(dir, loader.Options{})
	must(t, err)
	t.Cleanup(func() { dp2.Close() })
	if progID(t, dp2.Programs.ParentEgress) == progID(t, dp.Programs.ParentEgress) {
		t.Fatal("the second load returned the same program")
	}
	// EgressCurrent (what the plugin asks before it attaches): the old
	// load's program is running, not the new one's.
	if current := attach.EgressCurrent(dp2.EgressTarget(attach.RoleParent, u.Index)); current {
		t.Fatal("EgressCurrent: true for a link that runs the previous load's program")
	}
	if current := attach.EgressCurrent(dp.EgressTarget(attach.RoleParent, u.Index)); current != tcx {
		t.Fatalf("EgressCurrent of the running program: %v, want %v (tcx: %v)", current, tcx, tcx)
	}
	attachParent(dp2)
	check("replace with a new load", dp2.Programs.ParentEgress)
	if current := attach.EgressCurrent(dp2.EgressTarget(attach.RoleParent, u.Index)); current != tcx {
		t.Fatalf("EgressCurrent after the upgrade: %v, want %v", current, tcx)
	}
	netenv.MustPing(t, env.Node, c.IP4.Addr(), 3)

	// Somebody else's filter on the same hook survives our detach.
	if !tcx {
		other := &netlink.BpfFilter{
			FilterAttrs: netlink.FilterAttrs{LinkIndex: u.Index, Parent: netlink.HANDLE_MIN_EGRESS, Handle: 1, Protocol: unix.ETH_P_ALL, Priority: 7},
			Fd:          dp.Programs.UplinkEgress.FD(), Name: "someone-else", DirectAction: true,
		}
		must(t, env.Node.Netlink().FilterAdd(other))
	}
	must(t, env.Node.Do(func() error { return attach.DetachEgress(dp2.EgressTarget(attach.RoleParent, u.Index)) }))
	ids, filters := egressPrograms(t, env.Node, u.Index, tcx)
	if len(ids) != 0 || len(filters) != 0 {
		t.Fatalf("after detach: tcx programs %v, underpass filters %d", ids, len(filters))
	}
	if _, err := os.Stat(filepath.Join(dir, "links", "parent-egress-"+strconv.Itoa(u.Index))); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("link pin left behind: %v", err)
	}
	if attach.EgressCurrent(dp2.EgressTarget(attach.RoleParent, u.Index)) {
		t.Fatal("EgressCurrent: true after detach")
	}
	if !tcx {
		l, err := env.Node.Netlink().LinkByIndex(u.Index)
		must(t, err)
		all, err := env.Node.Netlink().FilterList(l, netlink.HANDLE_MIN_EGRESS)
		must(t, err)
		if len(all) != 1 {
			t.Fatalf("detach removed other filters: %d left, want the foreign one", len(all))
		}
	}
	must(t, env.Node.Do(func() error { return attach.DetachEgress(dp2.EgressTarget(attach.RoleParent, u.Index)) })) // idempotent
}

// xdp switched between native and generic replaces the link: an update in
// place keeps the mode it was attached in. Until December 2026 the switch
// was ignored (the debug log said the new mode). auto keeps what is there.
func TestXDPModeSwitch(t *testing.T) {
	testutil.RequireRoot(t)
	dp := testutil.LoadDatapath(t)
	env := netenv.New(t, netenv.Options{})
	u := env.Uplinks[0] // a veth: native XDP works on it
	mode := func() uint32 {
		l, err := env.Node.Netlink().LinkByIndex(u.Index)
		must(t, err)
		if l.Attrs().Xdp == nil || !l.Attrs().Xdp.Attached {
			return 0
		}
		return l.Attrs().Xdp.AttachMode
	}
	const drv, skb = 1, 2 // XDP_ATTACHED_DRV, XDP_ATTACHED_SKB
	for _, step := range []struct {
		mode attach.XDPMode
		want uint32
	}{{attach.XDPNative, drv}, {attach.XDPGeneric, skb}, {attach.XDPAuto, skb}, {attach.XDPNative, drv}} {
		must(t, env.Node.Do(func() error { _, err := attach.XDP(dp.XDPTarget(u.Index, step.mode)); return err }))
		if got := mode(); got != step.want {
			t.Fatalf("xdp %s: attached in mode %d, want %d", step.mode, got, step.want)
		}
	}
	must(t, env.Node.Do(func() error { _, err := attach.XDP(dp.XDPTarget(u.Index, attach.XDPOff)); return err }))
	if got := mode(); got != 0 {
		t.Fatalf("xdp off: attached in mode %d", got)
	}
}
