//go:build linux

// Package demo holds what `make demo` (test/demo/cmd/demo) and its test
// share: the fixed names of everything the demo creates, a small network
// namespace builder, and the leftover scan that both the demo's start-up
// cleanup and the test use.
//
// Every name is fixed (not per run), so a run after a crash, a kill -9 or a
// power cut finds and removes what the previous one left: namespaces named
// Prefix*, the pin directory BPFFS, the state directory StateDir and any
// process started with a path inside StateDir.
package demo

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Fixed names of everything the demo creates.
const (
	// Prefix starts the name of every network namespace of the demo.
	Prefix = "underpass-demo-"
	// NetnsDir is where named namespaces live (as with `ip netns add`).
	NetnsDir = "/run/netns"
	// BPFFS is the demo agent's pin directory (config key bpffs), next to
	// but apart from a real install's /sys/fs/bpf/underpass.
	BPFFS = "/sys/fs/bpf/underpass-demo"
	// StateDir holds the agent config and log, the CNI conflist, host-local
	// leases, the CNI cache and the pid file. Every process the demo starts
	// has a path inside it on its command line, which is how leftovers are
	// found.
	StateDir = "/run/underpass-demo"
	// LockFile is held (flock) by a running demo; it holds its pid.
	LockFile = "/run/underpass-demo.lock"
	// MetricsAddr is the agent's metrics.listen inside the node netns.
	MetricsAddr = "127.0.0.1:9775"
	// AgentLockDir is where underpassd keeps its per-pin-directory lock
	// files (internal/agent.LockDir); the demo removes its agent's one.
	AgentLockDir = "/run/underpass"
)

// NS is a named network namespace.
type NS struct {
	Name string // Prefix + short name
	Path string // NetnsDir/Name: for nsenter --net= and CNI_NETNS
	nl   *netlink.Handle
}

// CreateNS creates the named namespace Prefix+short with lo up. The new
// namespace is entered on a throw-away locked thread that is never unlocked:
// Go ends such a thread with its goroutine, so no thread of the program is
// ever left in the wrong namespace.
func CreateNS(short string) (*NS, error) {
	name := Prefix + short
	if err := os.MkdirAll(NetnsDir, 0o755); err != nil {
		return nil, err
	}
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with the goroutine
		h, err := netns.NewNamed(name)
		if err == nil {
			h.Close()
		}
		errc <- err
	}()
	if err := <-errc; err != nil {
		if !errors.Is(err, os.ErrExist) {
			_ = DeleteNS(name)
		}
		return nil, fmt.Errorf("create netns %s: %w", name, err)
	}
	n := &NS{Name: name, Path: filepath.Join(NetnsDir, name)}
	h, err := netns.GetFromPath(n.Path)
	if err != nil {
		_ = DeleteNS(name)
		return nil, fmt.Errorf("open netns %s: %w", name, err)
	}
	defer h.Close()
	// NETLINK_ROUTE only: the default family list includes xfrm, which not
	// every kernel has.
	if n.nl, err = netlink.NewHandleAt(h, unix.NETLINK_ROUTE); err != nil {
		_ = DeleteNS(name)
		return nil, fmt.Errorf("netlink in %s: %w", name, err)
	}
	lo, err := n.nl.LinkByName("lo")
	if err == nil {
		err = n.nl.LinkSetUp(lo)
	}
	if err != nil {
		n.Close()
		_ = DeleteNS(name)
		return nil, fmt.Errorf("set lo up in %s: %w", name, err)
	}
	return n, nil
}

// Netlink is a rtnetlink handle bound to the namespace.
func (n *NS) Netlink() *netlink.Handle { return n.nl }

// Close releases the netlink handle (the namespace stays).
func (n *NS) Close() {
	if n.nl != nil {
		n.nl.Close()
		n.nl = nil
	}
}

// Do runs fn on a thread switched into the namespace. Sockets created in fn
// stay in the namespace; programs exec'd from fn start in it.
func (n *NS) Do(fn func() error) error {
	return ns.WithNetNSPath(n.Path, func(ns.NetNS) error { return fn() })
}

// Command runs name inside the namespace through `nsenter --net=`. Unlike
// `ip netns exec` it keeps the mount namespace, so /sys/fs/bpf and the pins
// in it stay visible.
func (n *NS) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "nsenter", append([]string{"--net=" + n.Path, "--", name}, args...)...)
}

