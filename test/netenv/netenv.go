// Package netenv builds a small network lab for end-to-end tests out of named
// network namespaces, veth pairs, Linux bridges, macvlan and ipvlan (where
// the kernel has the driver; the VM kernel matrix does, the dev host does not):
//
//	wire netns (switch + gateway, routes between uplinks)
//	  br0  192.0.2.1/24 2001:db8:1::1/64 ── node0 ══ veth ══ eth0  node netns
//	  br1  198.51.100.1/24 2001:db8:2::1/64 ─ node1 ══ veth ══ eth1  (Options.SecondUplink)
//	  h<N>-<name> ══ veth ══ eth0  wire host netns (AddWireHost)
//	node eth0 ── macvlan (bridge) ── eth0 in a container netns (AddMacvlanContainer)
//	node eth0 ── ipvlan (l2|l3|l3s) ── eth0 in a container netns (AddIpvlanContainer;
//	             one parent carries either macvlan or ipvlan slaves, of one mode)
//	node eth0.<vid> ══ 802.1Q ══ node0.<vid> in a gateway netns vlan<vid> that
//	             forwards nothing (AddVLAN, where the kernel has 8021q; vlan.go)
//
// The node's eth0 plays the physical parent NIC. Every link the lab creates
// lives inside one of its namespaces, so deleting the namespaces removes
// everything and nothing leaks into the host's netns. Setup talks netlink
// directly; only Exec/Command shell out (through nsenter, never
// `ip netns exec`, which remounts /sys and hides /sys/fs/bpf).
//
// Sysctls (set in every lab netns before any interface exists, so new
// interfaces inherit them through "default"):
//   - net.ipv6.conf.{all,default}.accept_dad=0, plus IFA_F_NODAD on every
//     address: no test waits for duplicate address detection.
//   - net.ipv4.conf.{all,default}.rp_filter=0: reverse-path filtering is
//     inherited from the host for IPv4 and would differ between machines;
//     tests that want it set it themselves.
//   - wire and node: net.ipv4.ip_forward=1 and net.ipv6.conf.all.forwarding=1.
//     The wire routes between its subnets (a host on one uplink reaches the
//     node's address on the other); the node forwards like a Kubernetes node
//     does (kube-proxy DNAT to a remote endpoint goes back out a NIC).
package netenv

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/underpass-cni/underpass/internal/testutil"
)

// StalePrefix starts the name of every namespace a lab creates. The full
// per-lab prefix is StalePrefix + "<pid>-<random>-", which lets CleanupStale
// tell leftovers of dead processes from labs of running ones.
const StalePrefix = "up-"

// Options shapes the lab. The zero value is the default topology: one uplink
// on 192.0.2.0/24 and 2001:db8:1::/64.
type Options struct {
	Subnet4 netip.Prefix // first uplink (eth0/br0); default 192.0.2.0/24
	Subnet6 netip.Prefix // default 2001:db8:1::/64

	// SecondUplink adds eth1 on the node, wired to br1 on a second subnet.
	SecondUplink  bool
	SecondSubnet4 netip.Prefix // default 198.51.100.0/24
	SecondSubnet6 netip.Prefix // default 2001:db8:2::/64
	// DefaultViaSecond puts the node's default routes on eth1 instead of eth0.
	DefaultViaSecond bool
}

// Uplink is one node NIC and the wire bridge it is plugged into. The gateway
// holds the first address of each subnet, the node the second.
type Uplink struct {
	Name  string           // node side: eth0, eth1 (the parent NIC)
	Index int              // ifindex of Name in the node netns
	MAC   net.HardwareAddr // MAC of Name

	Bridge     string           // wire side: br0, br1
	Port       string           // wire side veth peer of Name, a port of Bridge: node0, node1
	PortIndex  int              // ifindex of Port in the wire netns
	GatewayMAC net.HardwareAddr // MAC of Bridge (fixed, so it never changes as ports come and go)

	Subnet4, Subnet6   netip.Prefix
	Gateway4, Gateway6 netip.Addr   // on Bridge
	Node4, Node6       netip.Prefix // on Name

	// A VLAN (AddVLAN): its id, the trunk it is tagged on (eth0), and the
	// VLAN's wire side: GatewayIf (node0.<VID>, holding Gateway4/6) in
	// GatewayNS, a netns of its own that forwards nothing. Zero for the
	// untagged uplinks.
	VID       int
	Trunk     string
	GatewayNS *NS
	GatewayIf string
}

