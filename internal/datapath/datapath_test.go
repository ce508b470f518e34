package datapath_test

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/underpass-cni/underpass/internal/attach"
	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
	"github.com/underpass-cni/underpass/internal/testutil"
)

func load(t *testing.T) *loader.Maps {
	t.Helper()
	return &testutil.LoadDatapath(t).Maps
}

func TestParents(t *testing.T) {
	m := load(t)
	mac := net.HardwareAddr{2, 0, 0, 0, 0, 1}
	for _, i := range []int{2, 4097, loader.MaxParentIfindex - 1} {
		if err := datapath.PutParent(m, i, mac, loader.ModeMacvlan); err != nil {
			t.Fatal(err)
		}
	}
	if err := datapath.PutParent(m, loader.MaxParentIfindex, mac, loader.ModeMacvlan); err == nil {
		t.Fatal("ifindex beyond the array accepted")
	}
	ps, err := datapath.Parents(m)
	if err != nil || len(ps) != 3 {
		t.Fatalf("parents %v, %v", ps, err)
	}
	if err := datapath.DeleteParent(m, 4097); err != nil {
		t.Fatal(err)
	}
	if _, err := datapath.GetParent(m, 4097); !errors.Is(err, datapath.ErrNoParent) {
		t.Fatalf("deleted parent: %v", err)
	}
	if p, err := datapath.GetParent(m, 2); err != nil || loader.Mode(p.Mode) != loader.ModeMacvlan {
		t.Fatalf("parent 2: %+v %v", p, err)
	}
}

// Rename changes the pod name alone, cut to fit as Register cuts it, and
// never brings back an endpoint that is gone.
func TestRename(t *testing.T) {
	m := load(t)
	spec := datapath.Endpoint{ContainerID: "c1", IfName: "eth0", ParentIfindex: 2, Mode: loader.ModeMacvlan,
		MAC: net.HardwareAddr{2, 1, 2, 3, 4, 5}, Addrs: []netip.Prefix{netip.MustParsePrefix("192.0.2.10/24")},
		PodName: "netns-1", Network: "underpass-adopted"}
	id, err := datapath.Register(m, spec)
	if err != nil {
		t.Fatal(err)
	}
	long := strings.Repeat("n", 200)
	if err := datapath.Rename(m, id, long); err != nil {
		t.Fatal(err)
	}
	ep, err := datapath.Lookup(m, id)
	if err != nil {
		t.Fatal(err)
	}
	if ep.PodName != long[:127] || ep.ContainerID != "c1" || ep.Network != "underpass-adopted" || !slices.Equal(ep.Addrs, spec.Addrs) {
		t.Errorf("after the rename: %+v, want %+v named %d bytes of the new name", ep, spec, 127)
	}
	if err := datapath.Unregister(m, id); err != nil {
		t.Fatal(err)
	}
	if err := datapath.Rename(m, id, "web-1"); !errors.Is(err, datapath.ErrNoEndpoint) {
		t.Errorf("renaming an unregistered endpoint: %v, want ErrNoEndpoint", err)
	}
	if eps, _ := datapath.Endpoints(m); len(eps) != 0 {
		t.Errorf("renaming an unregistered endpoint left %d endpoints", len(eps))
	}
}

