package node_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	cnins "github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"

	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
	"github.com/underpass-cni/underpass/internal/release"
	"github.com/underpass-cni/underpass/internal/testutil"
	"github.com/underpass-cni/underpass/test/k8s/kapi"
	"github.com/underpass-cni/underpass/test/node"
)

// The node's "NIC" is a veth to a netns that plays switch and gateway and
// routes nowhere: every packet of the tier stays on the machine.
const (
	nic      = "upn0"
	nodeName = "underpass-node"
)

// The node's subnet, gateway and address: the first candidate that no
// route or address of this machine touches (this VM's own NIC is on
// 192.0.2.0/24: test traffic must never find a real network).
var (
	subnet          netip.Prefix
	gateway, nodeIP netip.Addr
	ipamDir         string // host-local's leases, shared by every network of the test
)

func pickSubnet(t testing.TB) {
	t.Helper()
	var taken []netip.Prefix
	routes, err := netlink.RouteListFiltered(netlink.FAMILY_ALL, &netlink.Route{Table: unix.RT_TABLE_UNSPEC}, netlink.RT_FILTER_TABLE)
	must(t, err)
	for _, r := range routes {
		if r.Dst == nil {
			continue // default routes: everything "overlaps" them
		}
		ones, _ := r.Dst.Mask.Size()
		if a, ok := netip.AddrFromSlice(r.Dst.IP); ok && ones > 0 {
			taken = append(taken, netip.PrefixFrom(a.Unmap(), ones).Masked())
		}
	}
	addrs, err := netlink.AddrList(nil, netlink.FAMILY_ALL)
	must(t, err)
	for _, a := range addrs {
		ones, _ := a.Mask.Size()
		if ip, ok := netip.AddrFromSlice(a.IP); ok {
			taken = append(taken, netip.PrefixFrom(ip.Unmap(), ones).Masked())
		}
	}
	free := func(p netip.Prefix) bool {
		for _, q := range taken {
			if q.Overlaps(p) {
				return false
			}
		}
		return true
	}
	if !free(netip.MustParsePrefix(kapi.ServiceCIDRv4)) {
		t.Fatalf("this machine already routes or holds addresses in %s, the test Service CIDR", kapi.ServiceCIDRv4)
	}
	for _, c := range []string{"198.18.7.0/24", "198.19.7.0/24", "100.127.7.0/24"} {
		p := netip.MustParsePrefix(c)
		if free(p) {
			subnet, gateway, nodeIP = p, p.Addr().Next(), p.Addr().Next().Next()
			return
		}
	}
	t.Fatalf("no free subnet for the node among the candidates: this machine's routes %v", taken)
}

