// Package node runs a real single-node Kubernetes on this machine for the
// tests: kube-apiserver and etcd (test/k8s/kapi), kube-controller-manager
// and kube-scheduler, containerd and runc from Debian, the kubelet and
// kube-proxy built at the same Kubernetes version (test/k8s/build.sh), and
// images built here (internal/ociimage), without a registry.
package node

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"syscall"
	"testing"

	"github.com/underpass-cni/underpass/internal/testutil"
)

// Sysctls the kubelet (kernel.*, vm.*) and kube-proxy (route_localnet) set
// on the host, and ip_forward, which every Kubernetes node has on: saved at
// start, put back at teardown.
var hostSysctls = []string{
	"kernel/panic", "kernel/panic_on_oops", "vm/overcommit_memory", "vm/panic_on_oom",
	"kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes",
	"net/ipv4/ip_forward", "net/ipv4/conf/all/route_localnet",
}

// Paths the kubelet and containerd write whatever their flags say: removed
// at teardown unless they were there before.
var fixedPaths = []string{"/var/lib/kubelet", "/run/containerd", "/var/log/containers", "/var/log/pods", "/var/lib/cni", "/opt/containerd"}

// Host is what a node changes on this machine and puts back: sysctls,
// iptables (v4, v6) and the fixed paths. Save it before anything starts;
// Restore runs from the test's cleanup.
type Host struct {
	sysctls  map[string]string
	iptables map[string][]byte // iptables-save / ip6tables-save output
	tables   map[string]bool   // nftables tables ("ip filter"), iptables-nft's included
	existed  map[string]bool
	links    []string // link names
	mounts   []string // mount points
	private  []string // mount points that were private, made shared by ShareMounts
}

// SaveHost records the host state a node changes.
func SaveHost() (*Host, error) {
	h := &Host{sysctls: map[string]string{}, iptables: map[string][]byte{}, tables: map[string]bool{}, existed: map[string]bool{}}
	for _, k := range hostSysctls {
		v, err := os.ReadFile("/proc/sys/" + k)
		if err != nil {
			return nil, fmt.Errorf("save sysctl %s: %w", k, err)
		}
		h.sysctls[k] = strings.TrimSpace(string(v))
	}
	for _, tool := range []string{"iptables", "ip6tables"} {
		// iptables-legacy saves only the tables already loaded: list them
		// all first, so the restore rewrites every table the node touches.
		// (iptables-nft's tables are diffed below instead: listing would
		// create them.)
		if v, _ := exec.Command(tool, "-V").Output(); strings.Contains(string(v), "legacy") {
			for _, t := range []string{"filter", "nat", "mangle", "raw"} {
				_ = exec.Command(tool, "-t", t, "-S").Run()
			}
		}
		out, err := exec.Command(tool + "-save").Output()
		if err != nil {
			return nil, fmt.Errorf("%s-save: %w", tool, err)
		}
		h.iptables[tool] = out
	}
	tables, err := nftTables()
	if err != nil {
		return nil, err
	}
	for _, t := range tables {
		h.tables[t] = true
	}
	for _, p := range fixedPaths {
		_, err := os.Stat(p)
		h.existed[p] = err == nil
	}
	h.links, h.mounts = linkNames(), mountPoints()
	return h, nil
}

func linkNames() []string {
	out, _ := exec.Command("ip", "-o", "link", "show").Output()
	var names []string
	for _, line := range strings.Split(string(out), "\n") {
		if f := strings.Fields(line); len(f) > 1 {
			names = append(names, strings.Split(strings.TrimSuffix(f[1], ":"), "@")[0])
		}
	}
	sort.Strings(names)
	return names
}

func mountPoints() []string {
	data, _ := os.ReadFile("/proc/self/mounts")
	var points []string
	for _, line := range strings.Split(string(data), "\n") {
		if f := strings.Fields(line); len(f) > 1 {
			points = append(points, f[1])
		}
	}
	sort.Strings(points)
	return points
}

// rules are the rule and chain lines of an iptables-save output, without
// comments and counters.
func rules(save []byte) []string {
	var out []string
	for _, line := range strings.Split(string(save), "\n") {
		if strings.HasPrefix(line, "-A") || strings.HasPrefix(line, ":") {
			if i := strings.Index(line, " ["); i > 0 && strings.HasPrefix(line, ":") {
				line = line[:i]
			}
			out = append(out, line)
		}
	}
	sort.Strings(out)
	return out
}

// nftTables lists the nftables tables as "family name".
func nftTables() ([]string, error) {
	out, err := exec.Command("nft", "list", "tables").Output()
	if err != nil {
		return nil, fmt.Errorf("nft list tables: %w", err)
	}
	var ts []string
	for _, line := range strings.Split(string(out), "\n") {
		if f := strings.Fields(line); len(f) == 3 && f[0] == "table" {
			ts = append(ts, f[1]+" "+f[2])
		}
	}
	return ts, nil
}

