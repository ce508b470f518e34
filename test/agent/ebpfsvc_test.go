package agent_test

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"

	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
	"github.com/underpass-cni/underpass/test/k8s/kapi"
	"github.com/underpass-cni/underpass/test/netenv"
)

// services.mode: ebpf end to end: a real kube-apiserver, the agent, pods
// whose endpoints are added through the registration API the CNI plugin
// uses (programs on their slaves), and no kube-proxy at all, so nothing on
// the host could translate a VIP: every answer below comes through the
// pods' own programs. The backend sees the client pod's own address.
func TestServicesInEBPF(t *testing.T) {
	l := newLab(t, netenv.Options{})
	u := l.Uplinks[0]
	c, kubeconfig := startKube(t, l)
	cs := c.Client
	client := l.AddMacvlanContainer("client", u.IP4(10), u.IP6(10))
	b1 := l.AddMacvlanContainer("backend1", u.IP4(11), u.IP6(11))
	b2 := l.AddMacvlanContainer("backend2", u.IP4(12), netip.Prefix{})
	wire := l.AddWireHost("remote", u.IP4(20), netip.Prefix{})
	for _, s := range []*netenv.Container{b1, b2, wire} {
		serveRemoteAddr(t, s.NS, netip.AddrPortFrom(s.IP4.Addr(), 8080))
	}
	serveRemoteAddr(t, b1.NS, netip.AddrPortFrom(b1.IP6.Addr(), 8080))
	l.writeConfig(fmt.Sprintf(`
staleServices:
  cidrs: [%s, %s]
  action: reject
services:
  kubernetes: "true"
  kubeconfig: %s
  mode: ebpf
`, kapi.ServiceCIDRv4, kapi.ServiceCIDRv6, kubeconfig))
	ag := l.start(agentBin)
	ag.waitReady()
	dp := l.open()
	for _, p := range []*netenv.Container{client, b1, b2} {
		addEndpoint(t, l.Node, dp, p, u.MAC)
	}

	toLocal := createBackedService(t, cs, "to-local", b1.IP4.Addr())
	toWire := createBackedService(t, cs, "to-wire", wire.IP4.Addr())
	spread := createBackedService(t, cs, "spread", b1.IP4.Addr(), b2.IP4.Addr(), wire.IP4.Addr())
	waitFor(t, 10*time.Second, "the frontends in the datapath", func() bool {
		fs, err := datapath.Frontends(&dp.Maps)
		n := map[netip.Addr]int{}
		for _, f := range fs {
			n[f.VIP] = len(f.Backends)
		}
		return err == nil && n[toLocal] == 1 && n[toWire] == 1 && n[spread] == 3
	})

	answersThrough(t, client, map[string]netip.Addr{"backend pod on the same node": toLocal, "backend on the wire": toWire},
		client.IP4.Addr(), "the client pod's own address")

	// IPv6: a single-stack IPv6 Service, a backend pod on the same node.
	v6 := createBackedService6(t, cs, "v6", b1.IP6.Addr())
	waitFor(t, 10*time.Second, "the IPv6 frontend in the datapath", func() bool {
		fs, err := datapath.Frontends(&dp.Maps)
		return err == nil && slices.ContainsFunc(fs, func(f datapath.Frontend) bool { return f.VIP == v6 && len(f.Backends) == 1 })
	})
	answersThrough(t, client, map[string]netip.Addr{"IPv6 backend pod on the same node": v6}, client.IP6.Addr(), "the client pod's own address")

	// New connections spread over the three backends; each reply comes
	// back from the VIP (the client's socket would reset anything else).
	const conns = 90
	perBackend := map[string]int{}
	for range conns {
		_, server, err := askServer(client.NS, netip.AddrPortFrom(spread, 80), 2*time.Second)
		must(t, err)
		perBackend[server]++
	}
	t.Logf("%d connections to %s:80 reached %v", conns, spread, perBackend)
	for _, b := range []*netenv.Container{b1, b2, wire} {
		// 30 expected each; under 10 is 1 in 10^5 for a fair choice.
		if n := perBackend[netip.AddrPortFrom(b.IP4.Addr(), 8080).String()]; n < 10 {
			t.Errorf("backend %s got %d of %d connections", b.IP4.Addr(), n, conns)
		}
	}
	stats, err := datapath.ServiceStats(&dp.Maps)
	must(t, err)
	t.Logf("translated %d packets, reversed %d, new flows %d", stats[loader.SvcStatTranslated].Packets,
		stats[loader.SvcStatReversed].Packets, stats[loader.SvcStatNewFlows].Packets)
	if n := stats[loader.SvcStatNewFlows].Packets; n < conns+2 {
		t.Errorf("new flows %d, want at least %d", n, conns+2)
	}
	// The agent's per-Service series name the Service and its port.
	spreadSeries := `port="http",service="default/spread"`
	if n := l.metric("underpass_service_flows_total", spreadSeries); n < conns {
		t.Errorf("underpass_service_flows_total{%s} = %v, want at least %d", spreadSeries, n, conns)
	}
	if n := l.metric("underpass_service_packets_total", `direction="from_backend",`+spreadSeries); n < conns {
		t.Errorf("underpass_service_packets_total{%s,from_backend} = %v, want at least %d replies", spreadSeries, n, conns)
	}
	if n := l.metric("underpass_service_flow_table_entries", `table="svc_ct"`); n < conns {
		t.Errorf("underpass_service_flow_table_entries{svc_ct} = %v, want the %d flows still there", n, conns)
	}

	// A rollout under an open connection: its backend turns terminating
	// (still serving) and a new one is ready. The open connection goes on
	// with its backend; new ones go to the new backend only. Once the old
	// backend is gone from the slice, the open connection fails at once (a
	// reset from the backend its next packet meets) instead of hanging.
	for _, b := range []*netenv.Container{b1, b2} {
		serveEcho(t, b.NS, netip.AddrPortFrom(b.IP4.Addr(), 7070))
	}
	long := createBackedService(t, cs, "long")
	setSlice := func(ready []netip.Addr, terminating ...netip.Addr) {
		s := backendSlice("long", ready...)
		port := int32(7070)
		s.Ports[0].Port = &port
		no, yes := false, true
		for _, a := range terminating {
			s.Endpoints = append(s.Endpoints, discoveryv1.Endpoint{Addresses: []string{a.String()},
				Conditions: discoveryv1.EndpointConditions{Ready: &no, Serving: &yes, Terminating: &yes}})
		}
		_, err := cs.DiscoveryV1().EndpointSlices("default").Update(context.Background(), s, metav1.UpdateOptions{})
		must(t, err)
	}
	setSlice([]netip.Addr{b1.IP4.Addr()})
	at := func(b *netenv.Container) string { return netip.AddrPortFrom(b.IP4.Addr(), 7070).String() }
	var conn net.Conn
	waitFor(t, 10*time.Second, "a connection to long on backend1", func() bool {
		c, err := netenv.DialTCPConn(client.NS, netip.AddrPortFrom(long, 80), time.Second)
		if err != nil {
			return false
		}
		conn = c
		return true
	})
	defer conn.Close()
	rd := bufio.NewReader(conn)
	ask := func() (string, error) {
		_ = conn.SetDeadline(time.Now().Add(2 * time.Second))
		if _, err := conn.Write([]byte("who\n")); err != nil {
			return "", err
		}
		line, err := rd.ReadString('\n')
		return strings.TrimSpace(line), err
	}
	if who, err := ask(); err != nil || who != at(b1) {
		t.Fatalf("open connection before the rollout: %q, %v", who, err)
	}
	setSlice([]netip.Addr{b2.IP4.Addr()}, b1.IP4.Addr())
	waitFor(t, 10*time.Second, "new connections to long on backend2", func() bool {
		who, err := askEcho(client.NS, netip.AddrPortFrom(long, 80))
		return err == nil && who == at(b2)
	})
	for i := range 20 {
		if who, err := askEcho(client.NS, netip.AddrPortFrom(long, 80)); err != nil || who != at(b2) {
			t.Fatalf("new connection %d during the rollout: %q, %v", i, who, err)
		}
		if who, err := ask(); err != nil || who != at(b1) {
			t.Fatalf("the open connection during the rollout (%d): %q, %v", i, who, err)
		}
	}
	setSlice([]netip.Addr{b2.IP4.Addr()})
	waitFor(t, 10*time.Second, "the open connection reset once its backend left", func() bool {
		_, err := ask()
		return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
	})

	// A source port taken again (a client binding a fixed port, or a
	// busy one's ports coming round) for a new connection, after the
	// connection before it on the tuple ended, while that connection's
	// backend drains: the new connection goes to a ready backend, as
	// with kube-proxy (conntrack takes a SYN on a closed entry for a new
	// flow), not after the old flow to the draining one, whose kernel
	// would take the SYN on its TIME_WAIT socket. The server closes
	// first (serveRemoteAddr), so the client's port is free at once.
	reuse := createBackedService(t, cs, "reuse", b1.IP4.Addr())
	// Below the ephemeral range: no connection of the lab's takes it.
	const reusedPort = 23123
	serverFrom := func() (string, error) {
		var c net.Conn
		var err error
		// The last connection's socket may sit in LAST_ACK for a
		// moment more (until the server's ACK is handled), which
		// keeps the tuple: connect says EADDRNOTAVAIL.
		for end := time.Now().Add(time.Second); ; time.Sleep(20 * time.Millisecond) {
			c, err = netenv.DialTCPFrom(client.NS, reusedPort, netip.AddrPortFrom(reuse, 80), 2*time.Second)
			if !errors.Is(err, syscall.EADDRNOTAVAIL) || time.Now().After(end) {
				break
			}
		}
		if err != nil {
			return "", err
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(2 * time.Second))
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil {
			return "", err
		}
		_, server, _ := strings.Cut(strings.TrimSpace(line), " ")
		// Read the server's FIN before closing: the client's
		// socket ends without TIME_WAIT, its port free again.
		_, _ = c.Read(make([]byte, 1))
		return server, nil
	}
	at8080 := func(b *netenv.Container) string { return netip.AddrPortFrom(b.IP4.Addr(), 8080).String() }
	waitFor(t, 10*time.Second, "a connection to reuse on backend1", func() bool {
		server, err := serverFrom()
		return err == nil && server == at8080(b1)
	})
	s := backendSlice("reuse", b2.IP4.Addr())
	no, yes := false, true
	s.Endpoints = append(s.Endpoints, discoveryv1.Endpoint{Addresses: []string{b1.IP4.Addr().String()},
		Conditions: discoveryv1.EndpointConditions{Ready: &no, Serving: &yes, Terminating: &yes}})
	_, err = cs.DiscoveryV1().EndpointSlices("default").Update(context.Background(), s, metav1.UpdateOptions{})
	must(t, err)
	waitFor(t, 10*time.Second, "new connections to reuse on backend2", func() bool {
		_, server, err := askServer(client.NS, netip.AddrPortFrom(reuse, 80), 2*time.Second)
		return err == nil && server == at8080(b2)
	})
	for i := range 3 {
		if server, err := serverFrom(); err != nil || server != at8080(b2) {
			t.Fatalf("connection %d from port %d again, backend1 draining: reached %q (%v), want backend2 %s",
				i, reusedPort, server, err, at8080(b2))
		}
	}

	// Two Services with a backend in common, reached from one client
	// port (SO_REUSEADDR; Linux's ephemeral ports do the same by chance:
	// a port is unique per destination, and the destinations are the
	// VIPs). The backend would see both connections on one tuple: the
	// second takes the other backend, or, with none, is dropped while
	// the first goes on. Before, the second took the tuple's reply entry
	// half the time, and one of the two connections failed.
	twin := func(name string, backends ...netip.Addr) netip.Addr {
		vip := createBackedService(t, cs, name)
		sl := backendSlice(name, backends...)
		port := int32(7070)
		sl.Ports[0].Port = &port
		_, err := cs.DiscoveryV1().EndpointSlices("default").Update(context.Background(), sl, metav1.UpdateOptions{})
		must(t, err)
		return vip
	}
	twinA, twinB := twin("twin-a", b1.IP4.Addr()), twin("twin-b", b1.IP4.Addr(), b2.IP4.Addr())
	waitFor(t, 10*time.Second, "twin-a and twin-b in the datapath", func() bool {
		fs, err := datapath.Frontends(&dp.Maps)
		n := map[netip.Addr]int{}
		for _, f := range fs {
			n[f.VIP] = len(f.Backends)
		}
		return err == nil && n[twinA] == 1 && n[twinB] == 2
	})
	whoOn := func(c net.Conn) (string, error) {
		_ = c.SetDeadline(time.Now().Add(2 * time.Second))
		if _, err := c.Write([]byte("who\n")); err != nil {
			return "", err
		}
		line, err := bufio.NewReader(c).ReadString('\n')
		return strings.TrimSpace(line), err
	}
	// Ports below the ephemeral range, one per try: a closed client
	// socket keeps its tuple in TIME_WAIT.
	for port := uint16(23130); port < 23142; port++ {
		ca, err := netenv.DialTCPFrom(client.NS, port, netip.AddrPortFrom(twinA, 80), 2*time.Second)
		must(t, err)
		if who, err := whoOn(ca); err != nil || who != at(b1) {
			t.Fatalf("twin-a from port %d: %q, %v", port, who, err)
		}
		cb, err := netenv.DialTCPFrom(client.NS, port, netip.AddrPortFrom(twinB, 80), 2*time.Second)
		if err != nil {
			t.Fatalf("twin-b from port %d, while twin-a's connection from it is open: %v", port, err)
		}
		if who, err := whoOn(cb); err != nil || who != at(b2) {
			t.Fatalf("twin-b from port %d: %q, %v; want backend2 %s (backend1 has the tuple)", port, who, err, at(b2))
		}
		if who, err := whoOn(ca); err != nil || who != at(b1) {
			t.Fatalf("twin-a's connection from port %d after twin-b's: %q, %v", port, who, err)
		}
		_ = cb.Close()
		_ = ca.Close()
	}
	// twin-b's only backend now the one in common: nothing free.
	sl := backendSlice("twin-b", b1.IP4.Addr())
	port7070 := int32(7070)
	sl.Ports[0].Port = &port7070
	_, err = cs.DiscoveryV1().EndpointSlices("default").Update(context.Background(), sl, metav1.UpdateOptions{})
	must(t, err)
	waitFor(t, 10*time.Second, "twin-b on backend1 only", func() bool {
		fs, err := datapath.Frontends(&dp.Maps)
		return err == nil && slices.ContainsFunc(fs, func(f datapath.Frontend) bool { return f.VIP == twinB && len(f.Backends) == 1 })
	})
	inUse := l.endpointStats(t, dp, client).Drops[loader.DropSvcTupleInUse]
	ca, err := netenv.DialTCPFrom(client.NS, 23150, netip.AddrPortFrom(twinA, 80), 2*time.Second)
	must(t, err)
	if _, err := netenv.DialTCPFrom(client.NS, 23150, netip.AddrPortFrom(twinB, 80), 2*time.Second); err == nil {
		t.Errorf("twin-b from port 23150 connected while twin-a's connection holds the tuple at its only backend")
	}
	if who, err := whoOn(ca); err != nil || who != at(b1) {
		t.Fatalf("twin-a's connection after twin-b's refused one: %q, %v", who, err)
	}
	_ = ca.Close()
	if n := l.endpointStats(t, dp, client).Drops[loader.DropSvcTupleInUse]; n <= inUse {
		t.Errorf("service_tuple_in_use drops %d -> %d, want more", inUse, n)
	}

	// UDP to a backend with nothing on the port: the backend's port
	// unreachable reaches the client's connected socket quoting the VIP
	// (the ingress program translates the error), so it fails at once.
	// (Only once translated: before, the stale guard's reject refuses it.)
	udpClosed := createUDPService(t, cs, "udp-closed", 53, 9999, b1.IP4.Addr())
	waitFor(t, 10*time.Second, "the UDP frontend in the datapath", func() bool {
		fs, err := datapath.Frontends(&dp.Maps)
		return err == nil && slices.ContainsFunc(fs, func(f datapath.Frontend) bool { return f.VIP == udpClosed && len(f.Backends) == 1 })
	})
	rejected := l.endpointStats(t, dp, client).StaleRejected
	if err := udpRoundTrip(client.NS, netip.AddrPortFrom(udpClosed, 53)); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("UDP to a closed port behind %s: %v, want ECONNREFUSED", udpClosed, err)
	}
	if n := l.endpointStats(t, dp, client).StaleRejected; n != rejected {
		t.Errorf("the stale guard refused it (stale_rejected %d -> %d), not the backend", rejected, n)
	}

	// A datagram larger than the MTU, to a Service: the client's stack
	// fragments it, the fragments after the first (no ports in them)
	// follow the first to the backend, and the echo's fragments come back
	// from the VIP.
	serveUDPEcho(t, b1.NS, netip.AddrPortFrom(b1.IP4.Addr(), 5353))
	udpBig := createUDPService(t, cs, "udp-big", 53, 5353, b1.IP4.Addr())
	waitFor(t, 10*time.Second, "the UDP echo frontend in the datapath", func() bool {
		fs, err := datapath.Frontends(&dp.Maps)
		return err == nil && slices.ContainsFunc(fs, func(f datapath.Frontend) bool { return f.VIP == udpBig && len(f.Backends) == 1 })
	})
	if err := udpEcho(client.NS, netip.AddrPortFrom(udpBig, 53), 4000); err != nil {
		t.Errorf("a 4000-byte datagram through %s: %v", udpBig, err)
	}

	// Scaled to zero: stale, and in reject mode refused at once.
	_, err = cs.DiscoveryV1().EndpointSlices("default").Update(context.Background(), backendSlice("to-local"), metav1.UpdateOptions{})
	must(t, err)
	waitFor(t, 10*time.Second, "to-local refused once it has no backend", func() bool {
		_, err := netenv.DialTCPConn(client.NS, netip.AddrPortFrom(toLocal, 80), time.Second)
		return errors.Is(err, syscall.ECONNREFUSED)
	})
	if s := l.endpointStats(t, dp, client); s.StaleRejected == 0 {
		t.Errorf("the client's stale_rejected counter did not move")
	}
	if n := l.metric("underpass_service_backend_failures_total", `port="http",service="default/to-local"`); n < 1 {
		t.Errorf("underpass_service_backend_failures_total of to-local = %v after a refused connection", n)
	}
}

