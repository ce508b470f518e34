package agent_test

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
	"github.com/underpass-cni/underpass/test/k8s/kapi"
	"github.com/underpass-cni/underpass/test/netenv"
)

// hostReachability: false cuts direct host <-> pod traffic, not Services.
// A Service whose backend is another underlay pod is the hard case: the
// host DNATs the steered flow, the agent masquerades it, and the backend
// receives it from the node's address and answers the node's address:
// both directions look like host <-> pod traffic to the datapath. Through
// the real kube-proxy (iptables, nftables and ipvs, default settings) and a real
// apiserver, the flow must work while the pods still cannot reach the host
// nor the host the pods. Before the datapath remembered the forwarded
// Service flows (svc_flows), the backend's SYN-ACK was dropped as
// host_unreachable and the client's connect timed out.
func TestHostReachabilityOffKeepsPodBackedServices(t *testing.T) {
	for _, mode := range []string{"iptables", "nftables", "ipvs"} {
		t.Run(mode, func(t *testing.T) { hostUnreachableServices(t, mode) })
	}
}

func hostUnreachableServices(t *testing.T, mode string) {
	p := newProxyLab(t, mode)
	l, u, cs, kubeconfig := p.lab, p.u, p.cs, p.kubeconfig
	client, local, wire := p.client, p.local, p.wire
	serveRemoteAddr(t, client.NS, netip.AddrPortFrom(client.IP4.Addr(), 8080))
	// Something on the node for the pods to try to reach directly.
	serveRemoteAddr(t, l.Node, netip.AddrPortFrom(u.Node4.Addr(), 8081))

	l.writeConfig(fmt.Sprintf(`
hostReachability: false
staleServices:
  cidrs: [%s, %s]
services:
  kubernetes: "true"
  kubeconfig: %s
`, kapi.ServiceCIDRv4, kapi.ServiceCIDRv6, kubeconfig))
	ag := l.start(agentBin)
	ag.waitReady()
	createNode(t, cs, u.Node4.Addr())
	must(t, l.Node.Do(func() error { return os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1"), 0o644) }))
	dp := l.open()
	clientID := l.register(dp, client, "client")
	backendID := l.register(dp, local, "backend")

	toLocal := createBackedService(t, cs, "to-local", local.IP4.Addr())
	toWire := createBackedService(t, cs, "to-wire", wire.IP4.Addr())
	startKubeProxy(t, l, mode, kubeconfig)
	for _, vip := range []netip.Addr{toLocal, toWire} {
		waitProgrammed(t, l, mode, vip)
		waitFor(t, 10*time.Second, vip.String()+" live in the datapath", l.liveHas([]netip.Addr{vip}, true))
	}

	// The Services work, the backend pod's among them, and the backends see
	// the node's address (the masquerade).
	for _, tc := range []struct {
		name string
		vip  netip.Addr
	}{{"backend pod on the same node", toLocal}, {"backend on the wire", toWire}} {
		var seen string
		var err error
		for attempt := 1; attempt <= 5; attempt++ {
			if seen, err = askRemoteAddr(client.NS, netip.AddrPortFrom(tc.vip, 80), 2*time.Second); err == nil {
				break
			}
			t.Logf("%s: attempt %d: %v", tc.name, attempt, err)
		}
		if err != nil {
			t.Fatalf("%s: with hostReachability: false, client -> %s:80 fails: %v", tc.name, tc.vip, err)
		}
		if host, _, _ := net.SplitHostPort(seen); host != u.Node4.Addr().String() {
			t.Fatalf("%s: backend saw %s, want the node's address %s", tc.name, seen, u.Node4.Addr())
		}
		t.Logf("%s: client -> %s:80 answered with the host unreachable; the backend saw %s", tc.name, tc.vip, seen)
	}

	// And the host is still cut off from the pods both ways, the backend
	// included: its allowance is that one flow.
	drops := func(id uint32) uint64 {
		s, err := datapath.EndpointStats(&dp.Maps, id)
		must(t, err)
		return s.Drops[loader.DropHostUnreachable]
	}
	for _, tc := range []struct {
		name string
		ns   *netenv.NS
		to   netip.AddrPort
		id   uint32 // whose drop counter goes up
	}{
		{"node -> client pod", l.Node, netip.AddrPortFrom(client.IP4.Addr(), 8080), clientID},
		{"node -> backend pod", l.Node, netip.AddrPortFrom(local.IP4.Addr(), 8080), backendID},
		{"client pod -> node", client.NS, netip.AddrPortFrom(u.Node4.Addr(), 8081), clientID},
		{"backend pod -> node", local.NS, netip.AddrPortFrom(u.Node4.Addr(), 8081), backendID},
	} {
		before := drops(tc.id)
		seen, err := askRemoteAddr(tc.ns, tc.to, time.Second)
		if err == nil {
			t.Fatalf("%s: answered (%s) with hostReachability: false", tc.name, seen)
		}
		if after := drops(tc.id); after <= before {
			t.Fatalf("%s: failed (%v) but host_unreachable did not count it (%d -> %d)", tc.name, err, before, after)
		}
		t.Logf("%s: %v; host_unreachable %d -> %d", tc.name, err, before, drops(tc.id))
	}
}
