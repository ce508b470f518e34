package node_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/underpass-cni/underpass/internal/testutil"
	"github.com/underpass-cni/underpass/test/k8s/kapi"
	"github.com/underpass-cni/underpass/test/node"
)

// What deploy/kubernetes installs on a node, at its default paths: the pin
// directory (the agent config's bpffs), and the agent's address for probes
// and metrics.
const (
	defaultBPFFS    = "/sys/fs/bpf/underpass"
	defaultMetrics  = "127.0.0.1:9775"
	systemNamespace = "underpass-system"
)

// kubectlInstall installs underpass the way the README tells users to:
// kubectl apply -k of a kustomization whose base is deploy/kubernetes. The
// overlay changes only what any user changes (the image tag, the
// ConfigMap: the NIC, the IPAM, the Service CIDR) and what this node puts
// elsewhere than a real one: containerd's CNI directories and its pod
// netns, under the node's temp dirs. Everything else (init containers,
// capabilities, probes, in-cluster credentials through the kubernetes
// Service, RBAC) is the manifests' own. At cleanup it uninstalls as the
// DaemonSet's comment says: delete, then underpassd --uninstall on the node,
// then the plugin and the conflist.
func kubectlInstall(t *testing.T, c *kapi.Cluster, n *node.Node, image, cniBin, cniConf, agentBin string) func(args ...string) (string, error) {
	t.Helper()
	kubectl := filepath.Join(kapi.NeedBins(t, "kubectl"), "kubectl")
	overlay := t.TempDir()
	base, err := filepath.Abs("../../deploy/kubernetes")
	must(t, err)
	rel, err := filepath.Rel(overlay, base)
	must(t, err)
	conflist, err := json.MarshalIndent(map[string]any{
		"cniVersion": "1.0.0", "name": "underpass", // as shipped: containerd 1.6 takes no 1.1.0
		"plugins": []any{macvlanConf(), map[string]any{"type": "underpass"}},
	}, "    ", "  ")
	must(t, err)
	files := map[string]string{
		"kustomization.yaml": fmt.Sprintf(`apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources: [%s]
images:
  - name: %s
    newTag: %s
patches:
  - path: config.yaml
  - path: node-paths.yaml
`, rel, imageName, imageTag),
		"config.yaml": fmt.Sprintf(`apiVersion: v1
kind: ConfigMap
metadata: {name: underpass, namespace: %s}
data:
  underpass.yaml: |
    hostReachability: true
    staleServices: {cidrs: [%s], action: drop}
    services: {kubernetes: auto, masquerade: true}
    metrics: {listen: %q}
    bpffs: %s
  underpass.conflist: |
    %s
`, systemNamespace, kapi.ServiceCIDRv4, defaultMetrics, defaultBPFFS, conflist),
		// containerd's CNI directories are the node's temp dirs, and so is
		// its state dir with the pods' netns (a real containerd: /opt/cni/bin,
		// /etc/cni/net.d, /var/run/netns, which the DaemonSet mounts).
		"node-paths.yaml": fmt.Sprintf(`apiVersion: apps/v1
kind: DaemonSet
metadata: {name: underpass, namespace: %[1]s}
spec:
  template:
    spec:
      volumes:
        - {name: cni-bin, hostPath: {path: %[2]s}}
        - {name: cni-conf, hostPath: {path: %[3]s}}
        - {name: node-state, hostPath: {path: %[4]s, type: Directory}}
      containers:
        - name: underpassd
          volumeMounts:
            - {name: node-state, mountPath: %[4]s, mountPropagation: HostToContainer, readOnly: true}
`, systemNamespace, cniBin, cniConf, n.Dir),
	}
	for name, body := range files {
		must(t, os.WriteFile(filepath.Join(overlay, name), []byte(body), 0o644))
	}
	kube := func(args ...string) (string, error) {
		out, err := exec.Command(kubectl, append([]string{"--kubeconfig", c.Kubeconfig}, args...)...).CombinedOutput()
		return string(out), err
	}
	if out, err := kube("kustomize", overlay); err != nil || !strings.Contains(out, image) {
		t.Fatalf("kubectl kustomize: %v (want image %s)\n%s", err, image, out)
	}
	inst := newInstallation(t, c, n, cniBin, cniConf, agentBin)
	inst.cleanup(t, "kubectl delete -k", func() (string, error) {
		return kube("delete", "-k", overlay, "--wait=true", "--timeout=60s")
	})
	inst.install(t, "kubectl apply -k (base deploy/kubernetes)", func() (string, error) {
		out, err := kube("apply", "-k", overlay)
		if err != nil {
			return out, err
		}
		rs, err := kube("-n", systemNamespace, "rollout", "status", "daemonset/underpass", "--timeout=120s")
		return out + rs, err
	})
	return kube
}