// IP4 returns the n-th address of the uplink's IPv4 subnet with the subnet's
// length (n=1 is the gateway, n=2 the node), for containers and wire hosts.
func (u *Uplink) IP4(n int) netip.Prefix { return NthAddr(u.Subnet4, n) }

// IP6 is IP4 for IPv6.
func (u *Uplink) IP6(n int) netip.Prefix { return NthAddr(u.Subnet6, n) }

// NthAddr returns the n-th address of p with p's length (n=1: the first
// after the network address).
func NthAddr(p netip.Prefix, n int) netip.Prefix {
	a := p.Masked().Addr()
	for range n {
		a = a.Next()
	}
	return netip.PrefixFrom(a, p.Bits())
}

// Env is a running lab. Everything in it is removed when the test ends.
type Env struct {
	Prefix  string // namespace name prefix of this lab
	Wire    *NS
	Node    *NS
	Uplinks []*Uplink // Uplinks[0] is eth0
	VLANs   []*Uplink // VLAN sub-interfaces, in AddVLAN order

	tb    testing.TB
	mu    sync.Mutex
	nss   []*NS
	hosts int
}

// Container is an endpoint netns: a macvlan container or a wire host.
type Container struct {
	*NS
	IfName string // eth0
	Index  int    // ifindex of IfName inside the container
	MAC    net.HardwareAddr
	IP4    netip.Prefix // zero when the family is not configured
	IP6    netip.Prefix
	// Parent is, for a macvlan container, the node NIC it hangs off and its
	// ifindex in the node netns; for a wire host, its bridge port in the wire
	// netns.
	Parent      string
	ParentIndex int
}

// New builds the lab and registers its removal with tb.Cleanup. It first
// removes leftovers of crashed runs (CleanupStale).
func New(tb testing.TB, opts Options) *Env {
	tb.Helper()
	testutil.RequireRoot(tb)
	if err := CleanupStale(StalePrefix); err != nil {
		tb.Logf("netenv: removing stale namespaces: %v", err)
	}

	id := make([]byte, 2)
	if _, err := rand.Read(id); err != nil {
		tb.Fatalf("netenv: random id: %v", err)
	}
	env := &Env{
		Prefix: fmt.Sprintf("%s%d-%s-", StalePrefix, os.Getpid(), hex.EncodeToString(id)),
		tb:     tb,
	}
	tb.Cleanup(env.cleanup) // first, so a half-built lab is removed too
	if err := env.build(opts); err != nil {
		tb.Fatalf("netenv: %v", err)
	}
	return env
}

func (e *Env) build(opts Options) error {
	def := func(p *netip.Prefix, s string) {
		if !p.IsValid() {
			*p = netip.MustParsePrefix(s)
		}
	}
	def(&opts.Subnet4, "192.0.2.0/24")
	def(&opts.Subnet6, "2001:db8:1::/64")
	def(&opts.SecondSubnet4, "198.51.100.0/24")
	def(&opts.SecondSubnet6, "2001:db8:2::/64")
	if opts.DefaultViaSecond && !opts.SecondUplink {
		return errors.New("DefaultViaSecond needs SecondUplink")
	}

	var err error
	if e.Wire, err = e.newNS("wire", true); err != nil {
		return err
	}
	if e.Node, err = e.newNS("node", true); err != nil {
		return err
	}
	subnets := [][2]netip.Prefix{{opts.Subnet4, opts.Subnet6}}
	if opts.SecondUplink {
		subnets = append(subnets, [2]netip.Prefix{opts.SecondSubnet4, opts.SecondSubnet6})
	}
	defIdx := 0
	if opts.DefaultViaSecond {
		defIdx = 1
	}
	for i, s := range subnets {
		u, err := e.addUplink(i, s[0], s[1], i == defIdx)
		if err != nil {
			return err
		}
		e.Uplinks = append(e.Uplinks, u)
	}
	if err := waitAddrsReady(e.Wire); err != nil {
		return err
	}
	return waitAddrsReady(e.Node)
}

