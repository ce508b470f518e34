// Package adopt finds macvlan and ipvlan slaves that someone else made on
// the parents the agent is told about (agent config adopt.parents): Docker,
// Podman's netavark, LXC, systemd-nspawn, `ip netns` by hand. Whoever
// created the slave, the same endpoint programs, maps and counters as a
// CNI pod's then serve it: the host reaches it, it reaches the host, its
// stale Service traffic is guarded and its spoofing refused.
//
// It keeps no state of its own: what it adopted is in the pinned endpoint
// registry (network AdoptedNetwork), so a restarted agent finds it there,
// and the endpoint collector removes what died while no agent ran.
package adopt

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/underpass-cni/underpass/internal/attach"
	"github.com/underpass-cni/underpass/internal/loader"
)

// NetnsDirs are where namespaces are pinned by name: `ip netns` and
// Podman (/run/netns), Docker (its sandboxes' SandboxKey). Namespaces no
// file pins are found through /proc/<pid>/ns/net.
var NetnsDirs = []string{"/run/netns", "/var/run/docker/netns"}

// Slave is a macvlan or ipvlan interface in another network namespace
// whose lower device is one of the parents.
type Slave struct {
	Netns         string // a path to its namespace: a pin if there is one
	NetnsID       string // the namespace's device and inode: the same however reached
	IfName        string
	Ifindex       int
	MAC           net.HardwareAddr
	Mode          loader.Mode
	ParentIfindex int
	ParentName    string
	Addrs         []netip.Prefix // global unicast, sorted
	// Tentative counts the global addresses still in duplicate address
	// detection: not in Addrs until it succeeds.
	Tentative int
	// Pids are the processes in the namespace, lowest first (none seen:
	// empty): one of them names a Podman container (its parent, conmon,
	// has the container's name). All of them, not the first: anything
	// that enters the namespace (`ip netns exec`, nsenter, a probe) is a
	// process in it too, and may have the lower pid.
	Pids []int
}

// Parent is a parent to adopt the slaves of, in the scanning netns.
type Parent struct {
	Name    string
	Ifindex int
}

// ParentsByName looks up the named parents in the caller's namespace: the
// ones found, and for each one not found the lookup's error (for the
// caller to warn about, skip or refuse).
func ParentsByName(names []string) ([]Parent, map[string]error) {
	var parents []Parent
	errs := map[string]error{}
	for _, n := range names {
		l, err := netlink.LinkByName(n)
		if err != nil {
			errs[n] = err
			continue
		}
		parents = append(parents, Parent{Name: n, Ifindex: l.Attrs().Index})
	}
	return parents, errs
}

// Scan lists the slaves of parents in every network namespace but the
// caller's own. A namespace that vanishes while it is read is skipped.
func Scan(parents []Parent, dirs []string) ([]Slave, error) {
	return scan(parents, func(self string) ([]foundNS, error) { return namespaces(dirs, self), nil })
}

// scan lists the slaves of parents in the namespaces list gives (passed
// the caller's own namespace id, to leave out).
func scan(parents []Parent, list func(self string) ([]foundNS, error)) ([]Slave, error) {
	if len(parents) == 0 {
		return nil, nil
	}
	self, selfID, err := selfNS()
	if err != nil {
		return nil, err
	}
	defer self.Close()
	nss, err := list(selfID)
	if err != nil {
		return nil, err
	}
	var out []Slave
	var errs []error
	for _, n := range nss {
		s, err := scanNetns(n, int(self), parents)
		if err != nil && !gone(err) {
			errs = append(errs, fmt.Errorf("netns %s: %w", n.path, err))
		}
		out = append(out, s...)
	}
	return out, errors.Join(errs...)
}

// selfNS is the caller's network namespace, open, and its id.
func selfNS() (netns.NsHandle, string, error) {
	self, err := netns.Get()
	if err != nil {
		return 0, "", fmt.Errorf("own netns: %w", err)
	}
	id, err := nsID(int(self))
	if err != nil {
		self.Close()
		return 0, "", err
	}
	return self, id, nil
}

type foundNS struct {
	path, id string
	pids     []int // the processes in it, lowest first
}

// namespaces are the network namespaces pinned in dirs, then those of
// processes that no pin names, each once, the caller's own left out.
func namespaces(dirs []string, self string) []foundNS {
	seen := map[string]int{self: -1} // index in out
	var out []foundNS
	add := func(path string, pid int) {
		id, err := attach.NetnsID(path)
		if err != nil {
			return
		}
		if i, ok := seen[id]; ok {
			if i >= 0 && pid > 0 {
				out[i].pids = append(out[i].pids, pid)
			}
			return
		}
		seen[id] = len(out)
		n := foundNS{path: path, id: id}
		if pid > 0 {
			n.pids = []int{pid}
		}
		out = append(out, n)
	}
	for _, d := range dirs {
		entries, err := os.ReadDir(d)
		if err != nil {
			continue
		}
		for _, e := range entries {
			add(filepath.Join(d, e.Name()), 0)
		}
	}
	for _, pid := range procPids() {
		add(filepath.Join("/proc", strconv.Itoa(pid), "ns", "net"), pid)
	}
	return out
}