// agentDisruptions are what a DaemonSet-installed agent goes through in
// its life: the kubelet and containerd restarted, its pod deleted (the
// DaemonSet makes a new one), and a rollout to a new image tag (the same binaries, retagged: the DaemonSet replaces
// the pod, init containers included).
func agentDisruptions(c *kapi.Cluster, n *node.Node, kube func(args ...string) (string, error)) []disruption {
	agentPod := func(t *testing.T) (uid string) {
		l, err := c.Client.CoreV1().Pods(systemNamespace).List(context.Background(), metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=underpassd"})
		must(t, err)
		for _, p := range l.Items {
			for _, cond := range p.Status.Conditions {
				if cond.Type == "Ready" && cond.Status == "True" && p.DeletionTimestamp == nil {
					return string(p.UID)
				}
			}
		}
		return ""
	}
	return []disruption{
		{"the kubelet restarted", func(t *testing.T) { n.RestartKubelet(t) }},
		{"containerd restarted", func(t *testing.T) { n.RestartContainerd(t) }},
		{"the agent pod deleted", func(t *testing.T) {
			old := agentPod(t)
			if out, err := kube("-n", systemNamespace, "delete", "pod", "-l", "app.kubernetes.io/name=underpassd", "--wait=true"); err != nil {
				t.Fatalf("kubectl delete pod: %v\n%s", err, out)
			}
			waitFor(t, 120*time.Second, "a new agent pod Ready", func() bool {
				uid := agentPod(t)
				return uid != "" && uid != old
			})
		}},
		{"the DaemonSet rolled out to a new image tag", func(t *testing.T) {
			next := imageName + ":" + imageTag + "-next"
			ctr(t, n, "images", "tag", imageName+":"+imageTag, next)
			t.Cleanup(func() { _ = exec.Command("ctr", "--address", n.Socket, "-n", "k8s.io", "images", "rm", next).Run() })
			if out, err := kube("-n", systemNamespace, "set", "image", "daemonset/underpass", "*="+next); err != nil {
				t.Fatalf("kubectl set image: %v\n%s", err, out)
			}
			if out, err := kube("-n", systemNamespace, "rollout", "status", "daemonset/underpass", "--timeout=120s"); err != nil {
				t.Fatalf("rollout: %v\n%s", err, out)
			}
		}},
	}
}

// helmInstall installs the chart in deploy/helm/underpass with helm
// install, in main mode: the values set are the ones a user sets (image
// tag, mode, master, IPAM, Service CIDR) and this node's paths (as in
// kubectlInstall). It uninstalls at cleanup as the chart's NOTES say.
func helmInstall(t *testing.T, c *kapi.Cluster, n *node.Node, cniBin, cniConf, agentBin string) {
	t.Helper()
	helm, err := testutil.Helm()
	must(t, err)
	ipam, err := json.Marshal(ipamConf())
	must(t, err)
	run := func(args ...string) (string, error) {
		out, err := exec.Command(helm, append(args, "--kubeconfig", c.Kubeconfig, "--namespace", systemNamespace)...).CombinedOutput()
		return string(out), err
	}
	inst := newInstallation(t, c, n, cniBin, cniConf, agentBin)
	inst.cleanup(t, "helm uninstall", func() (string, error) {
		out, err := run("uninstall", "underpass", "--wait", "--timeout=60s")
		if err == nil {
			// helm install --create-namespace made it; uninstall leaves it.
			err = c.Client.CoreV1().Namespaces().Delete(context.Background(), systemNamespace, metav1.DeleteOptions{})
		}
		return out, err
	})
	inst.install(t, "helm install deploy/helm/underpass", func() (string, error) {
		return run("install", "underpass", "../../deploy/helm/underpass", "--create-namespace", "--wait", "--timeout=120s",
			"--set", "image.tag="+imageTag,
			"--set", "network.mode=main", "--set", "network.master="+nic,
			"--set-json", "network.ipam="+string(ipam),
			"--set", "config.staleServices.cidrs={"+kapi.ServiceCIDRv4+"}",
			"--set", "cni.binDir="+cniBin, "--set", "cni.confDir="+cniConf,
			"--set", "netnsDirs={/var/run/netns,"+n.Dir+"}",
		)
	})
}

// newInstallation is an install about to be made; nothing of underpass may
// be on the node yet.
func newInstallation(t *testing.T, c *kapi.Cluster, n *node.Node, cniBin, cniConf, agentBin string) installation {
	t.Helper()
	if _, err := os.Stat(defaultBPFFS); err == nil {
		t.Fatalf("%s exists before the install: another underpass runs on this machine", defaultBPFFS)
	}
	return installation{c: c, n: n, agentBin: agentBin, files: []string{filepath.Join(cniBin, "underpass"), filepath.Join(cniConf, "90-underpass.conflist")}}
}

// installation is underpass installed on the node by a user's tool.
type installation struct {
	c        *kapi.Cluster
	n        *node.Node
	agentBin string   // the host's underpassd, for --uninstall
	files    []string // what the install-cni init container puts on the node
}

// install runs the user's command (which waits for the DaemonSet's
// rollout) and checks what it did: the agent pod Ready, synced with the API
// through the kubernetes Service with its ServiceAccount, the plugin and the
// conflist in place.
func (i installation) install(t *testing.T, what string, cmd func() (string, error)) {
	t.Helper()
	start := time.Now()
	out, err := cmd()
	if err != nil {
		t.Fatalf("%s: %v\n%s\npods:\n%s", what, err, out, podReport(i.c.Client, i.n))
	}
	t.Logf("%s: ready in %s\n%s", what, time.Since(start).Round(100*time.Millisecond), strings.TrimSpace(out))
	for _, f := range i.files {
		if _, err := os.Stat(f); err != nil {
			t.Fatalf("the install-cni init container did not install %s: %v", f, err)
		}
	}
	// Ready means the live Service set was synced once: the agent reached
	// the API with its ServiceAccount, through the kubernetes Service.
	if v := scrape(defaultMetrics).value("underpass_agent_ready"); v != 1 {
		t.Fatalf("underpass_agent_ready %v at %s after the rollout", v, defaultMetrics)
	}
	t.Logf("the agent pod synced %v live Service IPs through the kubernetes Service with its ServiceAccount", scrape(defaultMetrics).value("underpass_live_services"))
}

// cleanup registers the removal: the user's command, then what the
// DaemonSet leaves on purpose (the datapath stays pinned and attached so
// that pods keep working across agent restarts): underpassd --uninstall on
// the node, the plugin and the conflist.
func (i installation) cleanup(t *testing.T, what string, cmd func() (string, error)) {
	t.Helper()
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("underpass-system pods:\n%s", podReport(i.c.Client, i.n))
		}
		// The test's pods are gone (their cleanups ran first and waited
		// for their CNI DELs): nothing else is registered either.
		if eps, err := endpoints(defaultBPFFS); err != nil || len(eps) != 0 {
			var names []string
			for _, ep := range eps {
				names = append(names, ep.PodName+" "+ep.Netns)
			}
			t.Errorf("after every pod was deleted: %d endpoints still registered: %v (%v)", len(eps), names, err)
		}
		if out, err := cmd(); err != nil {
			t.Errorf("%s: %v\n%s", what, err, out)
		}
		cfg := filepath.Join(t.TempDir(), "underpass.yaml")
		must(t, os.WriteFile(cfg, []byte("bpffs: "+defaultBPFFS+"\n"), 0o644))
		out, err := exec.Command(i.agentBin, "--uninstall", "--config", cfg).CombinedOutput()
		if err != nil {
			t.Errorf("underpassd --uninstall: %v\n%s", err, out)
		}
		t.Logf("underpassd --uninstall: %s", strings.TrimSpace(string(out)))
		for _, f := range i.files {
			if err := os.Remove(f); err != nil {
				t.Errorf("remove %s: %v", f, err)
			}
		}
		if _, err := os.Stat(defaultBPFFS); err == nil {
			t.Errorf("%s is still there after underpassd --uninstall", defaultBPFFS)
		}
	})
}

