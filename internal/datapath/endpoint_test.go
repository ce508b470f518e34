package datapath_test

import (
	"encoding/json"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
)

func TestEndpointName(t *testing.T) {
	for _, tc := range []struct {
		ep   datapath.Endpoint
		want string
	}{
		{datapath.Endpoint{ID: 7, ContainerID: "0123456789abcdef0123", IfName: "eth0"}, "0123456789ab/eth0"},
		{datapath.Endpoint{ID: 7, ContainerID: "short", IfName: "net1"}, "short/net1"},
		{datapath.Endpoint{ID: 7, IfName: "eth0"}, "7"},
	} {
		if got := tc.ep.Name(); got != tc.want {
			t.Errorf("%+v: Name() = %q, want %q", tc.ep, got, tc.want)
		}
	}
	for _, tc := range []struct {
		pod, ns, want string
	}{{"", "", ""}, {"p", "", "p"}, {"", "ns", ""}, {"web-0", "shop", "shop/web-0"}} {
		if got := (&datapath.Endpoint{PodName: tc.pod, PodNamespace: tc.ns}).PodRef(); got != tc.want {
			t.Errorf("PodRef(%q, %q) = %q, want %q", tc.pod, tc.ns, got, tc.want)
		}
	}
}

// TestDecode reads a raw map value as the programs and an older plugin
// leave it: names NUL-terminated, empty address slots, learnt addresses.
func TestDecode(t *testing.T) {
	raw := loader.Endpoint{Id: 42, ParentIfindex: 2, Ifindex: 3, Mode: uint8(loader.ModeMacvlan),
		Mac: [6]byte{2, 0xaa, 0, 0, 0, 1}, CreatedUnix: 1_700_000_000}
	raw.Addrs[1] = loader.EndpointAddr{Addr: netip.MustParseAddr("192.0.2.10").As16(), Prefixlen: 24, Family: 4}
	raw.Learned[3] = loader.Learned{Addr: netip.MustParseAddr("2001:db8::99").As16(), LearnedNs: 1}
	set := func(dst []int8, s string) {
		for i := range s {
			dst[i] = int8(s[i])
		}
	}
	set(raw.ContainerId[:], "0123456789abcdef")
	set(raw.Ifname[:], "eth0")
	set(raw.Parent[:], "ens3")
	set(raw.PodName[:], "web-0")
	set(raw.PodNamespace[:], "shop")
	set(raw.Netns[:], "/var/run/netns/cni-1")
	set(raw.Network[:], "underlay")
	ep := datapath.Decode(&raw)
	if ep.ID != 42 || ep.Name() != "0123456789ab/eth0" || ep.PodName != "web-0" || ep.PodNamespace != "shop" ||
		ep.ParentName != "ens3" || ep.ParentIfindex != 2 || ep.Ifindex != 3 || ep.Mode != loader.ModeMacvlan ||
		ep.MAC.String() != "02:aa:00:00:00:01" || ep.Netns != "/var/run/netns/cni-1" || ep.Network != "underlay" ||
		len(ep.Addrs) != 1 || ep.Addrs[0] != netip.MustParsePrefix("192.0.2.10/24") ||
		len(ep.Learned) != 1 || ep.Learned[0] != netip.MustParseAddr("2001:db8::99") ||
		!ep.Created.Equal(time.Unix(1_700_000_000, 0)) || ep.PodRef() != "shop/web-0" {
		t.Fatalf("%+v", ep)
	}
	// `underpassctl endpoints -o json` shows these names; scripts read them.
	b, err := json.Marshal(ep)
	if err != nil {
		t.Fatal(err)
	}
	for _, key := range []string{`"id":42`, `"containerID":"0123456789abcdef"`, `"interface":"eth0"`, `"pod":"web-0"`,
		`"namespace":"shop"`, `"parent":"ens3"`, `"parentIfindex":2`, `"ifindex":3`, `"addrs":["192.0.2.10/24"]`,
		`"netns":"/var/run/netns/cni-1"`, `"created":"2023-11-14T22:13:20Z"`} {
		if !strings.Contains(string(b), key) {
			t.Errorf("JSON lacks %s: %s", key, b)
		}
	}
}

// TestSame: an endpoint read twice is the same registration whatever its
// programs learnt meanwhile; a re-registration or an id reused is not.
func TestSame(t *testing.T) {
	a := datapath.Endpoint{ID: 1, ContainerID: "c", IfName: "eth0", Netns: "/n", Ifindex: 2, ParentIfindex: 3,
		MAC: []byte{2, 0, 0, 0, 0, 1}, Created: time.Unix(10, 0)}
	b := a
	b.Learned = []netip.Addr{netip.MustParseAddr("2001:db8::1")}
	if !a.Same(&b) {
		t.Error("learning an address made another endpoint")
	}
	for what, change := range map[string]func(*datapath.Endpoint){
		"container": func(e *datapath.Endpoint) { e.ContainerID = "d" },
		"created":   func(e *datapath.Endpoint) { e.Created = e.Created.Add(time.Second) },
		"mac":       func(e *datapath.Endpoint) { e.MAC = []byte{2, 0, 0, 0, 0, 2} },
		"ifindex":   func(e *datapath.Endpoint) { e.Ifindex = 9 },
	} {
		c := a
		change(&c)
		if a.Same(&c) {
			t.Errorf("another %s, still the same endpoint", what)
		}
	}
}

// An endpoint whose parent has no MAC is refused before anything is
// written: registering its parent would put zeros over the agent's entry,
// and the hairpin would stop for every pod on that parent.
func TestAddEndpointNeedsParentMAC(t *testing.T) {
	m := load(t)
	dp := &loader.Objects{Maps: *m}
	ep := &datapath.Endpoint{ContainerID: "c", IfName: "eth0", ParentIfindex: 2, ParentName: "eth1", Mode: loader.ModeMacvlan,
		MAC: []byte{2, 0, 0, 0, 0, 1}}
	_, err := datapath.AddEndpoint(dp, nil, ep, datapath.AddOptions{}, nil)
	if err == nil || !strings.Contains(err.Error(), "no Ethernet MAC") {
		t.Fatalf("AddEndpoint without a parent MAC: %v", err)
	}
	if eps, _ := datapath.Endpoints(m); len(eps) != 0 {
		t.Fatalf("%d endpoints registered", len(eps))
	}
}