// addEndpoint registers c and attaches its programs the way the CNI
// plugin's ADD does (datapath.AddEndpoint), from node, the netns of c's
// parent, as the plugin runs in the host's: AddEndpoint attaches the
// parent program when the agent has not yet, by ifindex in the caller's
// netns (from the test's own netns it went on whatever interface has that
// index there, and the node's parent went without it).
func addEndpoint(t testing.TB, node *netenv.NS, dp *loader.Objects, c *netenv.Container, parentMAC net.HardwareAddr) {
	t.Helper()
	addEndpointMode(t, node, dp, c, parentMAC, loader.ModeMacvlan)
}

// addEndpointMode is addEndpoint for a slave of another kind (ipvlan).
func addEndpointMode(t testing.TB, node *netenv.NS, dp *loader.Objects, c *netenv.Container, parentMAC net.HardwareAddr, mode loader.Mode) {
	t.Helper()
	netns, err := ns.GetNS(c.Path)
	must(t, err)
	defer netns.Close()
	addrs := []netip.Prefix{c.IP4}
	if c.IP6.IsValid() {
		addrs = append(addrs, c.IP6)
	}
	ep := &datapath.Endpoint{ContainerID: c.NS.Name, IfName: c.IfName, Netns: c.Path, Ifindex: c.Index,
		MAC: c.MAC, Addrs: addrs, ParentIfindex: c.ParentIndex, ParentName: c.Parent, ParentMAC: parentMAC,
		Mode: mode, PodName: c.NS.Name, PodNamespace: "test"}
	must(t, node.Do(func() error {
		_, err := datapath.AddEndpoint(dp, netns, ep, datapath.AddOptions{}, nil)
		return err
	}))
}