// procPids are the processes in /proc by number, lowest first: os.ReadDir
// sorts by name, which puts 10000 before 9999, and an unpinned namespace's
// path and name come from its first process.
func procPids() []int {
	procs, _ := os.ReadDir("/proc")
	var pids []int
	for _, p := range procs {
		if pid, err := strconv.Atoi(p.Name()); err == nil {
			pids = append(pids, pid)
		}
	}
	slices.Sort(pids)
	return pids
}

func nsID(fd int) (string, error) {
	var s unix.Stat_t
	if err := unix.Fstat(fd, &s); err != nil {
		return "", fmt.Errorf("stat netns: %w", err)
	}
	return fmt.Sprintf("%d:%d", s.Dev, s.Ino), nil
}

// scanNetns lists n's slaves of parents: links of kind macvlan or ipvlan
// whose lower device is in the scanning namespace (self) and one of
// parents. The link's IFLA_LINK_NETNSID names self as seen from n.
func scanNetns(n foundNS, self int, parents []Parent) ([]Slave, error) {
	h, err := netns.GetFromPath(n.path)
	if err != nil {
		return nil, err
	}
	defer h.Close()
	nh, err := netlink.NewHandleAt(h, unix.NETLINK_ROUTE) // only rtnetlink: xfrm or netfilter sockets may be missing (no module)
	if err != nil {
		return nil, err
	}
	defer nh.Close()
	links, err := nh.LinkList()
	if err != nil {
		return nil, err
	}
	selfNSID := -2 // asked once there is a candidate
	var out []Slave
	for _, l := range links {
		a := l.Attrs()
		mode, ok := slaveMode(l)
		if !ok || a.ParentIndex == 0 {
			continue
		}
		i := slices.IndexFunc(parents, func(p Parent) bool { return p.Ifindex == a.ParentIndex })
		if i < 0 {
			continue
		}
		if selfNSID == -2 {
			if selfNSID, err = nh.GetNetNsIdByFd(self); err != nil {
				return nil, fmt.Errorf("the scanning netns's id: %w", err)
			}
		}
		if a.NetNsID != selfNSID || selfNSID < 0 {
			continue // a lower device of the same index in a third namespace
		}
		addrs, tentative, err := globalAddrs(nh, l)
		if err != nil {
			return nil, err
		}
		out = append(out, Slave{Netns: n.path, NetnsID: n.id, IfName: a.Name, Ifindex: a.Index,
			MAC: a.HardwareAddr, Mode: mode, ParentIfindex: a.ParentIndex, ParentName: parents[i].Name, Addrs: addrs,
			Tentative: tentative, Pids: n.pids})
	}
	return out, nil
}

// Inspect is the slave ifname in the namespace at path (a file, or
// /proc/<pid>/ns/net), whose parent must be in the caller's namespace: what
// `underpassctl attach` registers.
func Inspect(path, ifname string) (*Slave, error) {
	id, err := attach.NetnsID(path)
	if err != nil {
		return nil, fmt.Errorf("netns %s: %w", path, err)
	}
	self, err := netns.Get()
	if err != nil {
		return nil, fmt.Errorf("own netns: %w", err)
	}
	defer self.Close()
	if selfID, err := nsID(int(self)); err != nil || selfID == id {
		return nil, fmt.Errorf("netns %s is this namespace: a slave to attach is in a container's", path)
	}
	h, err := netns.GetFromPath(path)
	if err != nil {
		return nil, fmt.Errorf("open netns %s: %w", path, err)
	}
	defer h.Close()
	nh, err := netlink.NewHandleAt(h, unix.NETLINK_ROUTE) // only rtnetlink: xfrm or netfilter sockets may be missing (no module)
	if err != nil {
		return nil, err
	}
	defer nh.Close()
	l, err := nh.LinkByName(ifname)
	if err != nil {
		return nil, fmt.Errorf("interface %s in %s: %w", ifname, path, err)
	}
	a := l.Attrs()
	mode, ok := slaveMode(l)
	if !ok {
		return nil, fmt.Errorf("interface %s in %s is a %s, not a macvlan or ipvlan slave", ifname, path, l.Type())
	}
	selfNSID, err := nh.GetNetNsIdByFd(int(self))
	if err != nil {
		return nil, fmt.Errorf("the host netns's id in %s: %w", path, err)
	}
	if a.NetNsID != selfNSID || selfNSID < 0 {
		return nil, fmt.Errorf("interface %s in %s: its parent is not in this network namespace", ifname, path)
	}
	parent, err := netlink.LinkByIndex(a.ParentIndex)
	if err != nil {
		return nil, fmt.Errorf("parent of %s (ifindex %d): %w", ifname, a.ParentIndex, err)
	}
	addrs, _, err := globalAddrs(nh, l)
	if err != nil {
		return nil, err
	}
	if len(addrs) == 0 {
		return nil, fmt.Errorf("interface %s in %s has no address to register yet", ifname, path)
	}
	return &Slave{Netns: path, NetnsID: id, IfName: a.Name, Ifindex: a.Index, MAC: a.HardwareAddr, Mode: mode,
		ParentIfindex: a.ParentIndex, ParentName: parent.Attrs().Name, Addrs: addrs}, nil
}

