package netenv

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/underpass-cni/underpass/internal/testutil"
)

// NetnsDir is where named network namespaces live, as with `ip netns add`.
const NetnsDir = "/var/run/netns"

// NS is a named network namespace of the lab.
type NS struct {
	Name string // file name under NetnsDir
	Path string // NetnsDir/Name, for nsenter --net= and CNI_NETNS

	handle *netlink.Handle
}

// Netlink returns a rtnetlink handle bound to the namespace; it stays valid
// until the lab is cleaned up.
func (n *NS) Netlink() *netlink.Handle { return n.handle }

// Do runs fn on a thread switched into the namespace. Sockets created inside
// fn stay in the namespace after Do returns.
func (n *NS) Do(fn func() error) error {
	return ns.WithNetNSPath(n.Path, func(ns.NetNS) error { return fn() })
}

// Command returns a command that runs inside the namespace through
// `nsenter --net=`. Unlike `ip netns exec` it keeps the caller's mount
// namespace, so /sys/fs/bpf (and the pins in it) stay visible.
func (n *NS) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "nsenter", append([]string{"--net=" + n.Path, "--", name}, args...)...)
}

// Exec runs a command inside the namespace and returns its output.
func (n *NS) Exec(ctx context.Context, name string, args ...string) (stdout, stderr string, err error) {
	var out, errb bytes.Buffer
	cmd := n.Command(ctx, name, args...)
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return out.String(), errb.String(), fmt.Errorf("run %s in %s: %w (stderr: %s)",
			name, n.Name, err, strings.TrimSpace(errb.String()))
	}
	return out.String(), errb.String(), nil
}

func (n *NS) String() string { return n.Name }

// createNS creates a named network namespace without switching the caller's
// thread: the work happens on a locked thread of its own, put back in its
// namespace before it is unlocked (testutil.OnOwnThread), so no thread is
// ever left in the wrong namespace.
func createNS(name string) (*NS, error) {
	if err := prepareNetnsDir(); err != nil {
		return nil, err
	}
	path := filepath.Join(NetnsDir, name)
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_RDONLY, 0o444)
	if err != nil {
		return nil, fmt.Errorf("create netns %s: %w", name, err)
	}
	f.Close()

	err = testutil.OnOwnThread(func() error {
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			return fmt.Errorf("unshare: %w", err)
		}
		self := fmt.Sprintf("/proc/%d/task/%d/ns/net", os.Getpid(), unix.Gettid())
		if err := unix.Mount(self, path, "none", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("bind mount: %w", err)
		}
		return nil
	})
	if err != nil {
		os.Remove(path)
		return nil, fmt.Errorf("create netns %s: %w", name, err)
	}

	n, err := OpenNS(name, path)
	if err != nil {
		_ = DeleteNSPath(path)
		return nil, err
	}
	return n, nil
}

// OpenNS is the named namespace mounted at path (by the lab, or by
// another tool: test/demo makes its own) with a netlink handle bound to it;
// Close releases the handle.
func OpenNS(name, path string) (*NS, error) {
	h, err := netns.GetFromPath(path)
	if err != nil {
		return nil, fmt.Errorf("open netns %s: %w", name, err)
	}
	defer h.Close()
	// NETLINK_ROUTE only: the default family list includes xfrm, which not
	// every test kernel has.
	nl, err := netlink.NewHandleAt(h, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("netlink handle in %s: %w", name, err)
	}
	return &NS{Name: name, Path: path, handle: nl}, nil
}

// Close releases the netlink handle; the namespace stays.
func (n *NS) Close() {
	if n.handle != nil {
		n.handle.Close()
		n.handle = nil
	}
}

// delete releases the namespace. The kernel destroys it (and every interface
// in it, including veth peers elsewhere) once the last reference is gone, so
// sockets opened inside it must be closed first (test cleanups run in reverse
// order, so counters and listeners registered after the lab close first).
func (n *NS) delete() error {
	n.Close()
	return DeleteNSPath(n.Path)
}

// DeleteNSPath unmounts and removes the named namespace at path; one that
// is not there is no error.
func DeleteNSPath(path string) error {
	if err := unix.Unmount(path, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("unmount netns %s: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove netns %s: %w", path, err)
	}
	return nil
}

var prepareOnce sync.Once
var prepareErr error

