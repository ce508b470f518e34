package cni_test

import (
	"net"
	"strings"
	"testing"

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
	if err == nil || !strings.Contains(err.Error(), byCap.String()) || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("ADD with a MAC another pod has: %v, want an error that names the MAC as in use", err)
	}
	t.Logf("ADD with a's MAC: %v", err)
	if err := h.tryDel(l, c); err != nil {
		t.Errorf("DEL after the failed ADD: %v", err)
	}
	// The parent's own MAC: no endpoint has it, macvlan refuses it when
	// the slave comes up.
	d := h.newPod("d")
	d.capArgs = map[string]any{"mac": u.MAC.String()}
	_, err = h.tryAdd(l, d)
	if err == nil || !strings.Contains(err.Error(), u.MAC.String()) || !strings.Contains(err.Error(), "in use on the parent") {
		t.Fatalf("ADD with the parent's MAC: %v, want an error that names the MAC as in use on the parent", err)
	}
	t.Logf("ADD with the parent's MAC: %v", err)
	if err := h.tryDel(l, d); err != nil {
		t.Errorf("DEL after the failed ADD: %v", err)
	}
	h.del(l, a)
	h.del(l, b)
	h.assertNoLeak(t, nil, a.ns, b.ns, c.ns, d.ns)
}