func (l *lab) endpointStats(t *testing.T, dp *loader.Objects, c *netenv.Container) loader.EndpointStats {
	t.Helper()
	id, _, err := datapath.Find(&dp.Maps, c.NS.Name, c.IfName)
	must(t, err)
	s, err := datapath.EndpointStats(&dp.Maps, id)
	must(t, err)
	return s
}

// serveEcho answers each line of every connection with its own address.
func serveEcho(t *testing.T, ns *netenv.NS, addr netip.AddrPort) {
	t.Helper()
	netenv.ServeTCP(t, ns, addr, func(c net.Conn) {
		r := bufio.NewReader(c)
		for {
			if _, err := r.ReadString('\n'); err != nil {
				return
			}
			if _, err := fmt.Fprintln(c, c.LocalAddr()); err != nil {
				return
			}
		}
	})
}

// askEcho opens a connection, asks once, closes.
func askEcho(ns *netenv.NS, addr netip.AddrPort) (string, error) {
	c, err := netenv.DialTCPConn(ns, addr, 2*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := c.Write([]byte("who\n")); err != nil {
		return "", err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	return strings.TrimSpace(line), err
}

// createBackedService6 is createBackedService for a single-stack IPv6
// Service.
func createBackedService6(t *testing.T, cs kubernetes.Interface, name string, backends ...netip.Addr) netip.Addr {
	t.Helper()
	ctx := context.Background()
	single := corev1.IPFamilyPolicySingleStack
	svc, err := cs.CoreV1().Services("default").Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: corev1.ServiceSpec{IPFamilyPolicy: &single, IPFamilies: []corev1.IPFamily{corev1.IPv6Protocol},
			Ports: []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080), Protocol: corev1.ProtocolTCP}}},
	}, metav1.CreateOptions{})
	must(t, err)
	s := backendSlice(name, backends...)
	s.AddressType = discoveryv1.AddressTypeIPv6
	_, err = cs.DiscoveryV1().EndpointSlices("default").Create(ctx, s, metav1.CreateOptions{})
	must(t, err)
	return netip.MustParseAddr(svc.Spec.ClusterIP)
}

