package cni

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/ip"
	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/underpass-cni/underpass/internal/loader"
)

// resolveMaster finds the parent NIC in the host netns: master, or the NIC
// of the default route.
func resolveMaster(name string) (netlink.Link, error) {
	if name == "" {
		var err error
		if name, err = defaultRouteNIC(); err != nil {
			return nil, err
		}
	}
	l, err := netlinksafe.LinkByName(name)
	var nf netlink.LinkNotFoundError
	if errors.As(err, &nf) {
		return nil, invalidConf("master %q not found: set master to an existing NIC", name)
	}
	if err != nil {
		return nil, fmt.Errorf("look up master %q: %w", name, err)
	}
	return l, nil
}

func defaultRouteNIC() (string, error) {
	// IPv4 first: on dual-stack nodes it is the usual "main" NIC.
	for _, family := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		routes, err := netlinksafe.RouteList(nil, family)
		if err != nil {
			return "", fmt.Errorf("list routes: %w", err)
		}
		for _, r := range routes {
			if r.Dst != nil && !ip.IsIPNetZero(r.Dst) {
				continue
			}
			idx := r.LinkIndex
			if idx == 0 && len(r.MultiPath) > 0 {
				idx = r.MultiPath[0].LinkIndex
			}
			if idx == 0 {
				continue
			}
			l, err := netlink.LinkByIndex(idx)
			if err != nil {
				return "", fmt.Errorf("default route NIC (ifindex %d): %w", idx, err)
			}
			return l.Attrs().Name, nil
		}
	}
	return "", invalidConf("master is not set and there is no default route to take it from: set master to the parent NIC")
}