// A real node: the kubelet and containerd run pods whose network is the
// reference macvlan plugin with underpass chained after it, the agent runs
// beside them, kube-proxy (iptables mode, defaults) serves the Services.
// What the kubelet, containerd and kube-proxy do is theirs, not a stand-in
// of this repository's.
func TestRealNode(t *testing.T) {
	var rejectRow string
	// The first network is in place before the kubelet starts: containerd
	// reports the node's network ready only with a config.
	tier := startTier(t, []any{macvlanConf()})
	c, n, bpffs, agentMetrics := tier.c, tier.n, tier.bpffs, tier.agentMetrics
	work, cniBin, cniConf, bins, agentBin := tier.work, tier.cniBin, tier.cniConf, tier.bins, tier.agentBin
	stopAgent, proxy := tier.stopAgent, tier.proxy
	nets := []network{
		{name: "macvlan alone", plugins: []any{macvlanConf()}},
		{name: "underpass chained after macvlan", plugins: chainedConf(bpffs), underpass: true, metrics: agentMetrics, rejectRow: &rejectRow},
		{name: "underpass main", plugins: []any{mainConf(bpffs)}, underpass: true, metrics: agentMetrics},
	}
	image := importReleaseImage(t, n, bins)
	t.Run("the release image runs on this containerd", func(t *testing.T) { releaseImageRuns(t, n, image) })

	var rows, lifecycle []string
	for i, nw := range nets {
		t.Run(nw.name, func(t *testing.T) {
			writeConflist(t, cniConf, nw.plugins)
			time.Sleep(2 * time.Second) // containerd reloads the CNI config on a file event
			rows = append(rows, checkNetwork(t, c.Client, bpffs, fmt.Sprint(i), nw, "iptables"))
		})
	}
	// kube-proxy's other mode, on the chained network.
	proxy.Stop(10 * time.Second)
	proxy = startKubeProxy(t, work, c, "nftables")
	nw := nets[1]
	nw.name += ", kube-proxy nftables"
	t.Run(nw.name, func(t *testing.T) {
		writeConflist(t, cniConf, nw.plugins)
		time.Sleep(2 * time.Second)
		rows = append(rows, checkNetwork(t, c.Client, bpffs, "nft", nw, "nftables"))
	})
	// Services translated at the pod, kube-proxy still running: the pods'
	// programs translate before the host could, so the backend sees the
	// client pod, not the node.
	nw = nets[1]
	nw.name += ", services.mode ebpf, kube-proxy nftables present"
	nw.ebpf, nw.rejectRow = true, nil
	t.Run(nw.name, func(t *testing.T) {
		setAgentMode(t, agentMetrics, "ebpf")
		defer setAgentMode(t, agentMetrics, "host")
		rows = append(rows, checkNetwork(t, c.Client, bpffs, "ebpf", nw, "nftables"))
	})
	// The same without kube-proxy: a Deployment's rollout under requests,
	// the kubelet and the EndpointSlice controller doing what they do.
	proxy.Stop(10 * time.Second)
	var rollout string
	t.Run("services.mode ebpf, kube-proxy absent: a Deployment behind a ClusterIP, rolled out under requests", func(t *testing.T) {
		cleanupKubeProxy(t, work, "nftables")
		setAgentMode(t, agentMetrics, "ebpf")
		defer setAgentMode(t, agentMetrics, "host")
		rollout = ebpfRollout(t, c.Client, bpffs)
	})
	// Back for what follows (its cleanup stops it at the end).
	startKubeProxy(t, work, c, "nftables")
	// The upstream tests judge both: underpass chained after macvlan
	// passes them all; on plain macvlan two of them show what fails (see
	// baselineTests).
	var conformance []string
	stopDNS := func() {}
	t.Run("upstream conformance tests on underpass chained", func(t *testing.T) {
		// portmap last, as clusters chain it: the HostPort spec needs it.
		writeConflist(t, cniConf, append(slices.Clone(nets[1].plugins), portmapConf()))
		time.Sleep(2 * time.Second)
		// The cluster's DNS, on the same network: the Services specs
		// reach a Service by name first.
		stopDNS = node.StartClusterDNS(t, c.Client)
		for _, r := range runConformance(t, c, conformanceTests, 25*time.Minute) {
			conformance = append(conformance, fmt.Sprintf("| %s | %s in %s |", r.name, r.state, r.runTime.Round(time.Second)))
			if r.state != "passed" {
				t.Errorf("%s: %s: %s", r.name, r.state, r.failure)
			}
		}
	})
	t.Run("upstream conformance tests on macvlan alone", func(t *testing.T) {
		writeConflist(t, cniConf, nets[0].plugins)
		time.Sleep(2 * time.Second)
		for _, b := range baselineTests {
			for _, r := range runConformance(t, c, []string{b.spec}, b.limit) {
				conformance = append(conformance, fmt.Sprintf("| %s, macvlan alone | %s in %s |", r.name, r.state, r.runTime.Round(time.Second)))
				if r.state == "passed" {
					t.Errorf("%s passed on plain macvlan: the baseline is not what the README says", r.name)
				}
			}
		}
	})

	// CoreDNS was an endpoint of the agent process's datapath, which goes.
	stopDNS()

	// Installed as users do: the agent process above goes (its datapath
	// uninstalled), the DaemonSet brings its own, the plugin and the
	// conflist.
	stopAgent()
	must(t, os.Remove(filepath.Join(cniConf, "10-underlay.conflist")))
	must(t, os.Remove(filepath.Join(cniBin, "underpass")))
	t.Run("installed with kubectl apply -k deploy/kubernetes", func(t *testing.T) {
		installed := network{name: "underpass chained after macvlan, installed by kubectl apply -k deploy/kubernetes, kube-proxy nftables", underpass: true, metrics: defaultMetrics}
		kube := kubectlInstall(t, c, n, image, cniBin, cniConf, agentBin)
		rows = append(rows, checkNetwork(t, c.Client, defaultBPFFS, "ds", installed, "nftables"))
		lifecycle = underTraffic(t, c.Client, defaultBPFFS, "web-ds", "client-ds", "nftables", agentDisruptions(c, n, kube))
	})
	t.Run("installed with helm install deploy/helm/underpass", func(t *testing.T) {
		installed := network{name: "underpass main, installed by helm install deploy/helm/underpass, kube-proxy nftables", underpass: true, metrics: defaultMetrics}
		helmInstall(t, c, n, cniBin, cniConf, agentBin)
		rows = append(rows, checkNetwork(t, c.Client, defaultBPFFS, "helm", installed, "nftables"))
	})
	t.Logf("On a real node (kubelet, containerd %s, kube-proxy iptables mode unless said, defaults):\n| network | probes | host → pod | pod → node | pod → pod | pod → wire | pod → ClusterIP → pod | pod → ClusterIP → host network | pod → deleted Service |\n|---|---|---|---|---|---|---|---|---|\n%s",
		containerdVersion(), strings.Join(rows, "\n"))
	t.Logf("Under traffic (the DaemonSet install):\n%s", strings.Join(lifecycle, "\n"))
	t.Logf("Stale Services, reject mode (underpass chained, agent process):\n%s", rejectRow)
	t.Logf("Services translated at the pod without kube-proxy (underpass chained, agent process):\n%s", rollout)
	t.Logf("Upstream conformance tests (e2e.test, kube-proxy nftables):\n%s", strings.Join(conformance, "\n"))
}

// tier is a running node: the control plane on the node's address, the
// node (containerd, kubelet) with the reference plugins and underpass in
// its CNI bin dir, the agent as a process on a datapath of its own, and
// kube-proxy (iptables mode). It all goes, and the host is restored, when
// t ends.
type tier struct {
	c                                     *kapi.Cluster
	n                                     *node.Node
	work, cniBin, cniConf, bins, agentBin string
	bpffs, agentMetrics                   string
	stopAgent                             func()
	proxy                                 *node.Proc
}

