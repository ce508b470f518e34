package node

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/underpass-cni/underpass/internal/ociimage"
	"github.com/underpass-cni/underpass/test/k8s/kapi"
)

// PauseImage is the sandbox image containerd is told to use; it is built
// here from agnhost (`agnhost pause`).
const PauseImage = "registry.k8s.io/pause:3.10"

// AgnhostImage is the test image (`agnhost netexec`: /clientip, /hostname,
// probes).
const AgnhostImage = "registry.k8s.io/e2e-test-images/agnhost:underpass"

// Options describe a node.
type Options struct {
	Cluster *kapi.Cluster
	Name    string
	IP      netip.Addr // the node's address, on its "NIC"
	// CNIBinDir and CNIConfDir are containerd's CNI directories (one bin
	// dir: containerd 1.6 takes one).
	CNIBinDir, CNIConfDir string
	// Resolv is the pods' resolv.conf (dnsPolicy: Default).
	Resolv string
	// CoreDNS is the coredns binary (test/coredns.sh): imported as
	// CoreDNSImage, and the kubelet points pods (dnsPolicy: ClusterFirst)
	// at ClusterDNS. StartClusterDNS deploys it.
	CoreDNS string
}

// Node is a running containerd + kubelet registered with the cluster.
type Node struct {
	Name       string
	Dir        string
	Containerd *Proc
	Kubelet    *Proc
	Socket     string // containerd's CRI socket

	opts Options
	bin  string
}

// Start starts containerd (images imported) and the kubelet, and waits
// until the node is Ready. Everything stops when tb ends; the host state is
// the caller's to save and restore (SaveHost), since kube-proxy and the
// agent change it too.
func Start(tb testing.TB, o Options) *Node {
	tb.Helper()
	bin := kapi.NeedBins(tb, "kubelet", "agnhost-full")
	dir, err := os.MkdirTemp("", "upnode-") // short: the socket paths must fit 108 bytes
	if err != nil {
		tb.Fatal(err)
	}
	n := &Node{Name: o.Name, Dir: dir, Socket: filepath.Join(dir, "containerd.sock"), opts: o, bin: bin}
	tb.Cleanup(func() {
		logTails(tb, n.Kubelet, n.Containerd)
		n.stop(tb, o.Cluster)
		unmountUnder(dir)
		os.RemoveAll(dir)
	})

	n.startContainerd(tb, o)
	n.importImages(tb, bin)
	n.startKubelet(tb, o, bin)
	n.waitReady(tb, o.Cluster)
	return n
}