// addUplink creates bridge br<i> in wire, a veth node<i> (port of the bridge)
// <-> eth<i> (in node), and their addresses.
func (e *Env) addUplink(i int, sub4, sub6 netip.Prefix, defaultRoute bool) (*Uplink, error) {
	if !sub4.Addr().Is4() || !sub6.Addr().Is6() || sub4 != sub4.Masked() || sub6 != sub6.Masked() {
		return nil, fmt.Errorf("uplink %d: want a masked IPv4 and IPv6 subnet, got %s and %s", i, sub4, sub6)
	}
	u := &Uplink{
		Name:       fmt.Sprintf("eth%d", i),
		Bridge:     fmt.Sprintf("br%d", i),
		Port:       fmt.Sprintf("node%d", i),
		GatewayMAC: net.HardwareAddr{0x02, 'u', 'p', 0, byte(i), 1},
		Subnet4:    sub4,
		Subnet6:    sub6,
	}
	u.Gateway4, u.Gateway6 = NthAddr(sub4, 1).Addr(), NthAddr(sub6, 1).Addr()
	u.Node4, u.Node6 = NthAddr(sub4, 2), NthAddr(sub6, 2)

	wire, node := e.Wire.Netlink(), e.Node.Netlink()
	// Multicast snooping off: without a querier it can swallow IPv6 neighbour
	// solicitations after the first MLD report.
	off := false
	br := &netlink.Bridge{
		LinkAttrs:         netlink.LinkAttrs{Name: u.Bridge, HardwareAddr: u.GatewayMAC},
		MulticastSnooping: &off,
	}
	if err := wire.LinkAdd(br); err != nil {
		return nil, fmt.Errorf("create bridge %s: %w", u.Bridge, err)
	}
	if err := e.plugUplink(u, br); err != nil {
		return nil, err
	}
	if err := wire.LinkSetUp(br); err != nil {
		return nil, fmt.Errorf("set %s up: %w", u.Bridge, err)
	}
	brLink, err := wire.LinkByName(u.Bridge)
	if err != nil {
		return nil, fmt.Errorf("find %s: %w", u.Bridge, err)
	}
	for _, a := range []netip.Prefix{NthAddr(sub4, 1), NthAddr(sub6, 1)} {
		if err := addAddr(wire, brLink, a); err != nil {
			return nil, err
		}
	}

	var gw4, gw6 netip.Addr
	if defaultRoute {
		gw4, gw6 = u.Gateway4, u.Gateway6
	}
	l, err := configureIface(node, u.Name, u.Node4, u.Node6, gw4, gw6)
	if err != nil {
		return nil, err
	}
	u.Index, u.MAC = l.Attrs().Index, l.Attrs().HardwareAddr
	return u, nil
}

// plugUplink creates u's veth (u.Port in wire <-> u.Name in the node),
// plugs u.Port into the bridge br and sets it up.
func (e *Env) plugUplink(u *Uplink, br netlink.Link) error {
	port, err := e.addVeth(u.Port, e.Node, u.Name)
	if err != nil {
		return err
	}
	if err := e.Wire.Netlink().LinkSetMaster(port, br); err != nil {
		return fmt.Errorf("attach %s to %s: %w", u.Port, u.Bridge, err)
	}
	u.PortIndex = port.Attrs().Index
	if err := e.Wire.Netlink().LinkSetUp(port); err != nil {
		return fmt.Errorf("set %s up: %w", u.Port, err)
	}
	return nil
}