// startTier starts the tier with first as the CNI config the kubelet
// starts with.
func startTier(t testing.TB, first []any) *tier {
	t.Helper()
	testutil.RequireRoot(t)
	for _, tool := range []string{"containerd", "runc", "ctr", "iptables", "nft"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("the node tier needs %s (make deps installs it): %v", tool, err)
		}
	}
	sweepStale(t)
	host, err := node.SaveHost()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := host.Restore(); err != nil {
			t.Errorf("restore the host: %v", err)
		}
	})
	pickSubnet(t)
	ipamDir = filepath.Join(t.TempDir(), "ipam")
	// The NIC first: the apiserver listens on the node's address, as on a
	// control-plane node, so that the kubernetes Service leads to it and
	// pods with in-cluster credentials (the agent's DaemonSet) reach it
	// through kube-proxy.
	makeNIC(t)
	keepPacketsHere(t)
	must(t, host.ShareMounts())
	tr := &tier{c: kapi.StartWith(t, kapi.Options{Address: nodeIP})}
	node.StartControlPlane(t, tr.c)
	must(t, os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1"), 0o644))

	tr.work = t.TempDir()
	tr.cniBin, tr.cniConf = filepath.Join(tr.work, "cni-bin"), filepath.Join(tr.work, "cni-conf")
	must(t, os.MkdirAll(tr.cniConf, 0o755))
	ref, err := testutil.ReferencePlugins()
	must(t, err)
	must(t, os.MkdirAll(tr.cniBin, 0o755))
	for _, p := range []string{"macvlan", "ptp", "host-local", "loopback", "portmap"} {
		must(t, os.Symlink(filepath.Join(ref, p), filepath.Join(tr.cniBin, p)))
	}
	// The release binaries, built once: the plugin and the agent run from
	// here, and the release image is made of them.
	tr.bins = filepath.Join(tr.work, "release")
	for _, b := range release.Binaries {
		must(t, testutil.BuildCommand(filepath.Join(tr.bins, b), b))
	}
	must(t, os.Symlink(filepath.Join(tr.bins, "underpass"), filepath.Join(tr.cniBin, "underpass")))
	tr.agentBin = filepath.Join(tr.bins, "underpassd")
	tr.bpffs = filepath.Join(testutil.MountBPFFS(t), "underpass")
	tr.agentMetrics, tr.stopAgent = startAgent(t, tr.agentBin, tr.work, tr.bpffs, tr.c)
	resolv := filepath.Join(tr.work, "resolv.conf")
	must(t, os.WriteFile(resolv, []byte("nameserver "+gateway.String()+"\n"), 0o644))
	// Something to reach on the node and on the wire.
	serveClientIP(t, nil, netip.AddrPortFrom(nodeIP, 18080))
	wireNS, err := cnins.GetNS("/var/run/netns/" + wireName())
	must(t, err)
	t.Cleanup(func() { wireNS.Close() })
	serveClientIP(t, wireNS, netip.AddrPortFrom(gateway, 18080))

	writeConflist(t, tr.cniConf, first)
	coredns, err := testutil.CoreDNS()
	must(t, err)
	tr.n = node.Start(t, node.Options{Cluster: tr.c, Name: nodeName, IP: nodeIP, CNIBinDir: tr.cniBin, CNIConfDir: tr.cniConf, Resolv: resolv, CoreDNS: coredns})
	tr.proxy = startKubeProxy(t, tr.work, tr.c, "iptables")
	return tr
}

// The release image's name on the node: the DaemonSet's image with this
// tag.
const (
	imageName = "ghcr.io/underpass-cni/underpass"
	imageTag  = "test"
)

// importReleaseImage builds the release image as `make image` does and
// imports it into the node's containerd; it returns its reference.
func importReleaseImage(t *testing.T, n *node.Node, bins string) string {
	ref := imageName + ":" + imageTag
	img, err := release.Image(ref, release.DefaultInputs(bins))
	must(t, err)
	archive := filepath.Join(t.TempDir(), "underpass.tar")
	f, err := os.Create(archive)
	must(t, err)
	must(t, img.WriteDockerArchive(f))
	must(t, f.Close())
	ctr(t, n, "images", "import", archive)
	t.Cleanup(func() { _ = exec.Command("ctr", "--address", n.Socket, "-n", "k8s.io", "images", "rm", ref).Run() })
	return ref
}

