package epinfo_test

import (
	"net"
	"net/netip"
	"testing"

	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/epinfo"
	"github.com/underpass-cni/underpass/internal/loader"
)

func TestName(t *testing.T) {
	for _, tc := range []struct {
		id          uint32
		cid, ifname string
		want        string
	}{
		{7, "0123456789abcdef0123", "eth0", "0123456789ab/eth0"},
		{7, "short", "net1", "short/net1"},
		{7, "", "eth0", "7"},
	} {
		if got := epinfo.Name(tc.id, tc.cid, tc.ifname); got != tc.want {
			t.Errorf("Name(%d, %q, %q) = %q, want %q", tc.id, tc.cid, tc.ifname, got, tc.want)
		}
	}
}

func TestDecode(t *testing.T) {
	ep := loader.Endpoint{Id: 42, ParentIfindex: 2, Ifindex: 3, Mode: uint8(loader.ModeMacvlan), Mac: [6]byte{2, 0xaa, 0, 0, 0, 1}}
	ep.Addrs[0] = loader.EndpointAddr{Addr: netip.MustParseAddr("192.0.2.10").As16(), Prefixlen: 24, Family: 4}
	datapath.CString(ep.ContainerId[:], "0123456789abcdef")
	datapath.CString(ep.Ifname[:], "eth0")
	datapath.CString(ep.Parent[:], "ens3")
	datapath.CString(ep.PodName[:], "web-0")
	datapath.CString(ep.PodNamespace[:], "shop")
	i := epinfo.Decode(&ep)
	if i.ID != 42 || i.Name != "0123456789ab/eth0" || i.Pod != "web-0" || i.Namespace != "shop" || i.Parent != "ens3" ||
		i.Mode != "macvlan" || i.MAC != net.HardwareAddr(ep.Mac[:]).String() || len(i.Addrs) != 1 ||
		i.Addrs[0] != netip.MustParsePrefix("192.0.2.10/24") || i.PodRef() != "shop/web-0" {
		t.Fatalf("%+v", i)
	}
	if (epinfo.Info{}).PodRef() != "" || (epinfo.Info{Pod: "p"}).PodRef() != "p" {
		t.Fatal("PodRef without namespace or pod")
	}
}