// RestartKubelet stops the kubelet (SIGTERM) and starts it again with the
// same flags; it returns once the new kubelet has renewed the node's lease
// (the Ready condition alone would still be the old kubelet's). Pods keep
// running.
func (n *Node) RestartKubelet(tb testing.TB) {
	tb.Helper()
	n.Kubelet.Stop(10 * time.Second)
	restarted := time.Now()
	n.startKubelet(tb, n.opts, n.bin)
	deadline := restarted.Add(60 * time.Second)
	for {
		l, err := n.opts.Cluster.Client.CoordinationV1().Leases("kube-node-lease").Get(context.Background(), n.Name, metav1.GetOptions{})
		if err == nil && l.Spec.RenewTime != nil && l.Spec.RenewTime.After(restarted) {
			tb.Logf("kubelet restarted: the node's lease renewed %s after the restart", l.Spec.RenewTime.Sub(restarted).Round(time.Millisecond))
			return
		}
		if time.Now().After(deadline) || n.Kubelet.Exited() {
			tb.Fatalf("the restarted kubelet did not renew the node's lease (exited: %v): %v", n.Kubelet.Exited(), err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// RestartContainerd stops containerd (SIGTERM; the containers live on in
// their shims) and starts it again; it returns once it answers.
func (n *Node) RestartContainerd(tb testing.TB) {
	tb.Helper()
	n.Containerd.Stop(10 * time.Second)
	n.startContainerd(tb, n.opts)
}

func (n *Node) startContainerd(tb testing.TB, o Options) {
	tb.Helper()
	cfg := filepath.Join(n.Dir, "containerd.toml")
	toml := fmt.Sprintf(`version = 2
root = %q
state = %q
[grpc]
  address = %q
[ttrpc]
  address = %q
[plugins."io.containerd.internal.v1.opt"]
  path = %q
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %q
  # No CAP_SYS_RESOURCE in this sandbox: runc cannot raise oom_score_adj.
  restrict_oom_score_adj = true
  # Pod netns mounts under the state dir, so teardown finds them all.
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".registry]
    # Every image is imported; a pull would go to a dead address, never
    # to a real registry.
    config_path = %q
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = %q
    conf_dir = %q
`, filepath.Join(n.Dir, "containerd"), filepath.Join(n.Dir, "containerd-state"), n.Socket, n.Socket+".ttrpc",
		filepath.Join(n.Dir, "opt"), PauseImage, filepath.Join(n.Dir, "certs.d"), o.CNIBinDir, o.CNIConfDir)
	for _, reg := range []string{"registry.k8s.io", "docker.io", "_default"} {
		d := filepath.Join(n.Dir, "certs.d", reg)
		if err := os.MkdirAll(d, 0o755); err != nil {
			tb.Fatal(err)
		}
		hosts := "server = \"http://127.0.0.1:1\"\n[host.\"http://127.0.0.1:1\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
		if err := os.WriteFile(filepath.Join(d, "hosts.toml"), []byte(hosts), 0o644); err != nil {
			tb.Fatal(err)
		}
	}
	if err := os.WriteFile(cfg, []byte(toml), 0o644); err != nil {
		tb.Fatal(err)
	}
	p, err := StartProc("/usr/bin/containerd", filepath.Join(n.Dir, "containerd.log"), "--config", cfg)
	if err != nil {
		tb.Fatalf("containerd (apt-get install containerd runc): %v", err)
	}
	n.Containerd = p
	deadline := time.Now().Add(30 * time.Second)
	for {
		if err := run(context.Background(), "ctr", "--address", n.Socket, "version"); err == nil {
			return
		} else if time.Now().After(deadline) || p.Exited() {
			tb.Fatalf("containerd did not come up: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// The images e2e.test runs (test/utils/image at the pinned Kubernetes
// version), built here under the names it asks for.
const (
	E2EAgnhostImage  = "registry.k8s.io/e2e-test-images/agnhost:2.66.1"
	E2EBusyboxImage  = "registry.k8s.io/e2e-test-images/busybox:1.37.0-2"
	E2EGlibcDNSImage = "registry.k8s.io/e2e-test-images/glibc-dns-testing:2.1.1"
	E2EPauseImage    = "registry.k8s.io/pause:3.10.2"
)

// importImages builds the pause and agnhost images from the agnhost binary
// (and e2e.test's: agnhost with a shell, curl and nc, busybox, pause) and
// imports them into containerd's k8s.io namespace.
func (n *Node) importImages(tb testing.TB, bin string) {
	tb.Helper()
	agnhost := filepath.Join(bin, "agnhost-full")
	// e2e.test execs `sh -c "curl ..."` and `nc -u` in agnhost pods: the
	// published image has a distribution under agnhost, this one gets
	// Debian's static busybox and test/node/e2etools.
	tools := filepath.Join(n.Dir, "e2etools")
	cmd := exec.Command("go", "build", "-trimpath", "-o", tools, "github.com/underpass-cni/underpass/test/node/e2etools")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		tb.Fatalf("build e2etools: %v\n%s", err, out)
	}
	applets, err := exec.Command("/bin/busybox", "--list").Output()
	if err != nil {
		tb.Fatalf("busybox --list (apt-get install busybox-static): %v", err)
	}
	box := map[string]string{}
	for _, a := range strings.Fields(string(applets)) {
		if a != "nc" && a != "busybox" {
			box["bin/"+a] = "busybox"
		}
	}
	withTools := map[string]string{}
	for k, v := range box {
		withTools[k] = v
	}
	for _, tool := range []string{"curl", "nc", "dig", "getent"} {
		withTools["usr/bin/"+tool] = "e2etools"
	}
	withTools["bin/sh"] = "../usr/bin/e2etools"
	var extra []ociimage.Image
	if n.opts.CoreDNS != "" {
		extra = append(extra, ociimage.Image{Ref: CoreDNSImage, Files: map[string]string{"coredns": n.opts.CoreDNS}, Entrypoint: []string{"/coredns"}})
	}
	// As the upstream Dockerfile: ENTRYPOINT /agnhost, CMD pause (a pod
	// that names no command, e2e's host-exec pod, runs pause).
	e2eAgnhost := ociimage.Image{Ref: E2EAgnhostImage, Entrypoint: []string{"/agnhost"}, Cmd: []string{"pause"},
		Files: map[string]string{"agnhost": agnhost, "bin/busybox": "/bin/busybox", "usr/bin/e2etools": tools}, Links: withTools}
	// porter's TLS ports (the Proxy specs) serve the image's localhost.crt.
	porter := filepath.Join(k8sSource(tb), "test", "images", "agnhost", "porter")
	e2eAgnhost.Files["localhost.crt"], e2eAgnhost.Files["localhost.key"] = filepath.Join(porter, "localhost.crt"), filepath.Join(porter, "localhost.key")
	for _, img := range append(extra, []ociimage.Image{
		{Ref: PauseImage, Files: map[string]string{"agnhost": agnhost}, Entrypoint: []string{"/agnhost", "pause"}},
		{Ref: E2EPauseImage, Files: map[string]string{"agnhost": agnhost}, Entrypoint: []string{"/agnhost", "pause"}},
		{Ref: AgnhostImage, Files: map[string]string{"agnhost": agnhost}, Entrypoint: []string{"/agnhost"}},
		e2eAgnhost,
		// The DNS specs' "glibc" querier: the same tools (their dig and
		// getent are e2etools', not glibc's).
		{Ref: E2EGlibcDNSImage, Files: e2eAgnhost.Files, Links: withTools, Cmd: []string{"sh"}},
		{Ref: E2EBusyboxImage, Files: map[string]string{"bin/busybox": "/bin/busybox"}, Links: box, Cmd: []string{"sh"}},
	}...) {
		path := filepath.Join(n.Dir, filepath.Base(img.Ref)+".tar")
		f, err := os.Create(path)
		if err != nil {
			tb.Fatal(err)
		}
		err = img.WriteDockerArchive(f)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			tb.Fatalf("image %s: %v", img.Ref, err)
		}
		if err := run(context.Background(), "ctr", "--address", n.Socket, "-n", "k8s.io", "images", "import", path); err != nil {
			tb.Fatalf("import %s: %v", img.Ref, err)
		}
	}
}

// k8sSource is the k8s.io/kubernetes module's directory in the module
// cache, at the version test/k8s/build pins (the binaries' source).
func k8sSource(tb testing.TB) string {
	tb.Helper()
	_, self, _, _ := runtime.Caller(0)
	cmd := exec.Command("go", "list", "-mod=mod", "-m", "-f", "{{.Dir}}", "k8s.io/kubernetes")
	cmd.Dir = filepath.Join(filepath.Dir(self), "..", "k8s", "build")
	cmd.Env = append(os.Environ(), "GOWORK=off", "GOFLAGS=-mod=mod")
	out, err := cmd.Output()
	if err != nil || len(strings.TrimSpace(string(out))) == 0 {
		tb.Fatalf("go list -m k8s.io/kubernetes in %s: %v", cmd.Dir, err)
	}
	return strings.TrimSpace(string(out))
}

func (n *Node) startKubelet(tb testing.TB, o Options, bin string) {
	tb.Helper()
	cfg := filepath.Join(n.Dir, "kubelet.yaml")
	yaml := fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# Hosts with cgroup v1 only (this development VM) need this; on cgroup v2
# it changes nothing.
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupsPerQOS: false
enforceNodeAllocatable: []
containerRuntimeEndpoint: unix://%s
failSwapOn: false
# The node's address, not loopback: the apiserver reaches the kubelet
# there for exec, logs and port-forward (e2e.test execs in pods), as on a
# real node. The address is on the node's veth NIC, inside this machine.
address: %s
port: 10250
readOnlyPort: 0
healthzPort: 0
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization: {mode: AlwaysAllow}
resolvConf: %s
clusterDomain: cluster.local
clusterDNS: [%s]
volumePluginDir: %s
podLogsDir: %s
localStorageCapacityIsolation: false
evictionHard: {memory.available: "1Mi", nodefs.available: "1%%", imagefs.available: "1%%", nodefs.inodesFree: "1%%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
`, n.Socket, o.IP, o.Resolv, ClusterDNS, filepath.Join(n.Dir, "volume-plugins"), filepath.Join(n.Dir, "pod-logs"))
	if err := os.WriteFile(cfg, []byte(yaml), 0o644); err != nil {
		tb.Fatal(err)
	}
	p, err := StartProc(filepath.Join(bin, "kubelet"), filepath.Join(n.Dir, "kubelet.log"),
		"--config", cfg,
		"--kubeconfig", o.Cluster.Kubeconfig,
		"--root-dir", filepath.Join(n.Dir, "kubelet"),
		"--cert-dir", filepath.Join(n.Dir, "kubelet-pki"),
		"--hostname-override", o.Name,
		"--node-ip", o.IP.String(),
		"--v", "2",
	)
	if err != nil {
		tb.Fatal(err)
	}
	n.Kubelet = p
}

func (n *Node) waitReady(tb testing.TB, c *kapi.Cluster) {
	tb.Helper()
	start := time.Now()
	deadline := start.Add(90 * time.Second)
	for {
		nd, err := c.Client.CoreV1().Nodes().Get(context.Background(), n.Name, metav1.GetOptions{})
		if err == nil {
			for _, cond := range nd.Status.Conditions {
				if cond.Type == corev1.NodeReady && cond.Status == corev1.ConditionTrue {
					tb.Logf("node %s Ready %s after the kubelet started", n.Name, time.Since(start).Round(time.Millisecond))
					return
				}
			}
		}
		if time.Now().After(deadline) || n.Kubelet.Exited() {
			tb.Fatalf("node %s not Ready (kubelet exited: %v): %v", n.Name, n.Kubelet.Exited(), err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// stop deletes every pod through the API (the kubelet runs CNI DEL for
// each), stops the kubelet, then removes what containerd still runs and
// stops containerd and its shims.
func (n *Node) stop(tb testing.TB, c *kapi.Cluster) {
	if n.Kubelet != nil && !n.Kubelet.Exited() {
		ctx := context.Background()
		zero := int64(0)
		_ = c.Client.CoreV1().Pods("").DeleteCollection(ctx, metav1.DeleteOptions{GracePeriodSeconds: &zero}, metav1.ListOptions{})
		if nss, err := c.Client.CoreV1().Namespaces().List(ctx, metav1.ListOptions{}); err == nil {
			for _, ns := range nss.Items {
				_ = c.Client.CoreV1().Pods(ns.Name).DeleteCollection(ctx, metav1.DeleteOptions{GracePeriodSeconds: &zero}, metav1.ListOptions{})
			}
		}
		deadline := time.Now().Add(30 * time.Second)
		for time.Now().Before(deadline) {
			l, err := c.Client.CoreV1().Pods("").List(ctx, metav1.ListOptions{})
			if err == nil && len(l.Items) == 0 {
				break
			}
			time.Sleep(250 * time.Millisecond)
		}
	}
	if n.Kubelet != nil {
		n.Kubelet.Stop(10 * time.Second)
	}
	if n.Containerd != nil {
		// Containers outlive containerd (their shims do): remove them
		// through it first.
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		if err := run(ctx, "sh", "-c", fmt.Sprintf(
			`for c in $(ctr --address %[1]s -n k8s.io tasks ls -q); do ctr --address %[1]s -n k8s.io tasks kill -s SIGKILL $c; done; sleep 1; for c in $(ctr --address %[1]s -n k8s.io containers ls -q); do ctr --address %[1]s -n k8s.io tasks rm -f $c; ctr --address %[1]s -n k8s.io containers rm $c; done`,
			n.Socket)); err != nil {
			tb.Logf("node teardown: %v", err)
		}
		n.Containerd.Stop(10 * time.Second)
		// Shims are outside containerd's process group: whatever still
		// names this containerd's socket goes.
		_ = exec.Command("pkill", "-KILL", "-f", "--", "-address "+n.Socket).Run()
	}
}

// StartControlPlane starts kube-controller-manager and kube-scheduler
// against the cluster: EndpointSlices, ServiceAccount tokens, garbage
// collection and scheduling are Kubernetes' own, not the test's.
func StartControlPlane(tb testing.TB, c *kapi.Cluster) {
	tb.Helper()
	bin, err := kapi.BinDir()
	if err != nil {
		tb.Fatal(err)
	}
	dir := tb.TempDir()
	var procs []*Proc
	tb.Cleanup(func() {
		logTails(tb, procs...)
		for _, p := range procs {
			p.Stop(10 * time.Second)
		}
	})
	for _, pc := range []struct {
		name string
		args []string
	}{
		{"kube-controller-manager", []string{
			"--kubeconfig", c.Kubeconfig, "--leader-elect=false",
			"--bind-address=127.0.0.1", "--secure-port=0",
			"--service-account-private-key-file=" + c.SAKeyFile, "--root-ca-file=" + c.CAFile,
			"--use-service-account-credentials=false",
		}},
		{"kube-scheduler", []string{
			"--kubeconfig", c.Kubeconfig, "--leader-elect=false",
			"--bind-address=127.0.0.1", "--secure-port=0",
		}},
	} {
		p, err := StartProc(filepath.Join(bin, pc.name), filepath.Join(dir, pc.name+".log"), append(pc.args, "--v=2")...)
		if err != nil {
			tb.Fatalf("%s (test/k8s/build.sh builds it): %v", pc.name, err)
		}
		procs = append(procs, p)
	}
	// The default ServiceAccount appears once the controllers run.
	deadline := time.Now().Add(60 * time.Second)
	for {
		if _, err := c.Client.CoreV1().ServiceAccounts("default").Get(context.Background(), "default", metav1.GetOptions{}); err == nil {
			return
		}
		for _, p := range procs {
			if p.Exited() {
				tb.Fatalf("%s exited:\n%s", p.Name, p.Tail(8<<10))
			}
		}
		if time.Now().After(deadline) {
			tb.Fatal("the controller-manager made no default ServiceAccount in 60 s")
		}
		time.Sleep(200 * time.Millisecond)
	}
}