func ctr(t *testing.T, n *node.Node, args ...string) string {
	t.Helper()
	out, err := exec.Command("ctr", append([]string{"--address", n.Socket, "-n", "k8s.io"}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("ctr %v: %v\n%s", args, err, out)
	}
	return string(out)
}

// releaseImageRuns runs the release image's three binaries on the node's
// containerd: the image the DaemonSet runs is a working one on a real
// runtime.
func releaseImageRuns(t *testing.T, n *node.Node, ref string) {
	for i, argv := range [][]string{
		{"/usr/local/bin/underpassd", "--version"},
		{"/usr/local/bin/underpassctl", "--help"},
		{"/usr/local/bin/underpass"}, // the CNI plugin without CNI_COMMAND: its about text
		{"/bin/sh", "-c", "cmp /bin/busybox /bin/busybox && ls /usr/local/bin && test -s /etc/ssl/certs/ca-certificates.crt"},
	} {
		out := ctr(t, n, append([]string{"run", "--rm", ref, fmt.Sprintf("underpass-image-%d", i)}, argv...)...)
		t.Logf("%v in the image: %s", argv, strings.SplitN(strings.TrimSpace(out), "\n", 2)[0])
	}
}

// network is one CNI network the node's pods get.
type network struct {
	name      string
	plugins   []any
	underpass bool   // the pods are underpass endpoints
	metrics   string // the agent's metrics address
	// rejectRow, when set, receives the row of the reject-mode checks
	// (which need the process agent, whose config the test rewrites).
	rejectRow *string
	// ebpf: services.mode ebpf, the backend of a ClusterIP sees the client.
	ebpf bool
}

// checkNetwork runs a server and a client pod on nw and tries every path;
// it returns the README table row.
func checkNetwork(t *testing.T, cs kubernetes.Interface, bpffs, suffix string, nw network, proxyMode string) string {
	ctx := context.Background()
	webName, clientName := "web-"+suffix, "client-"+suffix
	createPod(t, cs, webName)
	createPod(t, cs, clientName)
	t.Cleanup(func() {
		for _, p := range []string{webName, clientName} {
			_ = cs.CoreV1().Pods("default").Delete(ctx, p, metav1.DeleteOptions{GracePeriodSeconds: new(int64)})
		}
		waitFor(t, 60*time.Second, "pods deleted", func() bool {
			l, err := cs.CoreV1().Pods("default").List(ctx, metav1.ListOptions{})
			return err == nil && len(l.Items) == 0
		})
		// The API forgets a pod deleted with grace 0 before the kubelet
		// has torn its sandbox down: the registrations go with the CNI
		// DEL that follows.
		if nw.underpass {
			waitFor(t, 60*time.Second, "the kubelet's CNI DEL unregistering the deleted pods", func() bool {
				return len(registered(t, bpffs, webName, clientName)) == 0
			})
		}
	})
	if !nw.underpass {
		// The host cannot reach its own macvlan pods: the kubelet's probes
		// time out, and the pods are restarted forever.
		start := time.Now()
		waitFor(t, 60*time.Second, "the kubelet restarting the unreachable pod", func() bool {
			p, err := cs.CoreV1().Pods("default").Get(ctx, webName, metav1.GetOptions{})
			return err == nil && len(p.Status.ContainerStatuses) > 0 && p.Status.ContainerStatuses[0].RestartCount > 0
		})
		p, err := cs.CoreV1().Pods("default").Get(ctx, webName, metav1.GetOptions{})
		must(t, err)
		ip, _ := netip.ParseAddr(p.Status.PodIP)
		host := "fail"
		if tryHTTPGet(nil, netip.AddrPortFrom(ip, 8080), "/clientip") != "" {
			host = "pass"
			t.Errorf("host reached a plain macvlan pod: the baseline is not what the README says")
		}
		t.Logf("%s: web restarted %d times (liveness probe failed), host -> pod %s", nw.name, p.Status.ContainerStatuses[0].RestartCount, host)
		return fmt.Sprintf("| %s | fail: never Ready, restarted by its liveness probe %s after creation | %s | not tried | not tried | not tried | not tried | not tried | not tried |", nw.name, time.Since(start).Round(time.Second), host)
	}

	start := time.Now()
	for _, p := range []string{webName, clientName} {
		waitPodReady(t, cs, p)
	}
	ready := time.Since(start).Round(100 * time.Millisecond)
	time.Sleep(5 * time.Second)
	for _, p := range []string{webName, clientName} {
		pod, err := cs.CoreV1().Pods("default").Get(ctx, p, metav1.GetOptions{})
		must(t, err)
		if r := pod.Status.ContainerStatuses[0].RestartCount; r != 0 {
			t.Errorf("pod %s restarted %d times: its probes failed", p, r)
		}
	}
	webIP := podIP(t, cs, webName)
	clientIP := podIP(t, cs, clientName)
	clientNS := podNetns(t, bpffs, clientName)
	t.Logf("pods: %s %s, %s %s; both Ready %s after creation, 0 restarts", webName, webIP, clientName, clientIP, ready)

	path := func(what string, from cnins.NetNS, to netip.AddrPort, wantSource netip.Addr) string {
		got := httpGet(t, from, to, "/clientip")
		if !strings.HasPrefix(got, wantSource.String()+":") {
			t.Errorf("%s: the server saw %q, want %s", what, got, wantSource)
			return "fail"
		}
		t.Logf("%s: answered, the server saw %s", what, got)
		return "pass (source " + sourceName(wantSource, clientIP) + ")"
	}
	hostPod := path("host -> pod", nil, netip.AddrPortFrom(webIP, 8080), nodeIP)
	if got := udpAsk(nil, netip.AddrPortFrom(webIP, 8081), "hostName"); got != webName {
		t.Errorf("host -> pod UDP: netexec answered %q, want %q", got, webName)
	} else {
		hostPod += ", UDP too"
	}
	podNode := path("pod -> node", clientNS, netip.AddrPortFrom(nodeIP, 18080), clientIP)
	podPod := path("pod -> pod", clientNS, netip.AddrPortFrom(webIP, 8080), clientIP)
	podWire := path("pod -> wire", clientNS, netip.AddrPortFrom(gateway, 18080), clientIP)

	vip := createService(t, cs, webName, webName)
	t.Cleanup(func() { _ = cs.CoreV1().Services("default").Delete(ctx, webName, metav1.DeleteOptions{}) })
	waitProgrammed(t, proxyMode, vip)
	// Through kube-proxy the flow is masqueraded (the backend sees the
	// node); translated at the pod it is not.
	svcSource := nodeIP
	if nw.ebpf {
		svcSource = clientIP
		waitFrontend(t, bpffs, vip)
	}
	svc := path("pod -> ClusterIP "+vip.String()+" -> pod", clientNS, netip.AddrPortFrom(vip, 80), svcSource)
	// A host-network backend (the node's own address, as the kubernetes
	// Service has on a control-plane node): delivered locally, never
	// masqueraded, so the backend sees the pod.
	hostVIP := createHostService(t, cs, "host-"+suffix, netip.AddrPortFrom(nodeIP, 18080))
	t.Cleanup(func() { _ = cs.CoreV1().Services("default").Delete(ctx, "host-"+suffix, metav1.DeleteOptions{}) })
	waitProgrammed(t, proxyMode, hostVIP)
	hostSvc := path("pod -> ClusterIP "+hostVIP.String()+" -> host-network backend", clientNS, netip.AddrPortFrom(hostVIP, 80), clientIP)
	deleted := deletedService(t, cs, nw.metrics, clientName, clientNS, webName, vip)
	if nw.rejectRow != nil {
		*nw.rejectRow = rejectMode(t, cs, nw.metrics, suffix, clientName, clientNS, vip, proxyMode)
	}
	return fmt.Sprintf("| %s | pass: Ready in %s, 0 restarts | %s | %s | %s | %s | %s | %s | %s |", nw.name, ready, hostPod, podNode, podPod, podWire, svc, hostSvc, deleted)
}

// deletedService deletes the Service name (VIP vip) and connects to it
// from the client pod once the agent's live set has dropped it: the
// connection must time out, nothing may reach the wire (its counter, not a
// sleep), and the agent's per-pod counter names the client.
func deletedService(t *testing.T, cs kubernetes.Interface, metrics, client string, clientNS cnins.NetNS, name string, vip netip.Addr) string {
	t.Helper()
	live := scrape(metrics).value("underpass_live_services")
	must(t, cs.CoreV1().Services("default").Delete(context.Background(), name, metav1.DeleteOptions{}))
	waitFor(t, 30*time.Second, "the agent dropping the deleted Service from its live set", func() bool {
		return scrape(metrics).value("underpass_live_services") == live-1
	})
	wire0 := wirePackets(t)
	drops0 := scrape(metrics).sum("underpass_endpoint_drops_total", `pod="`+client+`"`, `reason="stale_service"`)
	start := time.Now()
	c, err := dialIn(clientNS, "tcp", netip.AddrPortFrom(vip, 80), time.Second)
	if err == nil {
		c.Close()
	}
	took := time.Since(start).Round(time.Millisecond)
	wire := wirePackets(t) - wire0
	drops := scrape(metrics).sum("underpass_endpoint_drops_total", `pod="`+client+`"`, `reason="stale_service"`) - drops0
	t.Logf("pod -> deleted Service %s: %v after %s; %d packets reached the wire; underpass_endpoint_drops_total{pod=%q,reason=\"stale_service\"} +%g", vip, err, took, wire, client, drops)
	switch {
	case err == nil:
		t.Errorf("a connection to the deleted Service %s succeeded", vip)
	case wire != 0:
		t.Errorf("%d packets to the deleted Service %s reached the wire", wire, vip)
	case drops < 1:
		t.Errorf("the client's stale_service drop counter did not move (+%g)", drops)
	default:
		return fmt.Sprintf("pass: dropped, 0 packets on the wire, %s's stale_service drops +%g", client, drops)
	}
	return "fail"
}

// rejectMode switches the agent to staleServices.action: reject with
// requireEndpoints (a live reload), then connects from the client to the
// deleted Service vip and to a Service with no endpoints (scaled to zero):
// each must be refused at once by the datapath's RST, counted as rejected
// for the client. It puts the config back (drop, no requireEndpoints)
// after.
func rejectMode(t *testing.T, cs kubernetes.Interface, metrics, suffix, client string, clientNS cnins.NetNS, deletedVIP netip.Addr, proxyMode string) string {
	t.Helper()
	reconfigure := func(action string, requireEndpoints bool) {
		n := scrape(metrics).sum("underpass_config_reloads_total", `result="success"`)
		writeAgentConfig(action, requireEndpoints)
		waitFor(t, 30*time.Second, "the agent reloading its config", func() bool {
			return scrape(metrics).sum("underpass_config_reloads_total", `result="success"`) > n
		})
	}
	reconfigure("reject", true)
	t.Cleanup(func() { reconfigure("drop", false) })

	refused := func(what string, vip netip.Addr) string {
		t.Helper()
		rejected0 := scrape(metrics).sum("underpass_stale_service_packets_total", `pod="`+client+`"`, `action="rejected"`)
		start := time.Now()
		c, err := dialIn(clientNS, "tcp", netip.AddrPortFrom(vip, 80), 3*time.Second)
		if err == nil {
			c.Close()
		}
		took := time.Since(start)
		rejected := scrape(metrics).sum("underpass_stale_service_packets_total", `pod="`+client+`"`, `action="rejected"`) - rejected0
		t.Logf("reject mode, %s %s: %v after %s; underpass_stale_service_packets_total{pod=%q,action=\"rejected\"} +%g", what, vip, err, took, client, rejected)
		if err == nil || !errors.Is(err, unix.ECONNREFUSED) || rejected < 1 {
			t.Errorf("reject mode, %s %s: %v after %s, rejected +%g: want connection refused by the datapath", what, vip, err, took, rejected)
			return "fail"
		}
		return fmt.Sprintf("refused in %s (rejected +%g)", took.Round(10*time.Microsecond), rejected)
	}
	deleted := refused("deleted Service", deletedVIP)

	// A Service whose pods are all gone: no endpoints. kube-proxy would
	// reject it too; the counter shows that the datapath did, before the
	// host saw the SYN.
	name := "zero-" + suffix
	zero := createService(t, cs, name, "no-such-pod")
	t.Cleanup(func() { _ = cs.CoreV1().Services("default").Delete(context.Background(), name, metav1.DeleteOptions{}) })
	waitProgrammed(t, proxyMode, zero)
	scaled := refused("Service with no endpoints, requireEndpoints", zero)
	return fmt.Sprintf("| reject mode, requireEndpoints (%s) | pod → deleted Service: %s | pod → Service with 0 endpoints: %s |", proxyMode, deleted, scaled)
}

// wirePackets is the wire's count of packets to the Service CIDR.
func wirePackets(t *testing.T) int {
	t.Helper()
	out, err := exec.Command("ip", "netns", "exec", wireName(), "nft", "list", "counter", "inet", "upwire", "services").CombinedOutput()
	if err != nil {
		t.Fatalf("the wire's counter: %v: %s", err, out)
	}
	f := strings.Fields(string(out))
	for i := range f[:len(f)-1] {
		if f[i] == "packets" {
			n, err := strconv.Atoi(f[i+1])
			must(t, err)
			return n
		}
	}
	t.Fatalf("no packet count in %s", out)
	return 0
}

// exposition is a /metrics page.
type exposition string

// scrape reads the agent's /metrics at addr ("" when it cannot).
func scrape(addr string) exposition {
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		return ""
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return exposition(b)
}

// sum adds the samples of the metric name whose labels contain every one
// of labels (`key="value"`).
func (e exposition) sum(name string, labels ...string) float64 {
	total := 0.0
	for _, line := range strings.Split(string(e), "\n") {
		rest, ok := strings.CutPrefix(line, name)
		if !ok || (rest != "" && rest[0] != '{' && rest[0] != ' ') {
			continue
		}
		i := strings.LastIndexByte(rest, ' ')
		if i < 0 {
			continue
		}
		match := true
		for _, l := range labels {
			match = match && strings.Contains(rest[:i], l)
		}
		if v, err := strconv.ParseFloat(rest[i+1:], 64); err == nil && match {
			total += v
		}
	}
	return total
}

// value is an unlabelled gauge (-1 when missing).
func (e exposition) value(name string) float64 {
	for _, line := range strings.Split(string(e), "\n") {
		if v, ok := strings.CutPrefix(line, name+" "); ok {
			if f, err := strconv.ParseFloat(v, 64); err == nil {
				return f
			}
		}
	}
	return -1
}

// waitProgrammed waits until kube-proxy's rules (mode) name vip.
func waitProgrammed(t *testing.T, mode string, vip netip.Addr) {
	t.Helper()
	waitFor(t, 60*time.Second, "kube-proxy ("+mode+") programs "+vip.String(), func() bool {
		var out []byte
		if mode == "nftables" {
			out, _ = exec.Command("nft", "list", "table", "ip", "kube-proxy").Output()
		} else {
			// All tables: a Service without endpoints is a REJECT in
			// filter, not a DNAT in nat.
			out, _ = exec.Command("iptables-save").Output()
		}
		return strings.Contains(string(out), vip.String())
	})
}

func sourceName(a, client netip.Addr) string {
	switch a {
	case nodeIP:
		return "node"
	case client:
		return "pod"
	}
	return a.String()
}

func containerdVersion() string {
	out, _ := exec.Command("containerd", "--version").Output()
	f := strings.Fields(string(out))
	if len(f) >= 3 {
		return f[2]
	}
	return "?"
}

// serveClientIP answers GET /clientip with the caller's address, on addr,
// inside netns in (nil: the host).
func serveClientIP(t testing.TB, in cnins.NetNS, addr netip.AddrPort) {
	t.Helper()
	var ln net.Listener
	listen := func() error {
		var err error
		ln, err = net.Listen("tcp", addr.String())
		return err
	}
	if in != nil {
		must(t, in.Do(func(cnins.NetNS) error { return listen() }))
	} else {
		must(t, listen())
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, r.RemoteAddr)
	}), ReadHeaderTimeout: 5 * time.Second}
	go srv.Serve(ln) //nolint:errcheck // ends with Close
	t.Cleanup(func() { srv.Close() })
}

