package netenv

// VLAN sub-interface parents, the Rancher/Docker layout: two networks on two
// VLANs of one NIC (eth0.100, eth0.200), each with its own subnet and
// gateway:
//
//	node netns                      wire netns          gateway netns (one per VLAN)
//	eth0.100 ─┐                     ┌─ node0.100 ──────── vlan100: 10.100.0.1 …
//	          ├─ eth0 ══ veth ══ node0 (port of br0)
//	eth0.200 ─┘                     └─ node0.200 ──────── vlan200: 10.200.0.1 …
//
// The wire-side VLAN interfaces sit on the trunk's wire end (node0) but live
// in their own gateway namespace, which does not forward: nothing routes
// between the VLANs, as on a switch whose VLANs have no router between them.
// A tagged frame from the node reaches node0.<vid> before br0 sees it (the
// kernel hands a frame to its VLAN device before the port's rx handler), so
// br0 and its untagged subnet are not involved.

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/underpass-cni/underpass/internal/testutil"
)

// AddVLAN adds VLAN vid on the node uplink u (the trunk): the sub-interface
// <u.Name>.<vid> in the node with the subnets' second addresses, and its
// wire side, <u.Port>.<vid> in a gateway netns "vlan<vid>" of its own with
// the first addresses (the VLAN's gateway). The node gets no route through
// the VLAN beyond its connected subnets. The result is an Uplink whose
// Name/Index/MAC are the VLAN interface (a parent for AddMacvlanContainerOn;
// its MAC is the trunk's, as a VLAN device's is), Port/PortIndex the
// trunk's wire end in the wire netns (where every VLAN's frames pass, for
// counters), GatewayNS/GatewayIf the VLAN's own wire side, and Bridge empty
// (no AddWireHostOn on a VLAN). It is appended to Env.VLANs. Without 8021q
// the test skips through testutil.SkipIfNotSupported (feature "vlan",
// probed first with testutil.ProbeVLAN),
// which fails instead when UNDERPASS_REQUIRE_FEATURES names vlan.
func (e *Env) AddVLAN(u *Uplink, vid int, sub4, sub6 netip.Prefix) *Uplink {
	e.tb.Helper()
	v, err := e.addVLAN(u, vid, sub4, sub6)
	if err != nil {
		if errors.Is(err, unix.EOPNOTSUPP) {
			testutil.SkipIfNotSupported(e.tb, testutil.NotSupported("vlan", err))
		}
		e.tb.Fatalf("netenv: vlan %d on %s: %v", vid, u.Name, err)
	}
	e.mu.Lock()
	e.VLANs = append(e.VLANs, v)
	e.mu.Unlock()
	return v
}

func (e *Env) addVLAN(u *Uplink, vid int, sub4, sub6 netip.Prefix) (*Uplink, error) {
	if vid < 1 || vid > 4094 {
		return nil, fmt.Errorf("VLAN id %d out of 1..4094", vid)
	}
	if !sub4.Addr().Is4() || !sub6.Addr().Is6() || sub4 != sub4.Masked() || sub6 != sub6.Masked() {
		return nil, fmt.Errorf("want a masked IPv4 and IPv6 subnet, got %s and %s", sub4, sub6)
	}
	v := &Uplink{
		Name:      fmt.Sprintf("%s.%d", u.Name, vid),
		Port:      u.Port,
		PortIndex: u.PortIndex,
		Subnet4:   sub4,
		Subnet6:   sub6,
		VID:       vid,
		Trunk:     u.Name,
		GatewayIf: fmt.Sprintf("%s.%d", u.Port, vid),
	}
	v.Gateway4, v.Gateway6 = NthAddr(sub4, 1).Addr(), NthAddr(sub6, 1).Addr()
	v.Node4, v.Node6 = NthAddr(sub4, 2), NthAddr(sub6, 2)

	// Node side: eth0.<vid> on eth0.
	node := e.Node.Netlink()
	if err := node.LinkAdd(&netlink.Vlan{LinkAttrs: netlink.LinkAttrs{Name: v.Name, ParentIndex: u.Index}, VlanId: vid}); err != nil {
		return nil, fmt.Errorf("create %s: %w", v.Name, err)
	}
	l, err := configureIface(node, v.Name, v.Node4, v.Node6, netip.Addr{}, netip.Addr{})
	if err != nil {
		return nil, err
	}
	v.Index, v.MAC = l.Attrs().Index, l.Attrs().HardwareAddr

	// Wire side: node0.<vid> on node0, created straight in the VLAN's
	// gateway netns (a non-forwarding one).
	gw, err := e.newNS(fmt.Sprintf("vlan%d", vid), false)
	if err != nil {
		return nil, err
	}
	v.GatewayNS = gw
	fd, err := netns.GetFromPath(gw.Path)
	if err != nil {
		return nil, fmt.Errorf("open netns %s: %w", gw.Name, err)
	}
	defer fd.Close()
	wl := &netlink.Vlan{LinkAttrs: netlink.LinkAttrs{Name: v.GatewayIf, ParentIndex: u.PortIndex, Namespace: netlink.NsFd(int(fd))}, VlanId: vid}
	if err := e.Wire.Netlink().LinkAdd(wl); err != nil {
		return nil, fmt.Errorf("create %s in %s: %w", v.GatewayIf, gw.Name, err)
	}
	gl, err := configureIface(gw.Netlink(), v.GatewayIf, NthAddr(sub4, 1), NthAddr(sub6, 1), netip.Addr{}, netip.Addr{})
	if err != nil {
		return nil, err
	}
	v.GatewayMAC = gl.Attrs().HardwareAddr
	if err := waitAddrsReady(gw); err != nil {
		return nil, err
	}
	if err := waitAddrsReady(e.Node); err != nil {
		return nil, err
	}
	return v, nil
}