// RecreateUplink rebuilds the uplink u after its node end was deleted (and
// the veth with it): a new veth plugged into u's bridge, and u's addresses
// on the node's end, up, with no route. It updates u's Index, MAC and
// PortIndex.
func (e *Env) RecreateUplink(u *Uplink) error {
	br, err := e.Wire.Netlink().LinkByName(u.Bridge)
	if err != nil {
		return fmt.Errorf("find %s: %w", u.Bridge, err)
	}
	if err := e.plugUplink(u, br); err != nil {
		return err
	}
	l, err := configureIface(e.Node.Netlink(), u.Name, u.Node4, u.Node6, netip.Addr{}, netip.Addr{})
	if err != nil {
		return err
	}
	u.Index, u.MAC = l.Attrs().Index, l.Attrs().HardwareAddr
	return nil
}

// addVeth creates a veth in wire named name whose peer is peerName inside
// peerNS. The peer is created directly in its namespace, so names never
// collide in the host netns or wire.
func (e *Env) addVeth(name string, peerNS *NS, peerName string) (netlink.Link, error) {
	fd, err := netns.GetFromPath(peerNS.Path)
	if err != nil {
		return nil, fmt.Errorf("open netns %s: %w", peerNS.Name, err)
	}
	defer fd.Close()
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: name},
		PeerName:      peerName,
		PeerNamespace: netlink.NsFd(int(fd)),
	}
	if err := e.Wire.Netlink().LinkAdd(veth); err != nil {
		return nil, fmt.Errorf("create veth %s <-> %s/%s: %w", name, peerNS.Name, peerName, err)
	}
	l, err := e.Wire.Netlink().LinkByName(name)
	if err != nil {
		return nil, fmt.Errorf("find %s: %w", name, err)
	}
	return l, nil
}

// AddNS creates an empty namespace (only lo, up) that belongs to the lab, for
// example the container netns handed to the CNI plugin.
func (e *Env) AddNS(name string) *NS {
	e.tb.Helper()
	n, err := e.newNS(name, false)
	if err != nil {
		e.tb.Fatalf("netenv: %v", err)
	}
	return n
}

// AddMacvlanContainer creates a container on the node's eth0: a bridge-mode
// macvlan moved into a new netns as eth0, with the given addresses (a zero
// prefix skips that family) and default routes via the uplink's gateway.
func (e *Env) AddMacvlanContainer(name string, ip4, ip6 netip.Prefix) *Container {
	e.tb.Helper()
	return e.AddMacvlanContainerOn(e.Uplinks[0], name, ip4, ip6)
}

// AddMacvlanContainerOn is AddMacvlanContainer on another uplink of the node.
func (e *Env) AddMacvlanContainerOn(u *Uplink, name string, ip4, ip6 netip.Prefix) *Container {
	e.tb.Helper()
	return e.mustAdd("container", name, func() (*Container, error) { return e.addMacvlan(u, name, ip4, ip6) })
}

// mustAdd returns what add made, and fails the test on its error, naming
// the kind of endpoint and its name.
func (e *Env) mustAdd(kind, name string, add func() (*Container, error)) *Container {
	e.tb.Helper()
	c, err := add()
	if err != nil {
		e.tb.Fatalf("netenv: %s %s: %v", kind, name, err)
	}
	return c
}

func (e *Env) addMacvlan(u *Uplink, name string, ip4, ip6 netip.Prefix) (*Container, error) {
	n, err := e.newNS(name, false)
	if err != nil {
		return nil, err
	}
	mv := &netlink.Macvlan{LinkAttrs: netlink.LinkAttrs{ParentIndex: u.Index}, Mode: netlink.MACVLAN_MODE_BRIDGE}
	if err := e.addSlave(n, mv, "eth0"); err != nil {
		return nil, fmt.Errorf("create macvlan on %s: %w", u.Name, err)
	}
	return e.finishContainer(n, u, ip4, ip6, u.Name, u.Index)
}

