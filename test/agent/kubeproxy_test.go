package agent_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"

	"github.com/underpass-cni/underpass/internal/loader"
	"github.com/underpass-cni/underpass/internal/testutil"
	"github.com/underpass-cni/underpass/test/k8s/kapi"
	"github.com/underpass-cni/underpass/test/netenv"
)

const kubeNode = "underpass-node"

// A pod's connection to a ClusterIP whose backend is another underlay pod
// (on this node, or elsewhere on the wire), through the real kube-proxy in
// iptables, nftables and ipvs modes with its default settings (no
// masqueradeAll, no cluster CIDR), driven by a real kube-apiserver. The ipvs
// mode needs ip_vs (a feature, testutil.ProbeIPVS): the kernel matrix
// requires it (make test-kernels), a host without it skips.
//
// Seen on a real node before the agent masqueraded these flows: kube-proxy
// DNATs the steered SYN to the backend, the backend answers the client
// straight over the underlay from its own address, and the client never
// gets a SYN-ACK from the VIP. The test first shows that failure with
// services.masquerade off, then the fix: the backend sees the node's
// address and the client gets its answer.
func TestServiceToPodBackendThroughKubeProxy(t *testing.T) {
	for _, mode := range []string{"iptables", "nftables", "ipvs"} {
		t.Run(mode, func(t *testing.T) { serviceToPodBackend(t, mode) })
	}
}

// proxyLab is a lab for the real kube-proxy in mode: the apiserver, a
// client and a backend pod on the parent, a backend on the wire, both
// backends answering on :8080 with the address they saw.
type proxyLab struct {
	*lab
	u                   *netenv.Uplink
	cs                  kubernetes.Interface
	kubeconfig          string
	client, local, wire *netenv.Container
}

func newProxyLab(t *testing.T, mode string) *proxyLab {
	t.Helper()
	tools := []string{"iptables", "nft"}
	if mode == "ipvs" {
		testutil.SkipIfNotSupported(t, testutil.ProbeIPVS()) // the kernel matrix runs it
		tools = append(tools, "ipset")                       // kube-proxy's ipvs mode keeps its sets with it
	}
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("kube-proxy needs %s (make deps installs it): %v", tool, err)
		}
	}
	l := newLab(t, netenv.Options{})
	p := &proxyLab{lab: l, u: l.Uplinks[0]}
	c, kubeconfig := startKube(t, l)
	p.cs, p.kubeconfig = c.Client, kubeconfig
	p.client = l.AddMacvlanContainer("client", p.u.IP4(10), netip.Prefix{})
	p.local = l.AddMacvlanContainer("backend", p.u.IP4(11), netip.Prefix{})
	p.wire = l.AddWireHost("remote", p.u.IP4(20), netip.Prefix{})
	for _, s := range []*netenv.Container{p.local, p.wire} {
		serveRemoteAddr(t, s.NS, netip.AddrPortFrom(s.IP4.Addr(), 8080))
	}
	return p
}