// createUDPService is a Service with one UDP port whose slice sends it to
// target on each of backends.
func createUDPService(t *testing.T, cs kubernetes.Interface, name string, port, target int32, backends ...netip.Addr) netip.Addr {
	t.Helper()
	ctx := context.Background()
	svc, err := cs.CoreV1().Services("default").Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "dns", Port: port, TargetPort: intstr.FromInt32(target),
			Protocol: corev1.ProtocolUDP}}},
	}, metav1.CreateOptions{})
	must(t, err)
	s := backendSlice(name, backends...)
	pname, proto := "dns", corev1.ProtocolUDP
	s.Ports = []discoveryv1.EndpointPort{{Name: &pname, Port: &target, Protocol: &proto}}
	_, err = cs.DiscoveryV1().EndpointSlices("default").Create(ctx, s, metav1.CreateOptions{})
	must(t, err)
	return netip.MustParseAddr(svc.Spec.ClusterIP)
}

// udpRoundTrip sends a datagram to addr from a connected socket in ns and
// waits a second for an answer: nil if one came, the socket's error else
// (ECONNREFUSED once an ICMP port unreachable matched the socket).
func udpRoundTrip(ns *netenv.NS, addr netip.AddrPort) error {
	return ns.Do(func() error {
		c, err := net.Dial("udp", addr.String())
		if err != nil {
			return err
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(time.Second))
		if _, err := c.Write([]byte("ping")); err != nil {
			return err
		}
		_, err = c.Read(make([]byte, 64))
		return err
	})
}

