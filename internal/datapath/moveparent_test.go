package datapath_test

import (
	"errors"
	"net"
	"net/netip"
	"strings"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
)

// regOn registers a macvlan endpoint with MAC 02:00:00:00:00:mac and
// address ip on parent ifindex parent.
func regOn(t *testing.T, m *loader.Maps, id string, parent int, mac byte, ip string) uint32 {
	t.Helper()
	epID, err := datapath.Register(m, datapath.Endpoint{
		ContainerID: id, IfName: "eth0", ParentIfindex: parent, Mode: loader.ModeMacvlan,
		MAC: net.HardwareAddr{2, 0, 0, 0, 0, mac}, Addrs: []netip.Prefix{netip.MustParsePrefix(ip)},
	})
	if err != nil {
		t.Fatal(err)
	}
	return epID
}

func TestMoveParentAndCount(t *testing.T) {
	m := load(t)
	if n, err := datapath.CountEndpoints(m); err != nil || n != 0 {
		t.Fatalf("empty: %d %v", n, err)
	}
	reg := func(id string, parent int, mac byte, ip string) uint32 { return regOn(t, m, id, parent, mac, ip) }
	a := reg("a", 5, 1, "10.0.0.1/24")
	b := reg("b", 5, 2, "10.0.0.2/24")
	c := reg("c", 6, 3, "10.0.1.3/24")
	if n, _ := datapath.CountEndpoints(m); n != 3 {
		t.Fatalf("count %d, want 3", n)
	}
	moved, err := datapath.MoveParent(m, 5, 9)
	if err != nil || moved != 2 {
		t.Fatalf("moved %d, %v; want 2", moved, err)
	}
	eps, _ := datapath.Endpoints(m)
	for id, want := range map[uint32]int{a: 9, b: 9, c: 6} {
		if got := eps[id].ParentIfindex; got != want {
			t.Errorf("endpoint %d on parent %d, want %d", id, got, want)
		}
	}
	var ref loader.EndpointRef
	k := datapath.EpIPKey(netip.MustParseAddr("10.0.0.2"), 9)
	if err := m.EpByIp.Lookup(&k, &ref); err != nil || ref.Id != b {
		t.Fatalf("ep_by_ip ref on the new parent %+v %v", ref, err)
	}
	mk := datapath.MACKey(net.HardwareAddr{2, 0, 0, 0, 0, 1}, 9)
	if err := m.EpByMac.Lookup(&mk, &ref); err != nil || ref.Id != a {
		t.Fatalf("ep_by_mac ref on the new parent %+v %v", ref, err)
	}
	// Nothing left under the old parent's keys.
	k = datapath.EpIPKey(netip.MustParseAddr("10.0.0.2"), 5)
	if err := m.EpByIp.Lookup(&k, &ref); err == nil {
		t.Fatalf("ep_by_ip still has the old parent's key: %+v", ref)
	}
	mk = datapath.MACKey(net.HardwareAddr{2, 0, 0, 0, 0, 1}, 5)
	if err := m.EpByMac.Lookup(&mk, &ref); err == nil {
		t.Fatalf("ep_by_mac still has the old parent's key: %+v", ref)
	}
}