// prepareNetnsDir creates NetnsDir and makes it a shared mount, as
// `ip netns add` does, so namespaces mounted here propagate into mount
// namespaces cloned later (ip netns exec, containers).
func prepareNetnsDir() error {
	prepareOnce.Do(func() {
		if err := os.MkdirAll(NetnsDir, 0o755); err != nil {
			prepareErr = fmt.Errorf("create %s: %w", NetnsDir, err)
			return
		}
		err := unix.Mount("", NetnsDir, "none", unix.MS_SHARED|unix.MS_REC, "")
		if errors.Is(err, unix.EINVAL) { // not a mount point yet: bind it onto itself
			if err = unix.Mount(NetnsDir, NetnsDir, "none", unix.MS_BIND|unix.MS_REC, ""); err == nil {
				err = unix.Mount("", NetnsDir, "none", unix.MS_SHARED|unix.MS_REC, "")
			}
		}
		if err != nil {
			prepareErr = fmt.Errorf("make %s a shared mount: %w", NetnsDir, err)
		}
	})
	return prepareErr
}

// Sysctl sets /proc/sys keys (dotted, as sysctl(8) names them), given as
// key, value pairs, inside the namespace.
func (n *NS) Sysctl(kv ...string) error {
	return n.Do(func() error {
		for i := 0; i+1 < len(kv); i += 2 {
			if err := sysctl(kv[i], kv[i+1]); err != nil {
				return fmt.Errorf("%w in %s", err, n.Name)
			}
		}
		return nil
	})
}

// SetUp sets the link named dev up.
func (n *NS) SetUp(dev string) error {
	l, err := n.handle.LinkByName(dev)
	if err != nil {
		return err
	}
	return n.handle.LinkSetUp(l)
}

// AddAddr puts addr on the link named dev (IPv6 without DAD).
func (n *NS) AddAddr(dev string, addr netip.Prefix) error {
	l, err := n.handle.LinkByName(dev)
	if err != nil {
		return fmt.Errorf("%s in %s: %w", dev, n.Name, err)
	}
	if err := addAddr(n.handle, l, addr); err != nil {
		return fmt.Errorf("%w in %s", err, n.Name)
	}
	return nil
}

// AddLocalRoute makes the namespace accept (and lets sockets bind to) every
// address of p without putting an address on any interface: a route of type
// local in the local table, the "AnyIP" trick (test/demo's node answers a
// service VIP that way, as kube-proxy's DNAT does without an interface
// address, and its gateway plays a leak sink).
func (n *NS) AddLocalRoute(p netip.Prefix) error {
	lo, err := n.handle.LinkByName("lo")
	if err != nil {
		return err
	}
	r := &netlink.Route{
		LinkIndex: lo.Attrs().Index,
		Dst:       ipNet(p),
		Type:      unix.RTN_LOCAL,
		Table:     unix.RT_TABLE_LOCAL,
		Scope:     netlink.SCOPE_HOST,
	}
	if err := n.handle.RouteAdd(r); err != nil {
		return fmt.Errorf("local route %s in %s: %w", p, n.Name, err)
	}
	return nil
}

// AddDefaultRoute adds a default route via gw.
func (n *NS) AddDefaultRoute(gw netip.Addr) error {
	if err := n.handle.RouteAdd(&netlink.Route{Gw: gw.AsSlice()}); err != nil {
		return fmt.Errorf("default route via %s in %s: %w", gw, n.Name, err)
	}
	return nil
}

// sysctl writes a /proc/sys value inside the current thread's network
// namespace (call it from NS.Do: /proc/sys/net follows the opening thread).
func sysctl(key, value string) error {
	p := filepath.Join("/proc/sys", strings.ReplaceAll(key, ".", "/"))
	if err := os.WriteFile(p, []byte(value), 0o644); err != nil {
		return fmt.Errorf("sysctl %s=%s: %w", key, value, err)
	}
	return nil
}

// CleanupStale removes named namespaces left behind by crashed runs: those
// whose name is prefix + "<pid>-…" where <pid> is no longer a running
// process. Namespaces of live processes (parallel test binaries) and names
// that do not parse are left alone.
func CleanupStale(prefix string) error {
	entries, err := os.ReadDir(NetnsDir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("list %s: %w", NetnsDir, err)
	}
	var errs []error
	for _, e := range entries {
		pid, ok := ownerPID(e.Name(), prefix)
		if !ok || processAlive(pid) {
			continue
		}
		if err := DeleteNSPath(filepath.Join(NetnsDir, e.Name())); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func ownerPID(name, prefix string) (int, bool) {
	rest, ok := strings.CutPrefix(name, prefix)
	if !ok {
		return 0, false
	}
	digits, _, ok := strings.Cut(rest, "-")
	if !ok {
		return 0, false
	}
	pid, err := strconv.Atoi(digits)
	if err != nil || pid <= 0 {
		return 0, false
	}
	return pid, true
}

func processAlive(pid int) bool {
	if pid == os.Getpid() {
		return true
	}
	err := unix.Kill(pid, 0)
	return err == nil || errors.Is(err, unix.EPERM)
}