// podReport says what the underpass-system pods are doing: status, events
// and the last lines of every container's log (read from the kubelet's pod
// log directory, which outlives the containers).
func podReport(cs kubernetes.Interface, n *node.Node) string {
	ctx := context.Background()
	var b strings.Builder
	pods, err := cs.CoreV1().Pods(systemNamespace).List(ctx, metav1.ListOptions{})
	if err != nil {
		return err.Error()
	}
	for _, p := range pods.Items {
		st, _ := json.MarshalIndent(p.Status.ContainerStatuses, "", " ")
		ist, _ := json.MarshalIndent(p.Status.InitContainerStatuses, "", " ")
		fmt.Fprintf(&b, "pod %s phase %s\ninit: %s\ncontainers: %s\n", p.Name, p.Status.Phase, ist, st)
	}
	if ev, err := cs.CoreV1().Events(systemNamespace).List(ctx, metav1.ListOptions{}); err == nil {
		for _, e := range ev.Items {
			fmt.Fprintf(&b, "event %s: %s: %s\n", e.InvolvedObject.Name, e.Reason, e.Message)
		}
	}
	logs, _ := filepath.Glob(filepath.Join(n.Dir, "pod-logs", systemNamespace+"_*", "*", "*.log"))
	for _, l := range logs {
		data, _ := os.ReadFile(l)
		if len(data) > 6<<10 {
			data = data[len(data)-6<<10:]
		}
		fmt.Fprintf(&b, "--- %s\n%s\n", l, data)
	}
	return b.String()
}

