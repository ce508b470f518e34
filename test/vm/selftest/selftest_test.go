// Package selftest proves the VM harness (test/vm) gives tests what the
// project's suites need: veth, ipvlan and macvlan links through netlink, a
// SCHED_CLS program, tcx where the kernel has it (>= 6.6) and the legacy
// clsact qdisc everywhere, and bpffs at /sys/fs/bpf.
//
// The tests run on the host too (as root). There a missing link type is a
// skip naming the feature; inside the VM (UNDERPASS_IN_VM=1) it is a failure.
package selftest

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/features"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/rlimit"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/underpass-cni/underpass/internal/testutil"
)

func inVM() bool { return os.Getenv("UNDERPASS_IN_VM") == "1" }

func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (CAP_NET_ADMIN, CAP_BPF)")
	}
	if err := rlimit.RemoveMemlock(); err != nil {
		t.Fatalf("remove memlock rlimit: %v", err)
	}
}

// inNetns runs fn on a locked OS thread inside a new, empty network
// namespace, with a NETLINK_ROUTE handle opened there (xfrm is not needed
// and may be missing). The namespace and everything in it goes away after.
func inNetns(t *testing.T, fn func(h *netlink.Handle)) {
	t.Helper()
	needRoot(t)
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		t.Fatalf("get netns: %v", err)
	}
	defer orig.Close()
	ns, err := netns.New() // unshare: this thread is now in ns
	if err != nil {
		runtime.UnlockOSThread()
		t.Fatalf("new netns: %v", err)
	}
	defer func() {
		ns.Close()
		if err := netns.Set(orig); err != nil {
			// Leave the thread locked: the runtime ends it with the goroutine.
			t.Errorf("restore netns: %v", err)
			return
		}
		runtime.UnlockOSThread()
	}()
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		t.Fatalf("netlink handle: %v", err)
	}
	defer h.Close()
	if lo, err := h.LinkByName("lo"); err == nil {
		_ = h.LinkSetUp(lo)
	}
	fn(h)
}

// unsupported says whether a netlink error means the kernel lacks the link
// type (no driver built in and no module to load).
func unsupported(err error) bool {
	return errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOTSUP)
}

// addLink adds l and returns it as the kernel reports it; on the host a
// missing driver skips the test, in the VM it fails it.
func addLink(t *testing.T, h *netlink.Handle, l netlink.Link, feature string) netlink.Link {
	t.Helper()
	if err := h.LinkAdd(l); err != nil {
		if unsupported(err) && !inVM() {
			rel, _, _ := testutil.KernelRelease(t)
			t.Skipf("kernel %s has no %s link type (%v); the VM kernel matrix covers it (make test-kernels)", rel, feature, err)
		}
		t.Fatalf("add %s link %s: %v", feature, l.Attrs().Name, err)
	}
	added, err := h.LinkByName(l.Attrs().Name)
	if err != nil {
		t.Fatal(err)
	}
	return added
}

func vethPair(t *testing.T, h *netlink.Handle, a, b string) netlink.Link {
	t.Helper()
	la := addLink(t, h, &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: a}, PeerName: b}, "veth")
	lb, err := h.LinkByName(b)
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range []netlink.Link{la, lb} {
		if err := h.LinkSetUp(l); err != nil {
			t.Fatalf("set %s up: %v", l.Attrs().Name, err)
		}
	}
	return la
}

func TestVethIpvlanL2(t *testing.T) {
	inNetns(t, func(h *netlink.Handle) {
		parent := vethPair(t, h, "up0", "wire0")
		l := addLink(t, h, &netlink.IPVlan{
			LinkAttrs: netlink.LinkAttrs{Name: "ipvl0", ParentIndex: parent.Attrs().Index},
			Mode:      netlink.IPVLAN_MODE_L2,
		}, "ipvlan")
		ipv, ok := l.(*netlink.IPVlan)
		if !ok {
			t.Fatalf("ipvl0 is a %s, want ipvlan", l.Type())
		}
		if ipv.Mode != netlink.IPVLAN_MODE_L2 {
			t.Errorf("ipvl0 mode %v, want l2", ipv.Mode)
		}
		if ipv.ParentIndex != parent.Attrs().Index {
			t.Errorf("ipvl0 parent %d, want %d", ipv.ParentIndex, parent.Attrs().Index)
		}
		if ipv.HardwareAddr.String() != parent.Attrs().HardwareAddr.String() {
			t.Errorf("ipvl0 MAC %s, want the parent's %s", ipv.HardwareAddr, parent.Attrs().HardwareAddr)
		}
		if err := h.LinkSetUp(l); err != nil {
			t.Fatalf("set ipvl0 up: %v", err)
		}
	})
}