func TestRegisterRoundTrip(t *testing.T) {
	m := load(t)
	spec := datapath.Endpoint{ContainerID: "c1", IfName: "eth0", ParentIfindex: 2, Mode: loader.ModeMacvlan,
		MAC: net.HardwareAddr{2, 1, 2, 3, 4, 5}, Addrs: []netip.Prefix{netip.MustParsePrefix("192.0.2.10/24"), netip.MustParsePrefix("2001:db8::10/64")},
		PodName: "web-0", PodNamespace: "shop"}
	id, err := datapath.Register(m, spec)
	if err != nil {
		t.Fatal(err)
	}
	// A retried ADD replaces, it does not duplicate.
	id2, err := datapath.Register(m, spec)
	if err != nil {
		t.Fatal(err)
	}
	eps, _ := datapath.Endpoints(m)
	if len(eps) != 1 || id2 != id {
		t.Fatalf("after re-register: ids %d/%d, %d endpoints", id, id2, len(eps))
	}
	ep := eps[id]
	if ep.PodName != "web-0" || len(ep.Addrs) != 2 {
		t.Fatalf("metadata: %+v", ep)
	}
	// Another endpoint cannot claim the same address.
	other := spec
	other.ContainerID, other.MAC = "c2", net.HardwareAddr{2, 9, 9, 9, 9, 9}
	if _, err := datapath.Register(m, other); !errors.Is(err, datapath.ErrAddrInUse) {
		t.Fatalf("duplicate address: %v", err)
	}
	if eps, _ := datapath.Endpoints(m); len(eps) != 1 {
		t.Fatalf("failed register left %d endpoints", len(eps))
	}
	if err := datapath.Unregister(m, id); err != nil {
		t.Fatal(err)
	}
	if err := datapath.Unregister(m, id); err != nil {
		t.Fatalf("second unregister: %v", err)
	}
	if n := count(t, m); n != 0 {
		t.Fatalf("%d entries left after unregister", n)
	}
}

func count(t *testing.T, m *loader.Maps) int {
	n := 0
	for _, mp := range []interface {
		NextKey(key, nextKeyOut any) error
	}{m.EpByMac, m.EpByIp, m.Endpoints, m.EpStats} {
		var k [16]byte
		var next [16]byte
		_ = k
		if err := mp.NextKey(nil, &next); err == nil {
			n++
		}
	}
	return n
}

// Ids collide in 16 bits: the second attachment to hash to a taken id gets
// the next free one, and each is found again by its own names.
func TestRegisterProbesPastCollisions(t *testing.T) {
	m := load(t)
	// Find a pair of attachments whose natural ids are equal.
	seen := map[uint32]string{}
	var a, b string
	for i := 0; a == ""; i++ {
		cid := fmt.Sprintf("ctr-%d", i)
		id := datapath.EndpointID(cid, "eth0")
		if prev, ok := seen[id]; ok {
			a, b = prev, cid
		}
		seen[id] = cid
	}
	spec := func(cid string, last byte) datapath.Endpoint {
		return datapath.Endpoint{ContainerID: cid, IfName: "eth0", ParentIfindex: 2, Mode: loader.ModeMacvlan,
			MAC: net.HardwareAddr{2, 0, 0, 0, 0, last}, Addrs: []netip.Prefix{netip.PrefixFrom(netip.AddrFrom4([4]byte{192, 0, 2, last}), 24)}}
	}
	idA, err := datapath.Register(m, spec(a, 1))
	if err != nil {
		t.Fatal(err)
	}
	idB, err := datapath.Register(m, spec(b, 2))
	if err != nil {
		t.Fatal(err)
	}
	if idA != datapath.EndpointID(a, "eth0") || idB == idA || idB > attach.MaxEndpointID {
		t.Fatalf("ids %d and %d for two attachments whose natural id is %d", idA, idB, idA)
	}
	for cid, want := range map[string]uint32{a: idA, b: idB} {
		if got, _, err := datapath.Find(m, cid, "eth0"); err != nil || got != want {
			t.Fatalf("Find(%s) = %d, %v; want %d", cid, got, err, want)
		}
	}
}