var must = testutil.Must

// makeNIC creates the node's NIC: upn0 (node address) <-> gw0 in the wire
// netns (the gateway's address, nothing beyond it). The Service CIDR is
// routed into it too, so no ClusterIP packet ever heads for a real network.
// staleTag marks this test's iptables rules, so that a run killed before
// its cleanup (a timeout) is cleaned up by the next one.
const staleTag = "underpass-node-test"

// sweepStale removes what a killed earlier run left: the NIC, the wire
// netns, the tagged rules.
func sweepStale(t testing.TB) {
	t.Helper()
	_ = exec.Command("ip", "link", "del", nic).Run()
	if ents, err := os.ReadDir("/var/run/netns"); err == nil {
		for _, e := range ents {
			if strings.HasPrefix(e.Name(), "upnode-wire-") {
				_ = exec.Command("ip", "netns", "del", e.Name()).Run()
			}
		}
	}
	out, _ := exec.Command("iptables", "-t", "mangle", "-S", "FORWARD").Output()
	for _, line := range strings.Split(string(out), "\n") {
		if strings.Contains(line, staleTag) && strings.HasPrefix(line, "-A ") {
			args := append([]string{"-t", "mangle", "-D"}, strings.Fields(strings.TrimPrefix(line, "-A "))...)
			for i, a := range args {
				args[i] = strings.Trim(a, `"`)
			}
			_ = exec.Command("iptables", args...).Run()
		}
	}
}

