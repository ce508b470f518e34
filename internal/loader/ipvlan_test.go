package loader_test

import (
	"net/netip"
	"path/filepath"
	"testing"

	"github.com/gopacket/gopacket/layers"

	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
	"github.com/underpass-cni/underpass/internal/testutil"
)

// ipvlan program tests: the slaves share the parent's MAC (macParent) and
// are found by IP. The end-to-end behaviour per mode is in
// test/datapath/ipvlan_test.go (VM kernels only: the dev host has no ipvlan).

var (
	ipPod  = netip.MustParseAddr("203.0.113.10")
	ipPod6 = netip.MustParseAddr("2001:db8:99::10")
)

func newIpvlanRig(tb testing.TB, mode loader.Mode) (*rig, uint32) {
	tb.Helper()
	testutil.RequireRoot(tb)
	dir := filepath.Join(testutil.MountBPFFS(tb), "underpass")
	dp, err := loader.Load(dir, loader.Options{Trace: true})
	must(tb, err)
	tb.Cleanup(func() { dp.Close() })
	m := &dp.Maps
	must(tb, datapath.PutParent(m, parentIfindex, macParent, mode))
	must(tb, datapath.SetConfig(m, datapath.Config{ServicesSynced: true, HostReachable: true}, 1))
	id, err := datapath.Register(m, datapath.Endpoint{
		ContainerID: "ctr-ipvlan", IfName: "eth0", ParentIfindex: parentIfindex, Mode: mode, MAC: macParent,
		Addrs: []netip.Prefix{netip.PrefixFrom(ipPod, 24), netip.PrefixFrom(ipPod6, 64)},
	})
	must(tb, err)
	hosts := datapath.HostSet{}
	hosts.Add(netip.PrefixFrom(ipHost, 32), loader.HostLocal)
	must(tb, datapath.SyncHostCIDRs(m, hosts))
	must(tb, datapath.SyncServiceCIDRs(m, []netip.Prefix{netip.MustParsePrefix("10.96.0.0/16"), netip.MustParsePrefix("fd00:96::/108")}))
	_, _, err = datapath.SyncLiveServices(m, map[netip.Addr]bool{vipLive: true, vip6Live: true})
	must(tb, err)
	return &rig{dp: dp}, id
}