// addSlave creates l (a macvlan or ipvlan whose LinkAttrs carry the parent)
// straight inside the container netns n (IFLA_NET_NS_FD) under a temporary
// name, and renames it to ifname there.
// The temporary name matters on kernels before 6.13 or so: they look the
// new name up in the caller's netns first, and the node's own eth0 makes
// creating "eth0" fail with EEXIST. The slave never appears on the node.
func (e *Env) addSlave(n *NS, l netlink.Link, ifname string) error {
	fd, err := netns.GetFromPath(n.Path)
	if err != nil {
		return fmt.Errorf("open netns %s: %w", n.Name, err)
	}
	defer fd.Close()
	l.Attrs().Namespace = netlink.NsFd(int(fd))
	tmpb := make([]byte, 4)
	if _, err := rand.Read(tmpb); err != nil {
		return err
	}
	tmp := "upslv" + hex.EncodeToString(tmpb)
	l.Attrs().Name = tmp
	if err := e.Node.Netlink().LinkAdd(l); err != nil {
		return err
	}
	created, err := n.Netlink().LinkByName(tmp)
	if err != nil {
		return fmt.Errorf("find new slave %s in %s: %w", tmp, n.Name, err)
	}
	if err := n.Netlink().LinkSetName(created, ifname); err != nil {
		_ = n.Netlink().LinkDel(created)
		return fmt.Errorf("rename %s to %s in %s: %w", tmp, ifname, n.Name, err)
	}
	return nil
}

// IPvlanMode is the mode of an ipvlan container's slave (the mode is a
// property of the parent's ipvlan port: one lab parent carries one mode).
type IPvlanMode = netlink.IPVlanMode

const (
	IPvlanL2  = netlink.IPVLAN_MODE_L2
	IPvlanL3  = netlink.IPVLAN_MODE_L3
	IPvlanL3S = netlink.IPVLAN_MODE_L3S
)

// AddIpvlanContainer creates a container on the node's eth0: an ipvlan
// slave (bridge flag) in the given mode, moved into a new netns as eth0,
// with the given addresses (a zero prefix skips that family).
//
// Routes follow how each mode is deployed:
//   - L2: default routes via the uplink's gateway, like a macvlan container.
//   - L3, L3S: the slave has no ARP/ND (the driver routes its traffic in
//     the node's netns), so the container gets device default routes
//     ("default dev eth0"). The wire cannot resolve an L3 slave's address
//     either: addresses outside the uplink's subnets get a route on the
//     wire via the node's address, as an L3 deployment's router has.
//
// The slave shares the parent's MAC (Container.MAC is the parent's). A
// kernel without the ipvlan driver skips the test through
// testutil.SkipIfNotSupported (feature "ipvlan"), which fails instead when
// UNDERPASS_REQUIRE_FEATURES names ipvlan.
func (e *Env) AddIpvlanContainer(name string, mode IPvlanMode, ip4, ip6 netip.Prefix) *Container {
	e.tb.Helper()
	return e.AddIpvlanContainerOn(e.Uplinks[0], name, mode, ip4, ip6)
}

// AddIpvlanContainerOn is AddIpvlanContainer on another uplink of the node.
func (e *Env) AddIpvlanContainerOn(u *Uplink, name string, mode IPvlanMode, ip4, ip6 netip.Prefix) *Container {
	e.tb.Helper()
	c, err := e.addIpvlan(u, name, mode, ip4, ip6)
	if err != nil {
		if errors.Is(err, unix.EOPNOTSUPP) {
			testutil.SkipIfNotSupported(e.tb, testutil.NotSupported("ipvlan", err))
		}
		e.tb.Fatalf("netenv: ipvlan container %s: %v", name, err)
	}
	return c
}

// ProbeIpvlan reports whether the kernel can create ipvlan links: nil, or
// an error wrapped with testutil.NotSupported("ipvlan", …) when the driver
// is missing, for tests that want to skip before building a lab.
func ProbeIpvlan() error {
	return testutil.ProbeLink("ipvlan", "no ipvlan link type", func(lower int) netlink.Link {
		return &netlink.IPVlan{LinkAttrs: netlink.LinkAttrs{Name: "probe2", ParentIndex: lower}, Mode: netlink.IPVLAN_MODE_L2}
	})
}

