package cni_test

import (
	"errors"
	"fmt"
	"net"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/underpass-cni/underpass/test/netenv"
)

// A pod asks for its MAC, as the reference macvlan plugin allows: by
// runtimeConfig.mac (the "mac" capability, which Multus fills from a
// network selection's "mac"), or by CNI_ARGS MAC. The slave has it, the
// result and the datapath say it, and the pod's guard takes it for the
// pod's own. A MAC another slave of the parent has is refused with a
// clear error, and nothing is left behind.
func TestRequestedMAC(t *testing.T) {
	h := newHarness(t, harnessOpts{})
	u := h.env.Uplinks[0]
	conf := h.mainConf(false)
	conf["capabilities"] = map[string]any{"mac": true}
	l := h.conflist("up-mac", "1.1.0", conf)

	byCap, byArgs := net.HardwareAddr{0x02, 0x42, 0xde, 0xad, 0, 1}, net.HardwareAddr{0x02, 0x42, 0xde, 0xad, 0, 2}
	a := h.newPod("a")
	a.capArgs = map[string]any{"mac": byCap.String()}
	h.add(l, a)
	h.baselineParents() // what the first pod leaves on the parent stays
	b := h.newPod("b")
	b.args = [][2]string{{"MAC", byArgs.String()}}
	h.add(l, b)
	for _, tc := range []struct {
		p    *pod
		want net.HardwareAddr
	}{{a, byCap}, {b, byArgs}} {
		if tc.p.mac.String() != tc.want.String() {
			t.Errorf("pod %s: the result's MAC %s, want %s", tc.p.name, tc.p.mac, tc.want)
		}
		eth0, err := tc.p.ns.Netlink().LinkByName("eth0")
		must(t, err)
		if got := eth0.Attrs().HardwareAddr; got.String() != tc.want.String() {
			t.Errorf("pod %s: eth0 has %s, want %s", tc.p.name, got, tc.want)
		}
		if _, ep := h.endpointOf(t, tc.p); ep.MAC.String() != tc.want.String() {
			t.Errorf("pod %s: registered with %s, want %s", tc.p.name, ep.MAC, tc.want)
		}
		netenv.MustPing(t, tc.p.ns, u.Gateway4, 2)
	}
	netenv.MustPing(t, a.ns, b.ip4, 2)

	// Another pod asks for a's MAC: the parent cannot have it twice.
	c := h.newPod("c")
	c.capArgs = map[string]any{"mac": byCap.String()}
	_, err := h.tryAdd(l, c)
	if err == nil || !strings.Contains(err.Error(), "MAC "+byCap.String()+" is in use by container "+a.id) {
		t.Fatalf("ADD with a MAC another pod has: %v, want the registration to refuse it, naming a", err)
	}
	t.Logf("ADD with a's MAC: %v", err)
	if err := h.tryDel(l, c); err != nil {
		t.Errorf("DEL after the failed ADD: %v", err)
	}
	// a is as it was: its registration (CHECK) and its guard's view of
	// its MAC (the node, and b, reach it).
	if err := h.check(l, a); err != nil {
		t.Errorf("CHECK a after c's refused ADD: %v", err)
	}
	netenv.MustPing(t, h.env.Node, a.ip4, 2)
	netenv.MustPing(t, b.ns, a.ip4, 2)

	// MACs a slave must not have: the parent's own, and a router's the
	// node knows on the parent (the gateway of its default route):
	// refused before anything is made.
	netenv.MustPing(t, h.env.Node, u.Gateway4, 1)
	for i, tc := range []struct {
		name string
		mac  net.HardwareAddr
		want string
	}{
		{"the parent's MAC", u.MAC, "is master " + u.Name + "'s own"},
		{"the gateway's MAC", u.GatewayMAC, "is the router " + u.Gateway4.String() + "'s"},
	} {
		d := h.newPod(fmt.Sprintf("d%d", i))
		d.capArgs = map[string]any{"mac": tc.mac.String()}
		_, err = h.tryAdd(l, d)
		var te *types.Error
		if !errors.As(err, &te) || te.Code != types.ErrInvalidNetworkConfig || !strings.Contains(te.Msg, tc.want) {
			t.Fatalf("ADD with %s: %v, want code 7 saying %q", tc.name, err, tc.want)
		}
		t.Logf("ADD with %s: %v", tc.name, err)
		if err := h.tryDel(l, d); err != nil {
			t.Errorf("DEL after the failed ADD: %v", err)
		}
	}

	// Without the capability, a MAC in CNI_ARGS (which Multus passes
	// from a network selection whatever the network allows) is not the
	// pod's to pick.
	plain := h.conflist("up-mac", "1.1.0", h.mainConf(false)) // the same network (and its IPAM), without the capability
	e := h.newPod("e")
	e.args = [][2]string{{"MAC", net.HardwareAddr{0x02, 0x42, 0xde, 0xad, 0, 5}.String()}}
	h.add(plain, e)
	if e.mac.String() == "02:42:de:ad:00:05" {
		t.Errorf("pod e got the MAC of its CNI_ARGS on a network without the mac capability")
	}
	h.del(plain, e)

	// A pod made again with its own MAC gets it back, though the node's
	// neighbour table still has the old pod (the node pinged it above).
	h.del(l, a)
	a2 := h.newPod("a2")
	a2.capArgs = map[string]any{"mac": byCap.String()}
	h.add(l, a2)
	if a2.mac.String() != byCap.String() {
		t.Errorf("pod a2 got %s, want a's MAC %s again", a2.mac, byCap)
	}
	netenv.MustPing(t, h.env.Node, a2.ip4, 2)
	h.del(l, a2)
	h.del(l, b)
	h.assertNoLeak(t, nil, a.ns, b.ns, c.ns, e.ns, a2.ns)
}