// ShareMounts makes every mount shared, as systemd does at boot (this VM
// has no systemd: its mounts are private). containerd gives a container
// Bidirectional or HostToContainer propagation only from a shared (or
// slave) host mount, and the DaemonSet in deploy/kubernetes asks for both:
// a real node is shared. Restore makes private again what was.
func (h *Host) ShareMounts() error {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return err
	}
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		// mountinfo: id parent major:minor root point options optional... - fs
		if len(f) < 7 {
			continue
		}
		shared := false
		for _, o := range f[6:] {
			if o == "-" {
				break
			}
			shared = shared || strings.HasPrefix(o, "shared:") || strings.HasPrefix(o, "master:")
		}
		if !shared {
			h.private = append(h.private, f[4])
		}
	}
	return run(context.Background(), "mount", "--make-rshared", "/")
}

// Restore puts back what SaveHost recorded.
func (h *Host) Restore() error {
	var errs []error
	for _, m := range slices.Backward(h.private) {
		// Deepest last in mountinfo order: undo from the end. A point
		// mounted over twice is made private twice, which is harmless.
		_ = syscall.Mount("", m, "", syscall.MS_PRIVATE, "")
	}
	for k, v := range h.sysctls {
		if err := os.WriteFile("/proc/sys/"+k, []byte(v), 0o644); err != nil {
			errs = append(errs, fmt.Errorf("restore sysctl %s: %w", k, err))
		}
	}
	for tool, saved := range h.iptables {
		cmd := exec.Command(tool + "-restore")
		cmd.Stdin = bytes.NewReader(saved)
		if out, err := cmd.CombinedOutput(); err != nil {
			errs = append(errs, fmt.Errorf("%s-restore: %w: %s", tool, err, out))
		}
	}
	// Tables made since (iptables-nft's for the kubelet's and kube-proxy's
	// chains, kube-proxy's nftables mode, the agent's): iptables-restore
	// only rewrites the tables the snapshot names.
	if now, err := nftTables(); err == nil {
		for _, t := range now {
			if !h.tables[t] {
				if err := run(context.Background(), "nft", append([]string{"delete", "table"}, strings.Fields(t)...)...); err != nil {
					errs = append(errs, err)
				}
			}
		}
	} else {
		errs = append(errs, err)
	}
	for p, existed := range h.existed {
		if existed {
			continue
		}
		unmountUnder(p)
		if err := os.RemoveAll(p); err != nil {
			errs = append(errs, err)
		}
	}
	// `ip netns add` makes /run/netns a mount point the first time.
	before := map[string]bool{}
	for _, m := range h.mounts {
		before[m] = true
	}
	if m, err := filepath.EvalSymlinks("/var/run/netns"); err == nil && !before[m] && slices.Contains(mountPoints(), m) {
		_ = syscall.Unmount(m, syscall.MNT_DETACH)
	}
	// What is left is a leak: say so, so that none passes silently.
	if got := linkNames(); !slices.Equal(got, h.links) {
		errs = append(errs, fmt.Errorf("links left: %v, before %v", got, h.links))
	}
	if got := mountPoints(); !slices.Equal(got, h.mounts) {
		errs = append(errs, fmt.Errorf("mounts changed: %v, before %v", got, h.mounts))
	}
	if now, err := nftTables(); err == nil && len(now) != len(h.tables) {
		errs = append(errs, fmt.Errorf("nftables tables %v, before %v", now, h.tables))
	}
	for tool, saved := range h.iptables {
		if out, err := exec.Command(tool + "-save").Output(); err == nil && !slices.Equal(rules(out), rules(saved)) {
			errs = append(errs, fmt.Errorf("%s rules left: %v", tool, rules(out)))
		}
	}
	return errors.Join(errs...)
}

// unmountUnder lazily unmounts every mount point at or under dir, deepest
// first (the kubelet and containerd leave bind mounts and tmpfs behind when
// killed).
func unmountUnder(dir string) {
	data, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		return
	}
	var points []string
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) > 1 && (f[1] == dir || strings.HasPrefix(f[1], dir+"/")) {
			points = append(points, f[1])
		}
	}
	for i := len(points) - 1; i >= 0; i-- {
		_ = syscall.Unmount(points[i], syscall.MNT_DETACH)
	}
}

// Proc is a process of the node (containerd, the kubelet, kube-proxy).
type Proc = testutil.Proc

// StartProc starts path with args, logging to logFile (see
// testutil.StartProc: it dies with the test, and survives the thread that
// forked it).
func StartProc(path, logFile string, args ...string) (*Proc, error) {
	return testutil.StartProc(path, logFile, args...)
}

// run runs a command and returns its combined output in the error.
func run(ctx context.Context, name string, args ...string) error {
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return nil
}

// logTails prints the logs of procs when tb failed.
func logTails(tb testing.TB, procs ...*Proc) {
	if !tb.Failed() {
		return
	}
	for _, p := range procs {
		if p != nil {
			tb.Logf("%s log (%s, last 16 KiB):\n%s", p.Name, p.Log, p.Tail(16<<10))
		}
	}
}