// serveUDPEcho sends every datagram to addr back to its sender.
func serveUDPEcho(t *testing.T, ns *netenv.NS, addr netip.AddrPort) {
	t.Helper()
	var pc net.PacketConn
	must(t, ns.Do(func() error {
		var err error
		pc, err = net.ListenPacket("udp", addr.String())
		return err
	}))
	t.Cleanup(func() { pc.Close() })
	go func() {
		buf := make([]byte, 65536)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			_, _ = pc.WriteTo(buf[:n], from)
		}
	}()
}

// udpEcho sends a datagram of size bytes to addr from ns and wants it
// back whole.
func udpEcho(ns *netenv.NS, addr netip.AddrPort, size int) error {
	return ns.Do(func() error {
		c, err := net.Dial("udp", addr.String())
		if err != nil {
			return err
		}
		defer c.Close()
		msg := make([]byte, size)
		for i := range msg {
			msg[i] = byte(i)
		}
		got := make([]byte, size+1)
		for try := 0; try < 3; try++ {
			_ = c.SetDeadline(time.Now().Add(time.Second))
			if _, err := c.Write(msg); err != nil {
				return err
			}
			n, err := c.Read(got)
			if err != nil {
				continue
			}
			if !bytes.Equal(got[:n], msg) {
				return fmt.Errorf("echo of %d bytes came back as %d bytes, not the same", size, n)
			}
			return nil
		}
		return fmt.Errorf("no echo of a %d-byte datagram in 3 tries", size)
	})
}