func TestDummyMacvlanBridge(t *testing.T) {
	inNetns(t, func(h *netlink.Handle) {
		parent := addLink(t, h, &netlink.Dummy{LinkAttrs: netlink.LinkAttrs{Name: "dum0"}}, "dummy")
		if err := h.LinkSetUp(parent); err != nil {
			t.Fatal(err)
		}
		l := addLink(t, h, &netlink.Macvlan{
			LinkAttrs: netlink.LinkAttrs{Name: "mv0", ParentIndex: parent.Attrs().Index},
			Mode:      netlink.MACVLAN_MODE_BRIDGE,
		}, "macvlan")
		mv, ok := l.(*netlink.Macvlan)
		if !ok || mv.Mode != netlink.MACVLAN_MODE_BRIDGE {
			t.Fatalf("mv0 is %s %+v, want macvlan bridge", l.Type(), l)
		}
		if err := h.LinkSetUp(l); err != nil {
			t.Fatal(err)
		}
	})
}

// passProgram is the smallest SCHED_CLS program: return TC_ACT_OK.
func passProgram(t *testing.T) *ebpf.Program {
	t.Helper()
	if err := features.HaveProgramType(ebpf.SchedCLS); err != nil {
		t.Fatalf("SCHED_CLS programs: %v", err)
	}
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Name:    "underpass_pass",
		Type:    ebpf.SchedCLS,
		License: "GPL",
		Instructions: asm.Instructions{
			asm.Mov.Imm(asm.R0, 0), // TC_ACT_OK
			asm.Return(),
		},
	})
	if err != nil {
		t.Fatalf("load SCHED_CLS program: %v", err)
	}
	t.Cleanup(func() { prog.Close() })
	return prog
}

func TestSchedCLSProgramRun(t *testing.T) {
	needRoot(t)
	prog := passProgram(t)
	frame := make([]byte, 64) // zero MACs, ethertype 0: the program ignores it
	ret, err := prog.Run(&ebpf.RunOptions{Data: frame})
	if err != nil {
		t.Fatalf("BPF_PROG_TEST_RUN: %v", err)
	}
	if ret != 0 {
		t.Errorf("verdict %d, want TC_ACT_OK (0)", ret)
	}
}

// TestTCX: tcx (bpf_link on the device) exists from 6.6; on 6.1 AttachTCX
// must report ErrNotSupported so the loader falls back to clsact.
func TestTCX(t *testing.T) {
	rel, major, minor := testutil.KernelRelease(t)
	want := major > 6 || major == 6 && minor >= 6
	inNetns(t, func(h *netlink.Handle) {
		parent := vethPair(t, h, "up0", "wire0")
		prog := passProgram(t)
		for _, at := range []ebpf.AttachType{ebpf.AttachTCXIngress, ebpf.AttachTCXEgress} {
			l, err := link.AttachTCX(link.TCXOptions{Interface: parent.Attrs().Index, Program: prog, Attach: at})
			switch {
			case err == nil && want:
				info, ierr := l.Info()
				if ierr != nil {
					t.Errorf("tcx link info: %v", ierr)
				} else if tcx := info.TCX(); tcx == nil || int(tcx.Ifindex) != parent.Attrs().Index {
					t.Errorf("tcx link info %+v, want ifindex %d", info, parent.Attrs().Index)
				}
				l.Close()
			case err == nil:
				l.Close()
				t.Errorf("kernel %s attached tcx %v: expected no tcx before 6.6", rel, at)
			case errors.Is(err, ebpf.ErrNotSupported) && !want:
				t.Logf("kernel %s: tcx %v not supported (%v): legacy clsact is the path", rel, at, err)
			default:
				t.Errorf("kernel %s: attach tcx %v: %v (tcx expected: %v)", rel, at, err, want)
			}
		}
	})
}