func wireName() string { return fmt.Sprintf("upnode-wire-%d", os.Getpid()) }

func makeNIC(t testing.TB) {
	t.Helper()
	wire := wireName()
	cmds := [][]string{
		{"ip", "netns", "add", wire},
		{"ip", "link", "add", nic, "type", "veth", "peer", "name", "gw0", "netns", wire},
		{"ip", "addr", "add", netip.PrefixFrom(nodeIP, subnet.Bits()).String(), "dev", nic},
		{"ip", "link", "set", nic, "up"},
		{"ip", "-n", wire, "addr", "add", netip.PrefixFrom(gateway, subnet.Bits()).String(), "dev", "gw0"},
		{"ip", "-n", wire, "link", "set", "gw0", "up"},
		{"ip", "-n", wire, "link", "set", "lo", "up"},
		{"ip", "route", "add", kapi.ServiceCIDRv4, "via", gateway.String(), "dev", nic},
		// The wire's count of what reaches it for the Service CIDR: a
		// stale Service packet that leaked from the node shows up here.
		{"ip", "netns", "exec", wire, "nft", "add table inet upwire"},
		{"ip", "netns", "exec", wire, "nft", "add counter inet upwire services"},
		{"ip", "netns", "exec", wire, "nft", "add chain inet upwire pre { type filter hook prerouting priority -400 ; }"},
		{"ip", "netns", "exec", wire, "nft", "add rule inet upwire pre ip daddr " + kapi.ServiceCIDRv4 + " counter name services"},
	}
	t.Cleanup(func() {
		_ = exec.Command("ip", "link", "del", nic).Run()
		_ = exec.Command("ip", "netns", "del", wire).Run()
	})
	for _, c := range cmds {
		if out, err := exec.Command(c[0], c[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%v: %v: %s", c, err, out)
		}
	}
}

// keepPacketsHere drops anything the host would forward to or from its
// real NICs (kube-proxy puts its ACCEPT rules ahead of ours in filter
// FORWARD, so this is in mangle). SaveHost's restore removes it.
func keepPacketsHere(t testing.TB) {
	t.Helper()
	links, err := net.Interfaces()
	must(t, err)
	for _, l := range links {
		if l.Name == "lo" || l.Name == nic || l.Flags&net.FlagUp == 0 {
			continue
		}
		for _, dir := range []string{"-i", "-o"} {
			if out, err := exec.Command("iptables", "-t", "mangle", "-I", "FORWARD", dir, l.Name, "-m", "comment", "--comment", staleTag, "-j", "DROP").CombinedOutput(); err != nil {
				t.Fatalf("iptables: %v: %s", err, out)
			}
		}
	}
}

// nth is the n-th address of p.
func nth(p netip.Prefix, n int) netip.Addr {
	a := p.Addr()
	for range n {
		a = a.Next()
	}
	return a
}

func portmapConf() map[string]any {
	return map[string]any{"type": "portmap", "capabilities": map[string]any{"portMappings": true}}
}

func macvlanConf() map[string]any {
	return map[string]any{"type": "macvlan", "master": nic, "mode": "bridge", "ipam": ipamConf()}
}

// chainedConf is underpass chained after the reference macvlan plugin.
func chainedConf(bpffs string) []any {
	return []any{macvlanConf(), map[string]any{"type": "underpass", "bpffs": bpffs}}
}

func mainConf(bpffs string) map[string]any {
	return map[string]any{"type": "underpass", "master": nic, "mode": "macvlan", "ipam": ipamConf(), "bpffs": bpffs}
}

func ipamConf() map[string]any {
	return map[string]any{
		"type": "host-local", "dataDir": ipamDir,
		"ranges": []any{[]any{map[string]any{"subnet": subnet.String(), "rangeStart": nth(subnet, 100).String(), "rangeEnd": nth(subnet, 249).String(), "gateway": gateway.String()}}},
		"routes": []any{map[string]any{"dst": "0.0.0.0/0"}},
	}
}

// writeConflist replaces the node's one network config (atomically:
// containerd watches the directory).
func writeConflist(t testing.TB, dir string, plugins []any) {
	t.Helper()
	b, err := json.MarshalIndent(map[string]any{"cniVersion": "1.0.0", "name": "underlay", "plugins": plugins}, "", "  ")
	must(t, err)
	tmp := filepath.Join(dir, ".10-underlay.tmp")
	must(t, os.WriteFile(tmp, b, 0o644))
	must(t, os.Rename(tmp, filepath.Join(dir, "10-underlay.conflist")))
}

// writeAgentConfig rewrites the process agent's config (startAgent sets
// it): underpassd reloads it live.
var writeAgentConfig func(action string, requireEndpoints bool)

// agentServiceMode is the process agent's services.mode (writeAgentConfig
// writes it).
var agentServiceMode = "host"

// setAgentMode switches the process agent's services.mode, live.
func setAgentMode(t *testing.T, metrics, mode string) {
	t.Helper()
	n := scrape(metrics).sum("underpass_config_reloads_total", `result="success"`)
	agentServiceMode = mode
	writeAgentConfig("drop", false)
	waitFor(t, 30*time.Second, "the agent reloading its config (services.mode "+mode+")", func() bool {
		return scrape(metrics).sum("underpass_config_reloads_total", `result="success"`) > n
	})
}

// startAgent runs underpassd as a process of the node and returns what
// stops it and uninstalls its datapath (also run at cleanup; once).
func startAgent(t testing.TB, bin, work, bpffs string, c *kapi.Cluster) (metrics string, stop func()) {
	t.Helper()
	cfg := filepath.Join(work, "underpass.yaml")
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	must(t, err)
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	writeAgentConfig = func(action string, requireEndpoints bool) {
		tmp := cfg + ".tmp"
		must(t, os.WriteFile(tmp, []byte(fmt.Sprintf(`bpffs: %s
metrics: {listen: "127.0.0.1:%d"}
staleServices:
  cidrs: [%s]
  action: %s
  requireEndpoints: %v
services:
  kubernetes: "true"
  kubeconfig: %s
  mode: %s
`, bpffs, port, kapi.ServiceCIDRv4, action, requireEndpoints, c.Kubeconfig, agentServiceMode)), 0o644))
		must(t, os.Rename(tmp, cfg))
	}
	writeAgentConfig("drop", false)
	p, err := node.StartProc(bin, filepath.Join(work, "underpassd.log"), "--config", cfg, "--log-level", "debug")
	must(t, err)
	stop = sync.OnceFunc(func() {
		if t.Failed() {
			t.Logf("underpassd log:\n%s", p.Tail(16<<10))
		}
		p.Stop(10 * time.Second)
		if out, err := exec.Command(bin, "--config", cfg, "--uninstall").CombinedOutput(); err != nil {
			t.Errorf("underpassd --uninstall: %v\n%s", err, out)
		}
	})
	t.Cleanup(stop)
	// Pods wait for the datapath, as a DaemonSet's readiness gates them.
	waitFor(t, 60*time.Second, "underpassd ready", func() bool {
		resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/readyz", port))
		if err != nil {
			return p.Exited()
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK || p.Exited()
	})
	if p.Exited() {
		t.Fatalf("underpassd exited:\n%s", p.Tail(4<<10))
	}
	return fmt.Sprintf("127.0.0.1:%d", port), stop
}

func startKubeProxy(t testing.TB, work string, c *kapi.Cluster, mode string) *node.Proc {
	t.Helper()
	bin, err := kapi.BinDir()
	must(t, err)
	cfg := filepath.Join(work, "kube-proxy-"+mode+".yaml")
	must(t, os.WriteFile(cfg, []byte(kapi.KubeProxyConfig(mode, nodeName, c.Kubeconfig)), 0o644))
	p, err := node.StartProc(filepath.Join(bin, "kube-proxy"), filepath.Join(work, "kube-proxy-"+mode+".log"), "--config", cfg, "--v=2")
	must(t, err)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("kube-proxy (%s) log:\n%s", mode, p.Tail(16<<10))
		}
		p.Stop(10 * time.Second)
	})
	return p
}