// disruption is something a node goes through under traffic.
type disruption struct {
	name string
	do   func(t *testing.T)
}

// underTraffic sends host -> pod (web:8080) and pod -> ClusterIP -> pod
// (client to a Service of web) requests back to back while each
// disruption runs, and for 2 s after it; every request that gets no answer
// is a lost reply. It returns one line per disruption.
func underTraffic(t *testing.T, cs kubernetes.Interface, bpffs, web, client, proxyMode string, ds []disruption) []string {
	t.Helper()
	vip := createService(t, cs, web+"-life", web)
	t.Cleanup(func() {
		_ = cs.CoreV1().Services("default").Delete(context.Background(), web+"-life", metav1.DeleteOptions{})
	})
	waitProgrammed(t, proxyMode, vip)
	webIP := podIP(t, cs, web)
	clientNS := podNetns(t, bpffs, client)
	if !eventually(20*time.Second, func() bool { return tryHTTPGet(clientNS, netip.AddrPortFrom(vip, 80), "/clientip") != "" }) {
		kp, _ := exec.Command("sh", "-c", "nft list table ip kube-proxy | grep -n '"+vip.String()+"'").CombinedOutput()
		eps, _ := cs.DiscoveryV1().EndpointSlices("default").List(context.Background(), metav1.ListOptions{})
		var slices []string
		for _, e := range eps.Items {
			b, _ := json.Marshal(e.Endpoints)
			slices = append(slices, e.Name+": "+string(b))
		}
		var drops []string
		for _, l := range strings.Split(string(scrape(defaultMetrics)), "\n") {
			if strings.Contains(l, "drops_total") || strings.Contains(l, "live_services") || strings.Contains(l, "host_redirects_total") {
				drops = append(drops, l)
			}
		}
		t.Fatalf("pod -> ClusterIP %s -> pod: no answer in 20 s\nkube-proxy: %s\nslices: %s\nagent: %s", vip, kp, strings.Join(slices, "\n"), strings.Join(drops, "\n"))
	}
	var lines []string
	for _, d := range ds {
		var sent, lost [2]atomic.Int64
		stop := make(chan struct{})
		var wg sync.WaitGroup
		for i, req := range []func() string{
			func() string { return tryHTTPGet(nil, netip.AddrPortFrom(webIP, 8080), "/clientip") },
			func() string { return tryHTTPGet(clientNS, netip.AddrPortFrom(vip, 80), "/clientip") },
		} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					select {
					case <-stop:
						return
					default:
					}
					sent[i].Add(1)
					if req() == "" {
						lost[i].Add(1)
					}
					time.Sleep(50 * time.Millisecond)
				}
			}()
		}
		start := time.Now()
		d.do(t)
		took := time.Since(start).Round(100 * time.Millisecond)
		time.Sleep(2 * time.Second)
		close(stop)
		wg.Wait()
		line := fmt.Sprintf("%s (%s): host -> pod %d requests, %d lost; pod -> ClusterIP -> pod %d requests, %d lost",
			d.name, took, sent[0].Load(), lost[0].Load(), sent[1].Load(), lost[1].Load())
		t.Log(line)
		if lost[0].Load()+lost[1].Load() != 0 || sent[0].Load() == 0 || sent[1].Load() == 0 {
			t.Errorf("under traffic: %s", line)
		}
		lines = append(lines, line)
	}
	return lines
}

// eventually polls cond every 200 ms until it holds or timeout passes.
func eventually(timeout time.Duration, cond func() bool) bool {
	return testutil.Poll(timeout, 200*time.Millisecond, cond)
}