func (e *Env) addIpvlan(u *Uplink, name string, mode IPvlanMode, ip4, ip6 netip.Prefix) (*Container, error) {
	n, err := e.newNS(name, false)
	if err != nil {
		return nil, err
	}
	ipv := &netlink.IPVlan{
		LinkAttrs: netlink.LinkAttrs{ParentIndex: u.Index},
		Mode:      mode,
		Flag:      netlink.IPVLAN_FLAG_BRIDGE,
	}
	if err := e.addSlave(n, ipv, "eth0"); err != nil {
		return nil, fmt.Errorf("create ipvlan %s on %s: %w", ipvlanModeName(mode), u.Name, err)
	}
	if mode == IPvlanL2 {
		return e.finishContainer(n, u, ip4, ip6, u.Name, u.Index)
	}
	// L3/L3S: device routes, no gateway.
	l, err := configureIface(n.Netlink(), "eth0", ip4, ip6, netip.Addr{}, netip.Addr{})
	if err != nil {
		return nil, err
	}
	for _, p := range []netip.Prefix{ip4, ip6} {
		if !p.IsValid() {
			continue
		}
		dst, family := netip.PrefixFrom(netip.IPv4Unspecified(), 0), netlink.FAMILY_V4
		if p.Addr().Is6() {
			dst, family = netip.PrefixFrom(netip.IPv6Unspecified(), 0), netlink.FAMILY_V6
		}
		r := &netlink.Route{LinkIndex: l.Attrs().Index, Dst: ipNet(dst), Scope: netlink.SCOPE_LINK, Family: family}
		if err := n.Netlink().RouteAdd(r); err != nil {
			return nil, fmt.Errorf("add default route dev eth0 in %s: %w", n.Name, err)
		}
	}
	// The wire reaches the slave through the node, as L3 mode wants.
	for _, p := range []netip.Prefix{ip4, ip6} {
		if !p.IsValid() || u.Subnet4.Contains(p.Addr()) || u.Subnet6.Contains(p.Addr()) {
			continue
		}
		via := u.Node4.Addr()
		if p.Addr().Is6() {
			via = u.Node6.Addr()
		}
		host := netip.PrefixFrom(p.Addr(), p.Addr().BitLen())
		if err := e.Wire.Netlink().RouteAdd(&netlink.Route{Dst: ipNet(host), Gw: via.AsSlice()}); err != nil {
			return nil, fmt.Errorf("add wire route %s via %s: %w", host, via, err)
		}
	}
	if err := waitAddrsReady(n); err != nil {
		return nil, err
	}
	return &Container{
		NS: n, IfName: "eth0", Index: l.Attrs().Index, MAC: l.Attrs().HardwareAddr,
		IP4: ip4, IP6: ip6, Parent: u.Name, ParentIndex: u.Index,
	}, nil
}

func ipvlanModeName(m IPvlanMode) string {
	switch m {
	case IPvlanL2:
		return "l2"
	case IPvlanL3:
		return "l3"
	case IPvlanL3S:
		return "l3s"
	}
	return fmt.Sprintf("mode %d", m)
}

// AddWireHost adds a host on the wire side of eth0's subnet: a netns whose
// eth0 is a veth plugged into br0, with default routes via the gateway.
func (e *Env) AddWireHost(name string, ip4, ip6 netip.Prefix) *Container {
	e.tb.Helper()
	return e.AddWireHostOn(e.Uplinks[0], name, ip4, ip6)
}

// AddWireHostOn is AddWireHost on another uplink's bridge.
func (e *Env) AddWireHostOn(u *Uplink, name string, ip4, ip6 netip.Prefix) *Container {
	e.tb.Helper()
	return e.mustAdd("wire host", name, func() (*Container, error) { return e.addWireHost(u, name, ip4, ip6) })
}