// createSlave creates the macvlan/ipvlan slave of master straight inside
// the container netns (IFLA_NET_NS_FD) under a temporary name, then renames
// it to ifname there. Creating it in the target netns means it never
// appears in the host netns, so a plugin killed half-way leaves nothing on
// the node; the temporary name avoids clashing with names in either netns.
// The link stays down: ConfigureIface brings it up once the datapath knows
// it. On error nothing is left.
func createSlave(c *Conf, master netlink.Link, ifname string, netns ns.NetNS) (_ netlink.Link, err error) {
	tmp, err := ip.RandomVethName()
	if err != nil {
		return nil, err
	}
	attrs := netlink.NewLinkAttrs()
	attrs.Name = tmp
	attrs.ParentIndex = master.Attrs().Index
	attrs.MTU = c.MTU
	attrs.HardwareAddr = c.SlaveMAC // nil: the kernel's random one
	attrs.Namespace = netlink.NsFd(int(netns.Fd()))
	var l netlink.Link
	switch c.Kind {
	case ModeIPvlan:
		l = &netlink.IPVlan{LinkAttrs: attrs, Mode: c.IPvlanLinkMode, Flag: netlink.IPVLAN_FLAG_BRIDGE}
	default:
		l = &netlink.Macvlan{LinkAttrs: attrs, Mode: c.MacvlanLinkMode}
	}
	if err := netlink.LinkAdd(l); err != nil {
		if errors.Is(err, unix.EOPNOTSUPP) {
			return nil, fmt.Errorf("create %s on %s: %w: this kernel has no %s driver (modprobe %s)", c.Kind, master.Attrs().Name, err, c.Kind, c.Kind)
		}
		return nil, fmt.Errorf("create %s on %s: %w", c.Kind, master.Attrs().Name, err)
	}

	var created netlink.Link
	err = netns.Do(func(ns.NetNS) error {
		link, err := netlinksafe.LinkByName(tmp)
		if err != nil {
			return fmt.Errorf("find new %s %s: %w", c.Kind, tmp, err)
		}
		if err := netlink.LinkSetName(link, ifname); err != nil {
			derr := netlink.LinkDel(link)
			if errors.Is(err, unix.EEXIST) && derr == nil {
				return errorf(7, "the container already has an interface %q: use another CNI_IFNAME, or chain underpass after the plugin that made it (no master/mode/mtu/ipam keys)", ifname)
			}
			return errors.Join(fmt.Errorf("rename %s to %s: %w", tmp, ifname, err), rollbackErr(tmp, derr))
		}
		created, err = netlink.LinkByIndex(link.Attrs().Index)
		if err != nil {
			return errors.Join(fmt.Errorf("find %s after rename: %w", ifname, err), rollbackErr(ifname, netlink.LinkDel(link)))
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return created, nil
}

// rollbackErr names a failed deletion of the half-made link name, or is nil.
func rollbackErr(name string, err error) error {
	if err == nil {
		return nil
	}
	return fmt.Errorf("roll back: delete %s: %w", name, err)
}

// deleteLinkIn deletes ifname in netns; a missing link or netns is fine,
// and so is a path that is no namespace any more (attach.CheckNetns: a
// runtime unmounts the namespace before it removes the file): the link
// went with the namespace, and a DEL that failed on it would fail on
// every retry.
func deleteLinkIn(netnsPath, ifname string) error {
	err := ns.WithNetNSPath(netnsPath, func(ns.NetNS) error {
		if err := ip.DelLinkByName(ifname); err != nil && !errors.Is(err, ip.ErrLinkNotFound) {
			return err
		}
		return nil
	})
	var nsGone ns.NSPathNotExistErr
	var notNS ns.NSPathNotNSErr
	if errors.As(err, &nsGone) || errors.As(err, &notNS) {
		return nil
	}
	return err
}

// slave is what the container netns says about an adopted interface.
type slave struct {
	Ifindex     int
	MAC         net.HardwareAddr
	Kind        string // macvlan | ipvlan
	Mode        loader.Mode
	ParentIndex int // IFLA_LINK: the parent's ifindex in the parent's netns
	Up          bool
}

// inspectSlave reads ifname inside the current netns (call it from
// netns.Do).
func inspectSlave(ifname string) (*slave, error) {
	l, err := netlinksafe.LinkByName(ifname)
	var nf netlink.LinkNotFoundError
	if errors.As(err, &nf) {
		return nil, fmt.Errorf("interface %q not found in the container netns", ifname)
	}
	if err != nil {
		return nil, fmt.Errorf("look up %s in the container netns: %w", ifname, err)
	}
	s := &slave{
		Ifindex:     l.Attrs().Index,
		MAC:         l.Attrs().HardwareAddr,
		ParentIndex: l.Attrs().ParentIndex,
		Up:          l.Attrs().Flags&net.FlagUp != 0,
	}
	switch v := l.(type) {
	case *netlink.Macvlan:
		s.Kind, s.Mode = ModeMacvlan, loader.ModeMacvlan
		if v.Mode == netlink.MACVLAN_MODE_PASSTHRU {
			return nil, invalidConf("interface %q in the container is a passthru macvlan slave: %s", ifname, passthruRefused)
		}
	case *netlink.IPVlan:
		s.Kind = ModeIPvlan
		switch v.Mode {
		case netlink.IPVLAN_MODE_L3:
			s.Mode = loader.ModeIPvlanL3
		case netlink.IPVLAN_MODE_L3S:
			s.Mode = loader.ModeIPvlanL3S
		default:
			s.Mode = loader.ModeIPvlanL2
		}
	default:
		return nil, fmt.Errorf("interface %q in the container is a %s, not a macvlan or ipvlan slave: chain underpass after the macvlan or ipvlan plugin", ifname, l.Type())
	}
	if s.ParentIndex == 0 {
		return nil, fmt.Errorf("interface %q in the container has no parent link", ifname)
	}
	return s, nil
}

// resultIface finds ifname in a result: the entry with that name in the
// sandbox netns (its index, for matching IPs to it).
func resultIface(r *current.Result, ifname, netns string) (int, *current.Interface) {
	found := -1
	for i, intf := range r.Interfaces {
		if intf.Name != ifname || intf.Sandbox == "" {
			continue
		}
		if intf.Sandbox == netns {
			return i, intf
		}
		if found < 0 {
			found = i // the runtime may spell the netns path differently
		}
	}
	if found >= 0 {
		return found, r.Interfaces[found]
	}
	return -1, nil
}

// ifaceIPs are the result's addresses of interface idx (and those that name
// no interface), as prefixes with the subnet length.
func ifaceIPs(r *current.Result, idx int) ([]*current.IPConfig, []netip.Prefix, error) {
	var cfgs []*current.IPConfig
	var out []netip.Prefix
	for _, ipc := range r.IPs {
		if ipc.Interface != nil && *ipc.Interface != idx {
			continue
		}
		a, ok := netip.AddrFromSlice(ipc.Address.IP)
		if !ok {
			return nil, nil, fmt.Errorf("result address %v is not an IP address", ipc.Address.IP)
		}
		a = a.Unmap()
		bits, total := ipc.Address.Mask.Size()
		switch {
		case ipc.Address.Mask == nil:
			bits = a.BitLen()
		case a.Is4() && total == 128 && bits >= 96:
			bits -= 96 // an IPv4 address with a 16-byte mask
		}
		p, err := a.Prefix(bits)
		if err != nil {
			return nil, nil, fmt.Errorf("result address %s: %w", ipc.Address.String(), err)
		}
		// The prefix keeps the address (not masked): it names the endpoint.
		out = append(out, netip.PrefixFrom(a, p.Bits()))
		cfgs = append(cfgs, ipc)
	}
	if len(out) > loader.MaxAddrs {
		return nil, nil, fmt.Errorf("the interface has %d addresses; underpass supports at most %d per endpoint", len(out), loader.MaxAddrs)
	}
	return cfgs, out, nil
}