func serviceToPodBackend(t *testing.T, mode string) {
	p := newProxyLab(t, mode)
	l, u, cs, kubeconfig := p.lab, p.u, p.cs, p.kubeconfig
	client, local, wire := p.client, p.local, p.wire

	writeConfig := func(masquerade bool) {
		l.writeConfig(fmt.Sprintf(`
staleServices:
  cidrs: [%s, %s]
services:
  kubernetes: "true"
  kubeconfig: %s
  masquerade: %v
`, kapi.ServiceCIDRv4, kapi.ServiceCIDRv6, kubeconfig, masquerade))
	}
	writeConfig(false)
	// A table left behind by an earlier agent (stopping leaves it) goes
	// when one starts with services.masquerade: false.
	if out, _, err := l.Node.Exec(context.Background(), "nft", "add", "table", "inet", "underpass"); err != nil {
		t.Fatalf("leftover table: %v %s", err, out)
	}
	ag := l.start(agentBin)
	ag.waitReady()
	if _, _, err := l.Node.Exec(context.Background(), "nft", "list", "table", "inet", "underpass"); err == nil {
		t.Fatal("a leftover table inet underpass survived an agent start with services.masquerade: false")
	}
	createNode(t, cs, u.Node4.Addr())
	// Every Kubernetes node forwards; the lab's node must too.
	must(t, l.Node.Do(func() error { return os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1"), 0o644) }))
	dp := l.open()
	l.register(dp, client, "client")
	l.register(dp, local, "backend")

	toLocal := createBackedService(t, cs, "to-local", local.IP4.Addr())
	toWire := createBackedService(t, cs, "to-wire", wire.IP4.Addr())
	startKubeProxy(t, l, mode, kubeconfig)
	dumpOnFailure(t, l, mode)
	for _, vip := range []netip.Addr{toLocal, toWire} {
		waitProgrammed(t, l, mode, vip)
		waitFor(t, 10*time.Second, vip.String()+" live in the datapath", l.liveHas([]netip.Addr{vip}, true))
	}

	// Before: the SYN is DNATed to the backend, whose SYN-ACK goes straight
	// to the client from the backend's own address; the client resets it
	// and its connect times out. Any other failure (the node still setting
	// up) is retried: only that timeout shows the defect.
	for _, vip := range []netip.Addr{toLocal, toWire} {
		for attempt := 1; ; attempt++ {
			seen, err := askRemoteAddr(client.NS, netip.AddrPortFrom(vip, 80), 2*time.Second)
			if err == nil {
				t.Fatalf("%s answered without masquerading (backend saw %s): the test cannot show the fix", vip, seen)
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				t.Logf("without masquerade, as on a real node: client -> %s:80 times out: %v", vip, err)
				break
			}
			if attempt == 5 {
				t.Fatalf("client -> %s:80 never showed the unanswered handshake, last: %v", vip, err)
			}
			time.Sleep(time.Second)
		}
	}

	writeConfig(true)
	l.waitMetric("underpass_config_reloads_total", `result="success"`, 1)
	// What the README promises: the backend sees the node's address.
	answersThrough(t, client, map[string]netip.Addr{"backend pod on the same node": toLocal, "backend on the wire": toWire},
		u.Node4.Addr(), "the node's address")
	out, _, err := l.Node.Exec(context.Background(), "nft", "list", "table", "inet", "underpass")
	must(t, err)
	// The Service mark's rule masquerades in every mode: DNAT (iptables,
	// nftables) or IPVS, which conntrack does not record as DNAT.
	rule := fmt.Sprintf("meta mark & 0x%08x == 0x%08x", loader.MarkService, loader.MarkService)
	counted := false
	for _, line := range strings.Split(out, "\n") {
		if strings.Contains(line, rule) && strings.Contains(line, "masquerade") && !strings.Contains(line, "packets 0 ") {
			counted = true
		}
	}
	if !counted {
		t.Fatalf("table inet underpass does not show the flows masqueraded by its %s rule:\n%s", mode, out)
	}

	// Something flushes the table (a firewall reload): the agent's heal
	// puts the rule back.
	if _, stderr, err := l.Node.Exec(context.Background(), "nft", "flush", "table", "inet", "underpass"); err != nil {
		t.Fatalf("nft flush: %v %s", err, stderr)
	}
	waitFor(t, 10*time.Second, "the agent reinstalls its flushed rule", func() bool {
		out, _, _ := l.Node.Exec(context.Background(), "nft", "list", "table", "inet", "underpass")
		return strings.Contains(out, "masquerade")
	})
	if _, err := askRemoteAddr(client.NS, netip.AddrPortFrom(toLocal, 80), 2*time.Second); err != nil {
		t.Fatalf("after the heal: %v", err)
	}

	// Off again, live: the table goes, and so do the answers.
	writeConfig(false)
	l.waitMetric("underpass_config_reloads_total", `result="success"`, 2)
	if _, _, err := l.Node.Exec(context.Background(), "nft", "list", "table", "inet", "underpass"); err == nil {
		t.Fatal("table inet underpass still there with services.masquerade: false")
	}
}

// createNode registers the lab's node, whose address kube-proxy looks up.
func createNode(t testing.TB, cs kubernetes.Interface, addr netip.Addr) {
	t.Helper()
	ctx := context.Background()
	n, err := cs.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: kubeNode}}, metav1.CreateOptions{})
	must(t, err)
	n.Status.Addresses = []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: addr.String()}, {Type: corev1.NodeHostName, Address: kubeNode}}
	_, err = cs.CoreV1().Nodes().UpdateStatus(ctx, n, metav1.UpdateOptions{})
	must(t, err)
}