// ScanPid lists the slaves of parents in the network namespace of pid, as
// Scan would find them (the same registry name, and the namespace's pin in
// dirs as its path when one pins it), so that what an OCI hook registers
// before the container runs is what the agent's next scan keeps.
func ScanPid(parents []Parent, dirs []string, pid int) ([]Slave, error) {
	return scan(parents, func(self string) ([]foundNS, error) {
		n := foundNS{path: filepath.Join("/proc", strconv.Itoa(pid), "ns", "net"), pids: []int{pid}}
		var err error
		if n.id, err = attach.NetnsID(n.path); err != nil {
			return nil, fmt.Errorf("netns of pid %d: %w", pid, err)
		}
		if n.id == self {
			return nil, nil // a container in the host's network: nothing to adopt
		}
		if pin := pinOf(dirs, n.id); pin != "" {
			n.path = pin
		}
		return []foundNS{n}, nil
	})
}

// pinOf is the file in dirs that pins the namespace id, or "".
func pinOf(dirs []string, id string) string {
	for _, d := range dirs {
		entries, _ := os.ReadDir(d)
		for _, e := range entries {
			path := filepath.Join(d, e.Name())
			if got, err := attach.NetnsID(path); err == nil && got == id {
				return path
			}
		}
	}
	return ""
}

// NetnsPath is the namespace a user names: a path, or a pid's.
func NetnsPath(arg string) string {
	if _, err := strconv.Atoi(arg); err == nil {
		return filepath.Join("/proc", arg, "ns", "net")
	}
	return arg
}

// ContainerIDOf is the registry's name of the namespace at path.
func ContainerIDOf(path string) (string, error) {
	id, err := attach.NetnsID(path)
	if err != nil {
		return "", fmt.Errorf("netns %s: %w", path, err)
	}
	return ContainerID(&Slave{NetnsID: id}), nil
}

func slaveMode(l netlink.Link) (loader.Mode, bool) {
	switch v := l.(type) {
	case *netlink.Macvlan:
		return loader.ModeMacvlan, true
	case *netlink.IPVlan:
		switch v.Mode {
		case netlink.IPVLAN_MODE_L2:
			return loader.ModeIPvlanL2, true
		case netlink.IPVLAN_MODE_L3S:
			return loader.ModeIPvlanL3S, true
		}
		return loader.ModeIPvlanL3, true
	}
	return loader.ModeNone, false
}

// globalAddrs are l's addresses a peer can reach it at: not link-local,
// not tentative (DAD not done: not yet its own).
func globalAddrs(h *netlink.Handle, l netlink.Link) (_ []netip.Prefix, tentative int, _ error) {
	as, err := h.AddrList(l, netlink.FAMILY_ALL)
	if err != nil {
		return nil, 0, err
	}
	var out []netip.Prefix
	for _, a := range as {
		ip, ok := netip.AddrFromSlice(a.IP)
		if !ok || a.Flags&unix.IFA_F_DADFAILED != 0 {
			continue
		}
		if ip = ip.Unmap(); !ip.IsGlobalUnicast() {
			continue
		}
		if a.Flags&unix.IFA_F_TENTATIVE != 0 {
			tentative++
			continue
		}
		ones, _ := a.Mask.Size()
		out = append(out, netip.PrefixFrom(ip, ones))
	}
	slices.SortFunc(out, func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })
	return out, tentative, nil
}

// gone says a namespace or link went away while it was read.
func gone(err error) bool {
	return errors.Is(err, fs.ErrNotExist) || errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENODEV) ||
		strings.Contains(err.Error(), "no such file")
}