func TestIpvlanHostToEndpoint(t *testing.T) {
	for _, mode := range []loader.Mode{loader.ModeIPvlanL2, loader.ModeIPvlanL3, loader.ModeIPvlanL3S} {
		t.Run(mode.String(), func(t *testing.T) {
			r, id := newIpvlanRig(t, mode)
			for _, tc := range []struct {
				name  string
				frame []byte
			}{
				// On a shared subnet the host resolves the slave to the parent's MAC.
				{"to parent MAC v4", icmpEcho(t, macParent, macParent, ipHost, ipPod)},
				{"to parent MAC v6", icmpEcho(t, macParent, macParent, ipHost6, ipPod6)},
				// A routed pod subnet (L3/L3S): the host's frame is addressed
				// to the gateway and is taken back by IP, readdressed.
				{"via gateway v4", icmpEcho(t, macParent, macGW, ipHost, ipPod)},
				{"via gateway v6", icmpEcho(t, macParent, macGW, ipHost6, ipPod6)},
			} {
				t.Run(tc.name, func(t *testing.T) {
					before := r.epStats(t, id)
					res := r.parent(t, tc.frame)
					wantRedirect(t, res, id)
					want := append(append([]byte{}, macParent...), tc.frame[6:]...)
					if string(res.out[:len(tc.frame)]) != string(want) {
						t.Fatalf("hairpinned frame: got % x, want the parent's MAC as destination and nothing else changed", res.out[:14])
					}
					if after := r.epStats(t, id); after.HostToEp.Packets != before.HostToEp.Packets+1 {
						t.Fatalf("host_to_ep %+v -> %+v", before.HostToEp, after.HostToEp)
					}
				})
			}
			t.Run("ARP reply to the slave", func(t *testing.T) {
				f := arp(t, layers.ARPReply, macParent, macParent, macParent, ipHost, ipPod)
				wantRedirect(t, r.parent(t, f), id)
			})
			t.Run("host asks for the slave", func(t *testing.T) {
				res := r.parent(t, arp(t, layers.ARPRequest, macParent, macBcast, macParent, ipHost, ipPod))
				if res.verdict != actPass || res.trace.Kind != uint32(loader.TraceClone) {
					t.Fatalf("verdict %d trace %+v, want the original passed and a clone to ingress", res.verdict, res.trace)
				}
			})
			t.Run("host to the wire is untouched", func(t *testing.T) {
				f := icmpEcho(t, macParent, macGW, ipHost, ipRemote)
				wantPass(t, r.parent(t, f), f)
			})
			t.Run("blocked host", func(t *testing.T) {
				r.setConfig(t, datapath.Config{ServicesSynced: true, HostReachable: false})
				defer r.setConfig(t, datapath.Config{ServicesSynced: true, HostReachable: true})
				if res := r.parent(t, icmpEcho(t, macParent, macGW, ipHost, ipPod)); res.verdict != actShot {
					t.Fatalf("verdict %d, want drop", res.verdict)
				}
				// A masqueraded Service flow the host forwards to the
				// slave passes the parent, and the slave's own egress
				// program (where an ipvlan pod's frames to the host are
				// judged) lets its answer through, and nothing else.
				_, egress := loadEndpoint(t, r.dp, id)
				masq, backend := netip.AddrPortFrom(ipHost, 40000), netip.AddrPortFrom(ipPod, 8080)
				reply := segment(t, macParent, macParent, backend, masq, layers.IPProtocolTCP)
				if res := r.run(t, egress, reply); res.verdict != actShot {
					t.Fatalf("reply before the flow: verdict %d, want drop", res.verdict)
				}
				r.ingress, r.mark = parentIfindex, loader.MarkSteered
				wantRedirect(t, r.parent(t, segment(t, macParent, macGW, masq, backend, layers.IPProtocolTCP)), id)
				r.ingress, r.mark = 0, 0
				if res := r.run(t, egress, reply); res.verdict != actOK {
					t.Fatalf("reply to the forwarded Service flow: verdict %d, want pass", res.verdict)
				}
				other := segment(t, macParent, macParent, backend, netip.AddrPortFrom(ipHost, 40001), layers.IPProtocolTCP)
				if res := r.run(t, egress, other); res.verdict != actShot {
					t.Fatalf("to another host port: verdict %d, want drop", res.verdict)
				}
			})
		})
	}
}

// A slave's traffic leaves with the parent's MAC as source: the source IP
// names the endpoint, for steering and the stale guard.
func TestIpvlanEndpointTraffic(t *testing.T) {
	r, id := newIpvlanRig(t, loader.ModeIPvlanL2)
	t.Run("live VIP steered", func(t *testing.T) {
		f := tcpSYN(t, macParent, macGW, ipPod, vipLive, "S")
		res := r.parent(t, f)
		wantSteered(t, res, id)
		want := append(append([]byte{}, macParent...), f[6:]...)
		if string(res.out[:len(f)]) != string(want) {
			t.Fatalf("steered frame: got % x", res.out[:14])
		}
	})
	t.Run("stale VIP dropped and counted", func(t *testing.T) {
		before := r.epStats(t, id)
		for _, f := range [][]byte{
			tcpSYN(t, macParent, macGW, ipPod, vipStale, "S"),
			tcpSYN(t, macParent, macGW, ipPod6, vip6Stale, "S"),
		} {
			if res := r.parent(t, f); res.verdict != actShot {
				t.Fatalf("verdict %d, want drop", res.verdict)
			}
		}
		if after := r.epStats(t, id); after.StaleDropped != before.StaleDropped+2 {
			t.Fatalf("stale_dropped %d -> %d", before.StaleDropped, after.StaleDropped)
		}
	})
	t.Run("to the wire untouched", func(t *testing.T) {
		f := icmpEcho(t, macParent, macGW, ipPod, ipRemote)
		wantPass(t, r.parent(t, f), f)
	})
}