// createBackedService creates a ClusterIP Service, port 80 -> 8080, with
// a ready endpoint at each of backends (no controller-manager here: the
// test writes the EndpointSlice), and returns its VIP.
func createBackedService(t testing.TB, cs kubernetes.Interface, name string, backends ...netip.Addr) netip.Addr {
	t.Helper()
	ctx := context.Background()
	svc, err := cs.CoreV1().Services("default").Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080), Protocol: corev1.ProtocolTCP}}},
	}, metav1.CreateOptions{})
	must(t, err)
	_, err = cs.DiscoveryV1().EndpointSlices("default").Create(ctx, backendSlice(name, backends...), metav1.CreateOptions{})
	must(t, err)
	return netip.MustParseAddr(svc.Spec.ClusterIP)
}

// backendSlice is Service name's slice: port http 8080, a ready endpoint
// at each of backends.
func backendSlice(name string, backends ...netip.Addr) *discoveryv1.EndpointSlice {
	ready, port, pname, proto := true, int32(8080), "http", corev1.ProtocolTCP
	s := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: name + "-1", Labels: map[string]string{discoveryv1.LabelServiceName: name}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: &pname, Port: &port, Protocol: &proto}},
	}
	for _, b := range backends {
		s.Endpoints = append(s.Endpoints, discoveryv1.Endpoint{Addresses: []string{b.String()}, Conditions: discoveryv1.EndpointConditions{Ready: &ready}})
	}
	return s
}

// startKubeProxy runs the real kube-proxy in the lab's node netns with its
// defaults for mode (see kapi.KubeProxyConfig for the few settings a test
// node changes). It is killed when the test ends, or by the returned stop,
// which leaves its rules behind as a killed kube-proxy does (see
// cleanupKubeProxy).
func startKubeProxy(t testing.TB, l *lab, mode, kubeconfig string) (stop func()) {
	t.Helper()
	bin, err := kapi.BinDir()
	must(t, err)
	bin = filepath.Join(bin, "kube-proxy")
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("no kube-proxy (test/k8s/build.sh builds it): %v", err)
	}
	cfg := filepath.Join(t.TempDir(), "kube-proxy.yaml")
	must(t, os.WriteFile(cfg, []byte(kapi.KubeProxyConfig(mode, kubeNode, kubeconfig)), 0o644))
	out := &testutil.SyncBuffer{}
	cmd := l.Node.Command(context.Background(), bin, "--config", cfg, "--v=2")
	cmd.Stdout, cmd.Stderr = out, out
	must(t, cmd.Start())
	var once sync.Once
	stop = func() {
		once.Do(func() {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
		})
	}
	t.Cleanup(func() {
		stop()
		if t.Failed() {
			t.Logf("kube-proxy (%s) log:\n%s", mode, out.String())
		}
	})
	return stop
}

// waitProgrammed waits until kube-proxy's rules name vip: for ipvs, until
// the virtual service vip:80 has a real server.
func waitProgrammed(t testing.TB, l *lab, mode string, vip netip.Addr) {
	t.Helper()
	waitFor(t, 2*time.Minute, "kube-proxy ("+mode+") programs "+vip.String(), func() bool {
		var out string
		switch mode {
		case "nftables":
			out, _, _ = l.Node.Exec(context.Background(), "nft", "list", "table", "ip", "kube-proxy")
		case "ipvs":
			out, _, _ = l.Node.Exec(context.Background(), "cat", "/proc/net/ip_vs")
			return ipvsHasBackend(out, netip.AddrPortFrom(vip, 80))
		default:
			out, _, _ = l.Node.Exec(context.Background(), "iptables-save", "-t", "nat")
		}
		return strings.Contains(out, vip.String())
	})
}