// Whose registration an address another live endpoint only learnt (from
// its DAD) goes to: an IPAM assignment on macvlan takes it; an ipvlan
// slave (whose driver refuses a second copy of an address anyway), an
// adoption and an attach (addresses the container configured itself, no
// assignment) are refused, with an error that says the holder configured
// it itself. An address the holder was assigned is refused to all.
func TestLearntAddressYieldsOnlyToAnAssignment(t *testing.T) {
	dp := testutil.LoadDatapath(t)
	m := &dp.Maps
	learnt := netip.MustParseAddr("2001:db8:1::101")
	holder := liveEndpoint("holder", 1)
	id, err := datapath.Register(m, holder)
	if err != nil {
		t.Fatal(err)
	}
	// As the holder's DAD would have it (learn_address, tested by prog.Run
	// in loader): the address flagged learnt.
	k := datapath.EpIPKey(learnt, holder.ParentIfindex)
	if err := m.EpByIp.Update(&k, &loader.EndpointRef{Id: id, Flags: uint32(loader.RefLearned)}, ebpf.UpdateAny); err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		name    string
		network string
		mode    loader.Mode
		addr    netip.Addr
		want    string // "" = taken
	}{
		{"CNI ADD on macvlan, learnt", "net1", loader.ModeMacvlan, learnt, ""},
		{"CNI ADD on ipvlan, learnt", "net1", loader.ModeIPvlanL2, learnt, "configured it itself"},
		{"adoption, learnt", datapath.AdoptedNetwork, loader.ModeMacvlan, learnt, "configured it itself"},
		{"attach, learnt", datapath.AttachedNetwork, loader.ModeMacvlan, learnt, "configured it itself"},
		{"CNI ADD on macvlan, assigned", "net1", loader.ModeMacvlan, holder.Addrs[0].Addr(), "two pods got the same address from IPAM"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ep := liveEndpoint("newcomer", 9)
			ep.Network, ep.Mode, ep.Ifindex = tc.network, tc.mode, 31
			ep.Addrs = []netip.Prefix{netip.PrefixFrom(tc.addr, 64)}
			err := datapath.EvictStaleOwners(dp, &ep, nil, slog.New(slog.DiscardHandler))
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("refused: %v", err)
			case tc.want != "" && (!errors.Is(err, datapath.ErrAddrInUse) || !strings.Contains(err.Error(), tc.want)):
				t.Fatalf("%v, want ErrAddrInUse saying %q", err, tc.want)
			}
		})
	}
}

// A MAC on a parent is one endpoint's (a pod may ask for its MAC): a
// registration with a MAC another live endpoint holds is refused, and the
// holder keeps its entry (taken over, the holder's frames were vetted as
// nobody's once the newcomer left); a holder whose netns is gone gives
// way. The same MAC on another parent is another key.
func TestMACHeldByAnotherEndpoint(t *testing.T) {
	dp := testutil.LoadDatapath(t)
	m := &dp.Maps
	log := slog.New(slog.DiscardHandler)
	holder := liveEndpoint("holder", 1)
	id, err := datapath.Register(m, holder)
	if err != nil {
		t.Fatal(err)
	}
	ep := liveEndpoint("newcomer", 1) // holder's MAC
	ep.Ifindex, ep.Addrs = 31, []netip.Prefix{netip.MustParsePrefix("2001:db8:1::200/64")}
	if err := datapath.EvictStaleOwners(dp, &ep, nil, log); !errors.Is(err, datapath.ErrAddrInUse) || !strings.Contains(err.Error(), "MAC 02:01:01:01:01:01") ||
		!strings.Contains(err.Error(), "two pods asked for the same MAC") {
		t.Fatalf("%v, want ErrAddrInUse naming the MAC", err)
	}
	if _, err := datapath.Register(m, ep); !errors.Is(err, datapath.ErrAddrInUse) {
		t.Fatalf("Register with the holder's MAC: %v, want ErrAddrInUse", err)
	}
	var ref loader.EndpointRef
	k := datapath.MACKey(holder.MAC, holder.ParentIfindex)
	if err := m.EpByMac.Lookup(&k, &ref); err != nil || ref.Id != id {
		t.Fatalf("the holder's MAC entry: %+v, %v, want endpoint %d's", ref, err, id)
	}
	other := ep
	other.ParentIfindex = 8
	if err := datapath.EvictStaleOwners(dp, &other, nil, log); err != nil {
		t.Fatalf("the same MAC on another parent: %v", err)
	}
	// The holder's pod is gone without a DEL.
	gone := liveEndpoint("gone", 3)
	gone.Netns, gone.Addrs = filepath.Join(t.TempDir(), "missing"), []netip.Prefix{netip.MustParsePrefix("2001:db8:1::300/64")}
	gid, err := datapath.Register(m, gone)
	if err != nil {
		t.Fatal(err)
	}
	ep.MAC = gone.MAC
	if err := datapath.EvictStaleOwners(dp, &ep, nil, log); err != nil {
		t.Fatalf("a holder whose netns is gone: %v", err)
	}
	if _, err := datapath.Lookup(m, gid); err == nil {
		t.Fatalf("the stale holder %d is still registered", gid)
	}
}