// Sysctl sets /proc/sys keys inside the namespace.
func (n *NS) Sysctl(kv ...string) error {
	return n.Do(func() error {
		for i := 0; i+1 < len(kv); i += 2 {
			p := filepath.Join("/proc/sys", strings.ReplaceAll(kv[i], ".", "/"))
			if err := os.WriteFile(p, []byte(kv[i+1]), 0o644); err != nil {
				return fmt.Errorf("sysctl %s=%s in %s: %w", kv[i], kv[i+1], n.Name, err)
			}
		}
		return nil
	})
}

// AddAddr puts addr on the link named dev.
func (n *NS) AddAddr(dev string, addr netip.Prefix) error {
	l, err := n.nl.LinkByName(dev)
	if err != nil {
		return fmt.Errorf("%s in %s: %w", dev, n.Name, err)
	}
	a := &netlink.Addr{IPNet: prefixNet(addr)}
	if addr.Addr().Is6() {
		a.Flags = unix.IFA_F_NODAD
	}
	if err := n.nl.AddrAdd(l, a); err != nil {
		return fmt.Errorf("add %s to %s in %s: %w", addr, dev, n.Name, err)
	}
	return nil
}

// AddLocalRoute makes the namespace accept (and lets sockets bind to) every
// address of p without putting an address on any interface: a route of type
// local in the local table, the "AnyIP" trick. This is how the demo's node
// answers a service VIP (kube-proxy answers with DNAT, also without an
// interface address) and how its gateway plays a leak sink.
func (n *NS) AddLocalRoute(p netip.Prefix) error {
	lo, err := n.nl.LinkByName("lo")
	if err != nil {
		return err
	}
	r := &netlink.Route{
		LinkIndex: lo.Attrs().Index,
		Dst:       prefixNet(p),
		Type:      unix.RTN_LOCAL,
		Table:     unix.RT_TABLE_LOCAL,
		Scope:     netlink.SCOPE_HOST,
	}
	if err := n.nl.RouteAdd(r); err != nil {
		return fmt.Errorf("local route %s in %s: %w", p, n.Name, err)
	}
	return nil
}

// AddDefaultRoute adds a default IPv4 route via gw.
func (n *NS) AddDefaultRoute(gw netip.Addr) error {
	if err := n.nl.RouteAdd(&netlink.Route{Gw: gw.AsSlice()}); err != nil {
		return fmt.Errorf("default route via %s in %s: %w", gw, n.Name, err)
	}
	return nil
}

func prefixNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// DeleteNS removes a named namespace of the demo (name with or without
// Prefix). The kernel destroys it, and every interface in it, once nothing
// else holds it.
func DeleteNS(name string) error {
	if !strings.HasPrefix(name, Prefix) {
		name = Prefix + name
	}
	path := filepath.Join(NetnsDir, name)
	if err := unix.Unmount(path, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("unmount %s: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove %s: %w", path, err)
	}
	return nil
}

// Namespaces lists the demo's namespaces (full names).
func Namespaces() ([]string, error) {
	entries, err := os.ReadDir(NetnsDir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), Prefix) {
			out = append(out, e.Name())
		}
	}
	return out, nil
}

// Processes returns the pids of processes (other than the caller) whose
// command line names a path inside StateDir: the demo's agent and anything
// else it started.
func Processes() []int {
	entries, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		if bytes.Contains(b, []byte(StateDir+"/")) {
			out = append(out, pid)
		}
	}
	return out
}

// AgentLockFile is the lock file underpassd keeps for the demo's pin
// directory: internal/agent names it after a hash of the directory
// (underpassd-<first 8 bytes of sha256, hex>.lock) and leaves it in place
// when it exits (flock, not the file, is the lock).
func AgentLockFile() string {
	sum := sha256.Sum256([]byte(filepath.Clean(BPFFS)))
	return filepath.Join(AgentLockDir, fmt.Sprintf("underpassd-%x.lock", sum[:8]))
}

// Leftovers describes everything of the demo that exists now: namespaces,
// the pin directory, the state directory and processes. Empty means clean.
func Leftovers() []string {
	var out []string
	names, err := Namespaces()
	if err != nil {
		out = append(out, fmt.Sprintf("cannot list %s: %v", NetnsDir, err))
	}
	for _, n := range names {
		out = append(out, "netns "+n)
	}
	for _, p := range []string{BPFFS, StateDir, LockFile, AgentLockFile()} {
		if _, err := os.Lstat(p); err == nil {
			out = append(out, p)
		}
	}
	for _, pid := range Processes() {
		cmd, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		out = append(out, fmt.Sprintf("process %d: %s", pid, strings.TrimSpace(string(bytes.ReplaceAll(cmd, []byte{0}, []byte{' '})))))
	}
	return out
}