// ipvsHasBackend reads /proc/net/ip_vs (addresses and ports in hex, a
// virtual service's real servers on the "->" lines below it) and says
// whether the TCP virtual service vs has a real server.
func ipvsHasBackend(procNetIPVS string, vs netip.AddrPort) bool {
	var want string
	if a := vs.Addr().Unmap(); a.Is4() {
		b := a.As4()
		want = fmt.Sprintf("%02X%02X%02X%02X:%04X", b[0], b[1], b[2], b[3], vs.Port())
	} else { // %pI6: eight groups of four hex digits
		b := a.As16()
		g := make([]string, 8)
		for i := range g {
			g[i] = fmt.Sprintf("%02x%02x", b[2*i], b[2*i+1])
		}
		want = fmt.Sprintf("[%s]:%04X", strings.Join(g, ":"), vs.Port())
	}
	in := false
	for _, line := range strings.Split(procNetIPVS, "\n") {
		f := strings.Fields(line)
		switch {
		case len(f) >= 2 && f[0] == "->":
			if in && f[1] != "RemoteAddress:Port" {
				return true
			}
		case len(f) >= 2: // a virtual service, or a header
			in = f[0] == "TCP" && f[1] == want
		}
	}
	return false
}

// dumpOnFailure logs what the node's netfilter, IPVS and conntrack hold
// when the test fails (before the lab goes): the state the failing check
// saw.
func dumpOnFailure(t testing.TB, l *lab, mode string) {
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		cmds := [][]string{{"nft", "list", "ruleset"}, {"cat", "/proc/net/nf_conntrack"}}
		if mode == "ipvs" {
			cmds = append(cmds, []string{"cat", "/proc/net/ip_vs"}, []string{"cat", "/proc/net/ip_vs_conn"},
				[]string{"ip", "-4", "addr", "show", "kube-ipvs0"}, []string{"ipset", "list", "-t"})
		}
		for _, c := range cmds {
			out, stderr, err := l.Node.Exec(context.Background(), c[0], c[1:]...)
			if err != nil {
				out += stderr + err.Error()
			}
			t.Logf("node (%s mode) at failure, %s:\n%s", mode, strings.Join(c, " "), out)
		}
	})
}

// serveRemoteAddr answers every TCP connection with the address it came
// from and the one it reached (the backend's own), one line.
func serveRemoteAddr(t testing.TB, ns *netenv.NS, addr netip.AddrPort) {
	t.Helper()
	netenv.ServeTCP(t, ns, addr, func(c net.Conn) { fmt.Fprintln(c, c.RemoteAddr().String(), c.LocalAddr().String()) })
}

// answersThrough connects from client to each VIP's port 80 until it
// answers, and wants the backend to have seen the connection come from
// source (what names it).
func answersThrough(t *testing.T, client *netenv.Container, vips map[string]netip.Addr, source netip.Addr, what string) {
	t.Helper()
	for name, vip := range vips {
		var seen string
		waitFor(t, 10*time.Second, name+" answers through "+vip.String(), func() bool {
			var err error
			seen, err = askRemoteAddr(client.NS, netip.AddrPortFrom(vip, 80), 2*time.Second)
			return err == nil
		})
		if host, _, _ := net.SplitHostPort(seen); host != source.String() {
			t.Fatalf("%s: backend saw %s, want %s %s", name, seen, what, source)
		}
		t.Logf("%s: client -> %s answered; the backend saw %s", name, netip.AddrPortFrom(vip, 80), seen)
	}
}

// askRemoteAddr connects from ns and reads the address serveRemoteAddr
// saw the connection come from.
func askRemoteAddr(ns *netenv.NS, addr netip.AddrPort, timeout time.Duration) (string, error) {
	seen, _, err := askServer(ns, addr, timeout)
	return seen, err
}

// askServer connects from ns and reads what serveRemoteAddr says: the
// address it saw the connection come from, and its own.
func askServer(ns *netenv.NS, addr netip.AddrPort, timeout time.Duration) (seen, server string, err error) {
	c, err := netenv.DialTCPConn(ns, addr, timeout)
	if err != nil {
		return "", "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(timeout))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return "", "", fmt.Errorf("read from %s: %w", addr, err)
	}
	seen, server, _ = strings.Cut(strings.TrimSpace(line), " ")
	return seen, server, nil
}
