//go:build linux

package main

import (
	"fmt"
	"net/netip"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/underpass-cni/underpass/test/demo"
)

// buildLab creates the wire and node namespaces and the leak sink.
func (d *demoRun) buildLab() error {
	for _, step := range []func() error{d.createNamespaces, d.plugNode, d.addressNode, d.serve} {
		if err := step(); err != nil {
			return err
		}
	}
	return nil
}

// createNamespaces creates the wire and node namespaces.
func (d *demoRun) createNamespaces() error {
	var err error
	if d.wire, err = demo.CreateNS("wire"); err != nil {
		return err
	}
	if d.node, err = demo.CreateNS("node"); err != nil {
		return err
	}
	for _, n := range []*demo.NS{d.wire, d.node} {
		// rp_filter is inherited from the host and differs between
		// machines; IPv6 stays out of the way (the demo is IPv4).
		if err := n.Sysctl("net.ipv4.conf.all.rp_filter", "0", "net.ipv4.conf.default.rp_filter", "0",
			"net.ipv6.conf.all.accept_dad", "0", "net.ipv6.conf.default.accept_dad", "0"); err != nil {
			return err
		}
	}
	return nil
}

// plugNode makes the wire's bridge br0 and plugs the node's eth0 into it
// (a veth pair, node0 on the wire's side).
func (d *demoRun) plugNode() error {
	wire := d.wire.Netlink()
	off := false
	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "br0", HardwareAddr: gatewayMA}, MulticastSnooping: &off}
	if err := wire.LinkAdd(br); err != nil {
		return fmt.Errorf("create br0 in %s: %w", d.wire.Name, err)
	}
	nodeFD, err := netns.GetFromPath(d.node.Path)
	if err != nil {
		return err
	}
	defer nodeFD.Close()
	// The node's end is created straight inside the node netns: nothing
	// ever appears in the host's netns.
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "node0"}, PeerName: "eth0", PeerNamespace: netlink.NsFd(int(nodeFD))}
	if err := wire.LinkAdd(veth); err != nil {
		return fmt.Errorf("create veth node0 <-> %s/eth0: %w", d.node.Name, err)
	}
	port, err := wire.LinkByName("node0")
	if err != nil {
		return err
	}
	if err := wire.LinkSetMaster(port, br); err != nil {
		return fmt.Errorf("plug node0 into br0: %w", err)
	}
	for _, name := range []string{"br0", "node0"} {
		if err := d.wire.SetUp(name); err != nil {
			return fmt.Errorf("set %s up: %w", name, err)
		}
	}
	return nil
}

// addressNode gives the gateway (br0) and the node (eth0) their addresses,
// and the node its default route.
func (d *demoRun) addressNode() error {
	if err := d.wire.AddAddr("br0", netip.PrefixFrom(gateway, subnet.Bits())); err != nil {
		return err
	}
	if err := d.node.SetUp("eth0"); err != nil {
		return fmt.Errorf("set eth0 up in %s: %w", d.node.Name, err)
	}
	if err := d.node.AddAddr("eth0", netip.PrefixFrom(nodeAddr, subnet.Bits())); err != nil {
		return err
	}
	return d.node.AddDefaultRoute(gateway)
}

// serve starts the live service on the node and the leak sink on the
// gateway.
func (d *demoRun) serve() error {
	// The live service: the node accepts the VIP through a local route, as
	// kube-proxy's DNAT would, rather than with an address on lo: the agent
	// treats every interface address as a node subnet and rejects a service
	// CIDR that overlaps one.
	if err := d.node.AddLocalRoute(netip.PrefixFrom(liveVIP, 32)); err != nil {
		return err
	}
	ln, err := demo.Serve(d.node, netip.AddrPortFrom(liveVIP, svcPort).String(), "hello from the node (service "+liveVIP.String()+")", nil)
	if err != nil {
		return err
	}
	d.listeners = append(d.listeners, ln)

	// The gateway answers the whole service range: a packet for a service
	// VIP that leaks out of the node gets an answer that says so, instead
	// of silently hammering the network as it does on a real one.
	if err := d.wire.AddLocalRoute(svcCIDR); err != nil {
		return err
	}
	ln, err = demo.Serve(d.wire, fmt.Sprintf("0.0.0.0:%d", svcPort), "hello from the GATEWAY: this packet leaked out of the node", func(local netip.AddrPort) {
		if svcCIDR.Contains(local.Addr()) {
			d.leaks.Add(1)
		}
	})
	if err != nil {
		return err
	}
	d.listeners = append(d.listeners, ln)
	return nil
}