func createPod(t testing.TB, cs kubernetes.Interface, name string) *corev1.Pod {
	t.Helper()
	probe := func(path string) *corev1.Probe {
		return &corev1.Probe{
			ProbeHandler:  corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: path, Port: intstr.FromInt32(8080)}},
			PeriodSeconds: 1, TimeoutSeconds: 2, FailureThreshold: 5,
		}
	}
	p, err := cs.CoreV1().Pods("default").Create(context.Background(), &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"app": name}},
		Spec: corev1.PodSpec{
			Containers: []corev1.Container{{
				Name: "netexec", Image: node.AgnhostImage, ImagePullPolicy: corev1.PullNever,
				Args:           []string{"netexec", "--http-port=8080"},
				LivenessProbe:  probe("/healthz"),
				ReadinessProbe: probe("/readyz"),
			}},
		},
	}, metav1.CreateOptions{})
	must(t, err)
	return p
}

func waitPodReady(t testing.TB, cs kubernetes.Interface, name string) {
	t.Helper()
	var last *corev1.Pod
	deadline := time.Now().Add(90 * time.Second)
	for time.Now().Before(deadline) {
		p, err := cs.CoreV1().Pods("default").Get(context.Background(), name, metav1.GetOptions{})
		if err == nil {
			last = p
			for _, c := range p.Status.Conditions {
				if c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue {
					return
				}
			}
		}
		time.Sleep(250 * time.Millisecond)
	}
	var b []byte
	if last != nil {
		b, _ = json.MarshalIndent(last.Status, "", " ")
	}
	ev, _ := cs.CoreV1().Events("default").List(context.Background(), metav1.ListOptions{})
	var evs []string
	if ev != nil {
		for _, e := range ev.Items {
			evs = append(evs, e.InvolvedObject.Name+": "+e.Reason+": "+e.Message)
		}
	}
	t.Fatalf("pod %s not Ready: %s\nevents:\n%s", name, b, strings.Join(evs, "\n"))
}

