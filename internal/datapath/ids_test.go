package datapath_test

import (
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"testing"

	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
)

// Ids are claimed by linear probing from a hash; with every attachment
// forced onto one probe chain, deleting endpoints in random order must not
// lose the others (the chain gets holes): each is still found, CHECKed,
// unregistered whole, and registered again.
func TestIDCollisionsDeleteInRandomOrder(t *testing.T) {
	m := load(t)
	t.Cleanup(datapath.ForceAttachmentHash(4242))

	const n = 2000
	spec := func(i int) datapath.Endpoint {
		return datapath.Endpoint{
			ContainerID: fmt.Sprintf("ctr-%04d", i), IfName: "eth0", ParentIfindex: 7, Mode: loader.ModeMacvlan,
			MAC:   net.HardwareAddr{2, 0, 0, 0, byte(i >> 8), byte(i)},
			Addrs: []netip.Prefix{netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)}), 16)},
		}
	}
	ids := map[int]uint32{}
	for i := range n {
		id, err := datapath.Register(m, spec(i))
		if err != nil {
			t.Fatalf("register %d: %v", i, err)
		}
		ids[i] = id
	}
	order := rand.Perm(n)
	for k, i := range order {
		id, _, err := datapath.Find(m, spec(i).ContainerID, "eth0")
		if err != nil || id != ids[i] {
			t.Fatalf("after %d deletes, %s found as %d (%v), registered as %d", k, spec(i).ContainerID, id, err, ids[i])
		}
		if err := datapath.Unregister(m, id); err != nil {
			t.Fatal(err)
		}
		if id, _, _ := datapath.Find(m, spec(i).ContainerID, "eth0"); id != 0 {
			t.Fatalf("%s still found after unregister", spec(i).ContainerID)
		}
		// Every 100th comes back at once (a re-ADD), into some hole.
		if k%100 == 0 {
			if ids[i], err = datapath.Register(m, spec(i)); err != nil {
				t.Fatalf("re-register %d: %v", i, err)
			}
			if err := datapath.Unregister(m, ids[i]); err != nil {
				t.Fatal(err)
			}
		}
	}
	if n, err := datapath.CountEndpoints(m); err != nil || n != 0 {
		t.Fatalf("%d endpoints left, %v", n, err)
	}
	var k loader.EpIPKey
	var v loader.EndpointRef
	if m.EpByIp.Iterate().Next(&k, &v) {
		t.Fatalf("ep_by_ip left %+v", k)
	}
	var nk loader.AttachKey
	var id uint32
	if m.EpNames.Iterate().Next(&nk, &id) {
		t.Fatalf("ep_names left %d", id)
	}
}