// An adoption gives its MAC to a CNI registration of the same interface
// (the agent found the slave between the interface plugin making it and
// underpass registering it), not to another interface that asked for the
// MAC: that one would strip the adopted container's guard, then fail to
// come up with the MAC in use.
func TestAdoptedMACGoesOnlyToItsInterface(t *testing.T) {
	dp := testutil.LoadDatapath(t)
	log := slog.New(slog.DiscardHandler)
	adopted := liveEndpoint("adopted", 5)
	adopted.Network, adopted.Ifindex = datapath.AdoptedNetwork, 40
	adopted.Addrs = []netip.Prefix{netip.MustParsePrefix("2001:db8:1::500/64")}
	id, err := datapath.Register(&dp.Maps, adopted)
	if err != nil {
		t.Fatal(err)
	}
	other := liveEndpoint("pod", 5) // the adoption's MAC, another interface
	other.Ifindex, other.Addrs = 41, []netip.Prefix{netip.MustParsePrefix("2001:db8:1::501/64")}
	if err := datapath.EvictAdopted(dp, &other, log); !errors.Is(err, datapath.ErrAddrInUse) || !strings.Contains(err.Error(), "adopted interface") {
		t.Fatalf("another interface with the adoption's MAC: %v, want ErrAddrInUse", err)
	}
	if _, err := datapath.Lookup(&dp.Maps, id); err != nil {
		t.Fatalf("the adoption is gone: %v", err)
	}
	same := other
	same.Ifindex = adopted.Ifindex
	if err := datapath.EvictAdopted(dp, &same, log); err != nil {
		t.Fatalf("the adopted interface's own registration: %v", err)
	}
	if _, err := datapath.Lookup(&dp.Maps, id); err == nil {
		t.Fatalf("the adoption %d was not taken over", id)
	}
}

// Unregister also removes a learnt address that the endpoint's record does
// not list (two DADs racing for one slot on two CPUs leave one so): left
// behind, it went to the next endpoint given the id.
func TestUnregisterSweepsSlotlessLearntAddresses(t *testing.T) {
	dp := testutil.LoadDatapath(t)
	m := &dp.Maps
	ep := liveEndpoint("racer", 2)
	id, err := datapath.Register(m, ep)
	if err != nil {
		t.Fatal(err)
	}
	k := datapath.EpIPKey(netip.MustParseAddr("2001:db8:1::bad"), ep.ParentIfindex)
	if err := m.EpByIp.Update(&k, &loader.EndpointRef{Id: id, Flags: uint32(loader.RefLearned)}, ebpf.UpdateAny); err != nil {
		t.Fatal(err)
	}
	if err := datapath.Unregister(m, id); err != nil {
		t.Fatal(err)
	}
	var ref loader.EndpointRef
	if err := m.EpByIp.Lookup(&k, &ref); err == nil {
		t.Fatalf("slotless learnt address left behind: %+v", ref)
	}
	if n := count(t, m); n != 0 {
		t.Fatalf("%d entries left after unregister", n)
	}
}

// liveEndpoint is a macvlan endpoint in this process's (live) netns, with
// 2001:db8:1::100 on parent ifindex 7; n varies its MAC.
func liveEndpoint(id string, n byte) datapath.Endpoint {
	return datapath.Endpoint{
		ContainerID: id, IfName: "eth0", Netns: "/proc/self/ns/net", Network: "net1",
		ParentIfindex: 7, ParentName: "eth0", Ifindex: 30, Mode: loader.ModeMacvlan,
		MAC: net.HardwareAddr{2, 1, 1, 1, 1, n}, Addrs: []netip.Prefix{netip.MustParsePrefix("2001:db8:1::100/64")},
	}
}