func podIP(t testing.TB, cs kubernetes.Interface, name string) netip.Addr {
	t.Helper()
	p, err := cs.CoreV1().Pods("default").Get(context.Background(), name, metav1.GetOptions{})
	must(t, err)
	a, err := netip.ParseAddr(p.Status.PodIP)
	must(t, err)
	return a
}

// waitFrontend waits until the agent has given vip's frontend a backend
// (services.mode ebpf), so a request cannot go through kube-proxy first.
func waitFrontend(t *testing.T, bpffs string, vip netip.Addr) {
	t.Helper()
	waitFor(t, 30*time.Second, "the frontend of "+vip.String()+" in the datapath", func() bool {
		dp, err := loader.Open(bpffs)
		if err != nil {
			return false
		}
		defer dp.Close()
		fs, err := datapath.Frontends(&dp.Maps)
		return err == nil && slices.ContainsFunc(fs, func(f datapath.Frontend) bool { return f.VIP == vip && len(f.Backends) > 0 })
	})
}

// endpoints are the endpoints registered in the datapath pinned at bpffs.
func endpoints(bpffs string) (map[uint32]datapath.Endpoint, error) {
	dp, err := loader.Open(bpffs)
	if err != nil {
		return nil, err
	}
	defer dp.Close()
	return datapath.Endpoints(&dp.Maps)
}

// registered lists which of pods underpass has endpoints for.
func registered(t *testing.T, bpffs string, pods ...string) []string {
	t.Helper()
	eps, err := endpoints(bpffs)
	must(t, err)
	var out []string
	for _, ep := range eps {
		if name := ep.PodName; slices.Contains(pods, name) {
			out = append(out, name)
		}
	}
	return out
}

// podNetns is the pod's netns, as underpass registered it.
func podNetns(t *testing.T, bpffs, pod string) cnins.NetNS {
	t.Helper()
	eps, err := endpoints(bpffs)
	must(t, err)
	for _, ep := range eps {
		if ep.PodName == pod {
			n, err := cnins.GetNS(ep.Netns)
			must(t, err)
			t.Cleanup(func() { n.Close() })
			return n
		}
	}
	t.Fatalf("pod %s is not registered with underpass", pod)
	return nil
}

// createHostService creates a ClusterIP Service, port 80, without a
// selector, whose one endpoint is backend (on the host), and returns its VIP.
func createHostService(t *testing.T, cs kubernetes.Interface, name string, backend netip.AddrPort) netip.Addr {
	t.Helper()
	ctx := context.Background()
	svc, err := cs.CoreV1().Services("default").Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt32(int32(backend.Port()))}}},
	}, metav1.CreateOptions{})
	must(t, err)
	ready, port, pname := true, int32(backend.Port()), "http"
	_, err = cs.DiscoveryV1().EndpointSlices("default").Create(ctx, &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: name + "-host", Labels: map[string]string{discoveryv1.LabelServiceName: name}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{backend.Addr().String()}, Conditions: discoveryv1.EndpointConditions{Ready: &ready}}},
		Ports:       []discoveryv1.EndpointPort{{Name: &pname, Port: &port}},
	}, metav1.CreateOptions{})
	must(t, err)
	return netip.MustParseAddr(svc.Spec.ClusterIP)
}

// createService creates a ClusterIP Service, port 80 -> 8080, selecting
// the pod labelled app=pod: the controller-manager writes its
// EndpointSlice.
func createService(t *testing.T, cs kubernetes.Interface, name, pod string) netip.Addr {
	t.Helper()
	svc, err := cs.CoreV1().Services("default").Create(context.Background(), &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: corev1.ServiceSpec{
			Selector: map[string]string{"app": pod},
			Ports:    []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080)}},
		},
	}, metav1.CreateOptions{})
	must(t, err)
	return netip.MustParseAddr(svc.Spec.ClusterIP)
}

func httpGet(t *testing.T, from cnins.NetNS, addr netip.AddrPort, path string) string {
	t.Helper()
	got := ""
	waitFor(t, 10*time.Second, fmt.Sprintf("GET http://%s%s", addr, path), func() bool {
		got = tryHTTPGet(from, addr, path)
		return got != ""
	})
	return got
}

// udpAsk sends msg to netexec's UDP port at addr from netns from (nil:
// the host) and returns the answer ("" on none within 2 s).
func udpAsk(from cnins.NetNS, addr netip.AddrPort, msg string) string {
	conn, err := dialIn(from, "udp", addr, time.Second)
	if err != nil {
		return ""
	}
	defer conn.Close()
	buf := make([]byte, 512)
	for range 3 {
		_ = conn.SetDeadline(time.Now().Add(700 * time.Millisecond))
		if _, err := conn.Write([]byte(msg)); err != nil {
			return ""
		}
		if n, err := conn.Read(buf); err == nil {
			return strings.TrimSpace(string(buf[:n]))
		}
	}
	return ""
}

// dialIn dials addr from inside netns from (nil: the host).
func dialIn(from cnins.NetNS, network string, addr netip.AddrPort, timeout time.Duration) (net.Conn, error) {
	var conn net.Conn
	dial := func(cnins.NetNS) error {
		var err error
		conn, err = net.DialTimeout(network, addr.String(), timeout)
		return err
	}
	if from == nil {
		return conn, dial(nil)
	}
	return conn, from.Do(dial)
}

// tryHTTPGet GETs path from addr, from inside netns from (nil: the host),
// and returns the body, or "" on any failure.
func tryHTTPGet(from cnins.NetNS, addr netip.AddrPort, path string) string {
	conn, err := dialIn(from, "tcp", addr, 2*time.Second)
	if err != nil {
		return ""
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(3 * time.Second))
	cl := &http.Client{Transport: &http.Transport{DialContext: func(context.Context, string, string) (net.Conn, error) { return conn, nil }}}
	resp, err := cl.Get("http://" + addr.String() + path)
	if err != nil {
		return ""
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// waitFor polls every 200 ms: its conditions ask the API server.
func waitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	testutil.WaitForEvery(t, timeout, 200*time.Millisecond, what, cond)
}
