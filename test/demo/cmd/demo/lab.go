//go:build linux

package main

import (
	"fmt"
	"net/netip"

	"github.com/underpass-cni/underpass/test/demo"
	"github.com/underpass-cni/underpass/test/demo/kit"
)

// labSpec is the demo's lab: br0 has a fixed MAC and no multicast
// snooping.
var labSpec = kit.LabSpec{Subnet: subnet, Gateway: gateway, NodeAddr: nodeAddr, BridgeMAC: gatewayMA, NoMulticastSnooping: true}

// buildLab creates the wire and node namespaces and the leak sink.
func (d *demoRun) buildLab() error {
	var err error
	d.wire, d.node, err = demo.Names.BuildLab(labSpec)
	if err != nil {
		return err
	}
	return d.serve()
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
	ln, err := kit.Serve(d.node, netip.AddrPortFrom(liveVIP, svcPort).String(), "hello from the node (service "+liveVIP.String()+")", nil)
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
	ln, err = kit.Serve(d.wire, fmt.Sprintf("0.0.0.0:%d", svcPort), "hello from the GATEWAY: this packet leaked out of the node", func(local netip.AddrPort) {
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
