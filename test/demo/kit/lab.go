//go:build linux

package kit

import (
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/underpass-cni/underpass/test/netenv"
)

// LabSpec is the addressing of a demo's lab.
type LabSpec struct {
	Subnet   netip.Prefix
	Gateway  netip.Addr // br0's address in the wire netns
	NodeAddr netip.Addr // eth0's in the node netns
	// BridgeMAC, if set, is br0's MAC address.
	BridgeMAC net.HardwareAddr
	// NoMulticastSnooping turns br0's multicast snooping off.
	NoMulticastSnooping bool
}

// BuildLab creates the wire and node namespaces (Prefix+"wire",
// Prefix+"node"), the wire's bridge br0 (the switch and the gateway) and
// the node's eth0 plugged into it (a veth pair, node0 on the wire's
// side), with their addresses and the node's default route via the
// gateway. The namespaces made so far are returned on an error too, for
// the cleanup.
func (n Names) BuildLab(s LabSpec) (wire, node *netenv.NS, err error) {
	if wire, err = n.CreateNS("wire"); err != nil {
		return nil, nil, err
	}
	if node, err = n.CreateNS("node"); err != nil {
		return wire, nil, err
	}
	for _, ns := range []*netenv.NS{wire, node} {
		// rp_filter is inherited from the host and differs between
		// machines; IPv6 stays out of the way (the demos are IPv4).
		if err := ns.Sysctl("net.ipv4.conf.all.rp_filter", "0", "net.ipv4.conf.default.rp_filter", "0",
			"net.ipv6.conf.all.accept_dad", "0", "net.ipv6.conf.default.accept_dad", "0"); err != nil {
			return wire, node, err
		}
	}
	if err := plugNode(wire, node, s); err != nil {
		return wire, node, err
	}
	return wire, node, addressNode(wire, node, s)
}

// plugNode makes the wire's bridge br0 and plugs the node's eth0 into it
// (a veth pair, node0 on the wire's side).
func plugNode(wire, node *netenv.NS, s LabSpec) error {
	nl := wire.Netlink()
	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "br0", HardwareAddr: s.BridgeMAC}}
	if s.NoMulticastSnooping {
		off := false
		br.MulticastSnooping = &off
	}
	if err := nl.LinkAdd(br); err != nil {
		return fmt.Errorf("create br0 in %s: %w", wire.Name, err)
	}
	nodeFD, err := netns.GetFromPath(node.Path)
	if err != nil {
		return err
	}
	defer nodeFD.Close()
	// The node's end is created straight inside the node netns: nothing
	// ever appears in the host's netns.
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "node0"}, PeerName: "eth0", PeerNamespace: netlink.NsFd(int(nodeFD))}
	if err := nl.LinkAdd(veth); err != nil {
		return fmt.Errorf("create veth node0 <-> %s/eth0: %w", node.Name, err)
	}
	port, err := nl.LinkByName("node0")
	if err != nil {
		return err
	}
	if err := nl.LinkSetMaster(port, br); err != nil {
		return fmt.Errorf("plug node0 into br0: %w", err)
	}
	for _, name := range []string{"br0", "node0"} {
		if err := wire.SetUp(name); err != nil {
			return fmt.Errorf("set %s up: %w", name, err)
		}
	}
	return nil
}

// addressNode gives the gateway (br0) and the node (eth0) their addresses,
// and the node its default route.
func addressNode(wire, node *netenv.NS, s LabSpec) error {
	if err := wire.AddAddr("br0", netip.PrefixFrom(s.Gateway, s.Subnet.Bits())); err != nil {
		return err
	}
	if err := node.SetUp("eth0"); err != nil {
		return fmt.Errorf("set eth0 up in %s: %w", node.Name, err)
	}
	if err := node.AddAddr("eth0", netip.PrefixFrom(s.NodeAddr, s.Subnet.Bits())); err != nil {
		return err
	}
	return node.AddDefaultRoute(s.Gateway)
}