// TestClsactLegacy: the netlink path every kernel has (and the only one on
// 6.1): a clsact qdisc and direct-action cls_bpf filters on both hooks.
func TestClsactLegacy(t *testing.T) {
	inNetns(t, func(h *netlink.Handle) {
		parent := vethPair(t, h, "up0", "wire0")
		prog := passProgram(t)
		idx := parent.Attrs().Index
		qdisc := &netlink.GenericQdisc{
			QdiscAttrs: netlink.QdiscAttrs{
				LinkIndex: idx,
				Handle:    netlink.MakeHandle(0xffff, 0),
				Parent:    netlink.HANDLE_CLSACT,
			},
			QdiscType: "clsact",
		}
		if err := h.QdiscAdd(qdisc); err != nil {
			t.Fatalf("add clsact qdisc: %v", err)
		}
		for _, hook := range []uint32{netlink.HANDLE_MIN_INGRESS, netlink.HANDLE_MIN_EGRESS} {
			f := &netlink.BpfFilter{
				FilterAttrs: netlink.FilterAttrs{
					LinkIndex: idx,
					Parent:    hook,
					Handle:    1,
					Protocol:  unix.ETH_P_ALL,
					Priority:  1,
				},
				Fd:           prog.FD(),
				Name:         "underpass_pass",
				DirectAction: true,
			}
			if err := h.FilterAdd(f); err != nil {
				t.Fatalf("add cls_bpf filter on %s: %v", hookName(hook), err)
			}
			filters, err := h.FilterList(parent, hook)
			if err != nil {
				t.Fatalf("list filters: %v", err)
			}
			found := false
			for _, f := range filters {
				if bf, ok := f.(*netlink.BpfFilter); ok && bf.DirectAction && bf.Id > 0 {
					found = true
				}
			}
			if !found {
				t.Errorf("no direct-action bpf filter on %s: %+v", hookName(hook), filters)
			}
		}
	})
}

func hookName(h uint32) string {
	if h == netlink.HANDLE_MIN_INGRESS {
		return "ingress"
	}
	return "egress"
}

// TestVMEnvironment checks what the init script promises; host skips.
func TestVMEnvironment(t *testing.T) {
	if !inVM() {
		t.Skip("UNDERPASS_IN_VM unset: checks the VM's init environment")
	}
	var st unix.Statfs_t
	if err := unix.Statfs("/sys/fs/bpf", &st); err != nil {
		t.Fatal(err)
	}
	if st.Type != unix.BPF_FS_MAGIC {
		t.Fatalf("/sys/fs/bpf is fs type %#x, want bpffs", st.Type)
	}
	m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 8, MaxEntries: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	pin := fmt.Sprintf("/sys/fs/bpf/selftest-%d", os.Getpid())
	if err := m.Pin(pin); err != nil {
		t.Fatalf("pin: %v", err)
	}
	defer m.Unpin()
	m2, err := ebpf.LoadPinnedMap(pin, nil)
	if err != nil {
		t.Fatalf("load pinned: %v", err)
	}
	m2.Close()
	for _, d := range []string{"/tmp", "/var/run/netns", "/run"} {
		if st, err := os.Stat(d); err != nil || !st.IsDir() {
			t.Errorf("%s: %v", d, err)
		}
	}
	if os.Getenv("UNDERPASS_VM_KERNEL") == "" {
		t.Error("UNDERPASS_VM_KERNEL unset")
	}
	for _, mod := range []string{"ipvlan", "macvlan", "veth", "dummy", "sch_ingress", "cls_bpf", "bridge", "8021q"} {
		if _, err := os.Stat("/sys/module/" + mod); err != nil {
			t.Errorf("module %s not loaded: %v", mod, err)
		}
	}
}