func (e *Env) addWireHost(u *Uplink, name string, ip4, ip6 netip.Prefix) (*Container, error) {
	n, err := e.newNS(name, false)
	if err != nil {
		return nil, err
	}
	e.mu.Lock()
	e.hosts++
	port := fmt.Sprintf("h%d-%s", e.hosts, name)
	e.mu.Unlock()
	if len(port) > unix.IFNAMSIZ-1 {
		port = port[:unix.IFNAMSIZ-1]
	}
	wire := e.Wire.Netlink()
	l, err := e.addVeth(port, n, "eth0")
	if err != nil {
		return nil, err
	}
	br, err := wire.LinkByName(u.Bridge)
	if err != nil {
		return nil, fmt.Errorf("find %s: %w", u.Bridge, err)
	}
	if err := wire.LinkSetMaster(l, br); err != nil {
		return nil, fmt.Errorf("attach %s to %s: %w", port, u.Bridge, err)
	}
	if err := wire.LinkSetUp(l); err != nil {
		return nil, fmt.Errorf("set %s up: %w", port, err)
	}
	return e.finishContainer(n, u, ip4, ip6, port, l.Attrs().Index)
}

// finishContainer configures eth0 inside a container or wire host netns.
func (e *Env) finishContainer(n *NS, u *Uplink, ip4, ip6 netip.Prefix, parent string, parentIndex int) (*Container, error) {
	var gw4, gw6 netip.Addr
	if ip4.IsValid() {
		gw4 = u.Gateway4
	}
	if ip6.IsValid() {
		gw6 = u.Gateway6
	}
	l, err := configureIface(n.Netlink(), "eth0", ip4, ip6, gw4, gw6)
	if err != nil {
		return nil, err
	}
	if err := waitAddrsReady(n); err != nil {
		return nil, err
	}
	return &Container{
		NS:          n,
		IfName:      "eth0",
		Index:       l.Attrs().Index,
		MAC:         l.Attrs().HardwareAddr,
		IP4:         ip4,
		IP6:         ip6,
		Parent:      parent,
		ParentIndex: parentIndex,
	}, nil
}

// newNS creates a lab namespace with the lab's sysctls and lo up.
func (e *Env) newNS(name string, router bool) (*NS, error) {
	if name == "" || strings.ContainsAny(name, "/ \t\n") {
		return nil, fmt.Errorf("invalid netns name %q", name)
	}
	n, err := createNS(e.Prefix + name)
	if err != nil {
		return nil, err
	}
	e.mu.Lock()
	e.nss = append(e.nss, n)
	e.mu.Unlock()
	if err := n.setup(router); err != nil {
		return nil, err
	}
	return n, nil
}

// CreateNS creates the namespace name with the lab's sysctls and lo up, but
// outside any lab: the caller removes it with Delete. It is for namespaces
// that come and go during a test (Env.AddNS keeps them until the test
// ends); named with a lab's Prefix, CleanupStale removes those a crashed
// run left.
func CreateNS(name string) (*NS, error) {
	n, err := createNS(name)
	if err != nil {
		return nil, err
	}
	if err := n.setup(false); err != nil {
		_ = n.delete()
		return nil, err
	}
	return n, nil
}

// Delete removes a namespace made by CreateNS (see delete).
func (n *NS) Delete() error { return n.delete() }

// setup sets the lab's sysctls in n (and, for a router, forwarding) and
// brings lo up.
func (n *NS) setup(router bool) error {
	settings := []string{
		"net.ipv6.conf.all.accept_dad", "0",
		"net.ipv6.conf.default.accept_dad", "0",
		"net.ipv4.conf.all.rp_filter", "0",
		"net.ipv4.conf.default.rp_filter", "0",
	}
	if router {
		settings = append(settings, "net.ipv4.ip_forward", "1", "net.ipv6.conf.all.forwarding", "1")
	}
	if err := n.Sysctl(settings...); err != nil {
		return err
	}
	lo, err := n.Netlink().LinkByName("lo")
	if err == nil {
		err = n.Netlink().LinkSetUp(lo)
	}
	if err != nil {
		return fmt.Errorf("netns %s: set lo up: %w", n.Name, err)
	}
	return nil
}

// cleanup deletes the lab's namespaces, newest first.
func (e *Env) cleanup() {
	e.mu.Lock()
	nss := e.nss
	e.nss = nil
	e.mu.Unlock()
	for i := len(nss) - 1; i >= 0; i-- {
		if err := nss[i].delete(); err != nil {
			e.tb.Errorf("netenv: %v", err)
		}
	}
}