// Two networks on one node (Multus): the same MAC and the same address on
// two parents are two endpoints, each found on its own parent; removing one
// leaves the other whole.
func TestSameMACAndAddressOnTwoParents(t *testing.T) {
	m := load(t)
	mac := net.HardwareAddr{2, 0, 0, 0, 0, 7}
	addr := netip.MustParsePrefix("10.78.0.2/24")
	reg := func(cid string, parent int) uint32 {
		t.Helper()
		id, err := datapath.Register(m, datapath.Endpoint{ContainerID: cid, IfName: "net1", ParentIfindex: parent,
			Mode: loader.ModeMacvlan, MAC: mac, Addrs: []netip.Prefix{addr}})
		if err != nil {
			t.Fatalf("register on parent %d: %v", parent, err)
		}
		return id
	}
	a, b := reg("pod-on-vlan100", 11), reg("pod-on-vlan200", 12)
	for parent, want := range map[int]uint32{11: a, 12: b} {
		k := datapath.EpIPKey(addr.Addr(), parent)
		mk := datapath.MACKey(mac, parent)
		var ip, mr loader.EndpointRef
		if err := m.EpByIp.Lookup(&k, &ip); err != nil || ip.Id != want {
			t.Fatalf("ep_by_ip on parent %d: %+v %v, want %d", parent, ip, err, want)
		}
		if err := m.EpByMac.Lookup(&mk, &mr); err != nil || mr.Id != want {
			t.Fatalf("ep_by_mac on parent %d: %+v %v, want %d", parent, mr, err, want)
		}
	}
	if err := datapath.Unregister(m, a); err != nil {
		t.Fatal(err)
	}
	k := datapath.EpIPKey(addr.Addr(), 12)
	var ref loader.EndpointRef
	if err := m.EpByIp.Lookup(&k, &ref); err != nil || ref.Id != b {
		t.Fatalf("the other network's pod lost its address: %+v %v", ref, err)
	}
}

// A key the moving endpoint has that another live endpoint holds on the
// new parent (registered there before the move) is not taken from it: the
// moving endpoint stays whole on the old parent, and the error names the
// key and the holder; the others move.
func TestMoveParentLeavesAHeldKey(t *testing.T) {
	m := load(t)
	reg := func(id string, parent int, mac byte, ip string) uint32 { return regOn(t, m, id, parent, mac, ip) }
	a := reg("a", 5, 1, "10.0.0.1/24")
	b := reg("b", 5, 2, "10.0.0.2/24")
	c := reg("c", 5, 3, "10.0.0.3/24")
	d := reg("d", 9, 1, "10.0.0.9/24") // a's MAC on the new parent
	e := reg("e", 9, 4, "10.0.0.2/24") // b's address on the new parent
	moved, err := datapath.MoveParent(m, 5, 9)
	if moved != 1 || !errors.Is(err, datapath.ErrAddrInUse) {
		t.Fatalf("moved %d, %v; want 1 and ErrAddrInUse", moved, err)
	}
	for _, want := range []string{"MAC 02:00:00:00:00:01 belongs to endpoint", "10.0.0.2 belongs to endpoint"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
	eps, _ := datapath.Endpoints(m)
	for id, want := range map[uint32]int{a: 5, b: 5, c: 9, d: 9, e: 9} {
		if got := eps[id].ParentIfindex; got != want {
			t.Errorf("endpoint %d on parent %d, want %d", id, got, want)
		}
	}
	ref := func(mp *ebpf.Map, k any) uint32 {
		t.Helper()
		var r loader.EndpointRef
		if err := mp.Lookup(k, &r); err != nil {
			t.Fatalf("%v: %v", k, err)
		}
		return r.Id
	}
	for _, tc := range []struct {
		mac    byte
		parent int
		want   uint32
	}{{1, 9, d}, {1, 5, a}, {2, 5, b}, {3, 9, c}} {
		k := datapath.MACKey(net.HardwareAddr{2, 0, 0, 0, 0, tc.mac}, tc.parent)
		if got := ref(m.EpByMac, &k); got != tc.want {
			t.Errorf("MAC ..:%02x on parent %d: endpoint %d, want %d", tc.mac, tc.parent, got, tc.want)
		}
	}
	for _, tc := range []struct {
		addr   string
		parent int
		want   uint32
	}{{"10.0.0.2", 9, e}, {"10.0.0.2", 5, b}, {"10.0.0.1", 5, a}, {"10.0.0.3", 9, c}} {
		k := datapath.EpIPKey(netip.MustParseAddr(tc.addr), tc.parent)
		if got := ref(m.EpByIp, &k); got != tc.want {
			t.Errorf("%s on parent %d: endpoint %d, want %d", tc.addr, tc.parent, got, tc.want)
		}
	}
}