// configureIface adds the addresses (a zero prefix is skipped) with
// IFA_F_NODAD, sets the link up and adds default routes via gw4/gw6 when
// valid.
func configureIface(h *netlink.Handle, name string, ip4, ip6 netip.Prefix, gw4, gw6 netip.Addr) (netlink.Link, error) {
	l, err := h.LinkByName(name)
	if err != nil {
		return nil, fmt.Errorf("find %s: %w", name, err)
	}
	for _, p := range []netip.Prefix{ip4, ip6} {
		if p.IsValid() {
			if err := addAddr(h, l, p); err != nil {
				return nil, err
			}
		}
	}
	if err := h.LinkSetUp(l); err != nil {
		return nil, fmt.Errorf("set %s up: %w", name, err)
	}
	for _, gw := range []netip.Addr{gw4, gw6} {
		if !gw.IsValid() {
			continue
		}
		dst := netip.PrefixFrom(netip.IPv4Unspecified(), 0)
		family := netlink.FAMILY_V4
		if gw.Is6() {
			dst, family = netip.PrefixFrom(netip.IPv6Unspecified(), 0), netlink.FAMILY_V6
		}
		r := &netlink.Route{LinkIndex: l.Attrs().Index, Dst: ipNet(dst), Gw: gw.AsSlice(), Family: family}
		if err := h.RouteAdd(r); err != nil {
			return nil, fmt.Errorf("add default route via %s dev %s: %w", gw, name, err)
		}
	}
	// Re-read for the final MAC and index.
	if l, err = h.LinkByIndex(l.Attrs().Index); err != nil {
		return nil, fmt.Errorf("find %s: %w", name, err)
	}
	return l, nil
}

func addAddr(h *netlink.Handle, l netlink.Link, p netip.Prefix) error {
	a := &netlink.Addr{IPNet: ipNet(p)}
	if p.Addr().Is6() {
		a.Flags = unix.IFA_F_NODAD
	}
	if err := h.AddrAdd(l, a); err != nil {
		return fmt.Errorf("add %s to %s: %w", p, l.Attrs().Name, err)
	}
	return nil
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// isLocalRoute says whether the netns routes ip to itself (RTN_LOCAL).
func isLocalRoute(n *NS, ip net.IP) bool {
	rs, err := n.Netlink().RouteGet(ip)
	return err == nil && len(rs) > 0 && rs[0].Type == unix.RTN_LOCAL
}

// waitAddrsReady waits until no IPv6 address in the netns is tentative and
// every global one has its local route.
// NODAD addresses on a link without carrier stay tentative until the carrier
// comes up (a bridge gets it only once a port is forwarding).
func waitAddrsReady(n *NS) error {
	deadline := time.Now().Add(5 * time.Second)
	for {
		addrs, err := n.Netlink().AddrList(nil, netlink.FAMILY_V6)
		if errors.Is(err, netlink.ErrDumpInterrupted) && time.Now().Before(deadline) {
			// The address list changed during the dump (DAD, a carrier
			// coming up): ask again.
			time.Sleep(5 * time.Millisecond)
			continue
		}
		if err != nil {
			return fmt.Errorf("list addresses in %s: %w", n.Name, err)
		}
		var tentative, unrouted []string
		for _, a := range addrs {
			if a.Flags&unix.IFA_F_TENTATIVE != 0 {
				tentative = append(tentative, a.IPNet.String())
				continue
			}
			// The address's local route is installed by addrconf's work
			// queue after the link comes up, NODAD or not; until then the
			// netns drops what is sent to the address. Seen under TCG:
			// the first pings to a fresh ipvlan L3 slave all lost.
			if a.Scope == unix.RT_SCOPE_UNIVERSE && !isLocalRoute(n, a.IP) {
				unrouted = append(unrouted, a.IPNet.String())
			}
		}
		if len(tentative) == 0 && len(unrouted) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("addresses in %s still tentative %v or without their local route %v", n.Name, tentative, unrouted)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
