package node_test

import (
	"context"
	"fmt"
	"net/netip"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"

	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
	"github.com/underpass-cni/underpass/test/k8s/kapi"
	"github.com/underpass-cni/underpass/test/node"
)

// cleanupKubeProxy removes what kube-proxy in mode programmed, as its own
// --cleanup does: with it stopped, nothing on the node translates a VIP.
func cleanupKubeProxy(t *testing.T, work, mode string) {
	t.Helper()
	bin, err := kapi.BinDir()
	must(t, err)
	cfg := filepath.Join(work, "kube-proxy-"+mode+".yaml")
	if out, err := exec.Command(filepath.Join(bin, "kube-proxy"), "--cleanup", "--config", cfg).CombinedOutput(); err != nil {
		t.Fatalf("kube-proxy --cleanup: %v\n%s", err, out)
	}
	for _, table := range [][]string{{"ip", "kube-proxy"}, {"ip6", "kube-proxy"}} {
		if out, err := exec.Command("nft", "list", "table", table[0], table[1]).CombinedOutput(); err == nil {
			t.Fatalf("table %s %s still there after kube-proxy --cleanup:\n%.400s", table[0], table[1], out)
		}
	}
}

const rollName = "roll"

// ebpfRollout is Services translated at the pod with the real control
// plane's objects and no kube-proxy: a Deployment of 3 netexec pods
// behind a ClusterIP, new connections from a client pod spread over the
// three, then a rollout of the Deployment (the kubelet terminating the
// old pods, the EndpointSlice controller marking them) under a new
// connection every 20 ms, which must all be answered. It returns the
// README line.
func ebpfRollout(t *testing.T, cs kubernetes.Interface, bpffs string) string {
	ctx := context.Background()
	clientName := "client-" + rollName
	createPod(t, cs, clientName)
	createDeployment(t, cs, rollName, 3)
	vip := createService(t, cs, rollName, rollName)
	t.Cleanup(func() {
		_ = cs.CoreV1().Services("default").Delete(ctx, rollName, metav1.DeleteOptions{})
		_ = cs.AppsV1().Deployments("default").Delete(ctx, rollName, metav1.DeleteOptions{})
		_ = cs.CoreV1().Pods("default").Delete(ctx, clientName, metav1.DeleteOptions{GracePeriodSeconds: new(int64)})
		waitFor(t, 120*time.Second, "the rollout's pods deleted and unregistered", func() bool {
			l, err := cs.CoreV1().Pods("default").List(ctx, metav1.ListOptions{})
			eps, eerr := endpoints(bpffs)
			return err == nil && len(l.Items) == 0 && eerr == nil && len(eps) == 0
		})
	})
	waitPodReady(t, cs, clientName)
	clientNS := podNetns(t, bpffs, clientName)
	clientIP := podIP(t, cs, clientName)
	waitBackends(t, bpffs, vip, 3)

	// Spread: 90 new connections over 3 backends, 30 expected each; under
	// 10 is 1 in 10^5 for a fair choice.
	to := netip.AddrPortFrom(vip, 80)
	hits := map[string]int{}
	for range 90 {
		hits[httpGet(t, clientNS, to, "/hostname")]++
	}
	if len(hits) != 3 {
		t.Errorf("90 connections reached %d backends, want 3: %v", len(hits), hits)
	}
	for pod, n := range hits {
		if n < 10 {
			t.Errorf("backend %s got %d of 90 connections: %v", pod, n, hits)
		}
	}
	if got := httpGet(t, clientNS, to, "/clientip"); !strings.HasPrefix(got, clientIP.String()+":") {
		t.Errorf("the backend saw %q, want the client pod %s", got, clientIP)
	}
	t.Logf("90 connections to %s spread %v; the backend sees the client pod", to, hits)

	// The rollout, under requests.
	var (
		mu         sync.Mutex
		ok, failed int
		firstFails []string
		lastFrom   []string
	)
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-stop:
				return
			default:
			}
			got := tryHTTPGet(clientNS, to, "/hostname")
			mu.Lock()
			if got == "" {
				failed++
				if len(firstFails) < 5 {
					firstFails = append(firstFails, time.Now().Format("15:04:05.000"))
				}
			} else {
				ok++
				lastFrom = append(lastFrom, got)
				if len(lastFrom) > 20 {
					lastFrom = lastFrom[1:]
				}
			}
			mu.Unlock()
			time.Sleep(20 * time.Millisecond)
		}
	}()
	start := time.Now()
	old := podsOf(t, cs, rollName)
	d, err := cs.AppsV1().Deployments("default").Get(ctx, rollName, metav1.GetOptions{})
	must(t, err)
	d.Spec.Template.Annotations = map[string]string{"underpass.test/rollout": start.Format(time.RFC3339Nano)}
	_, err = cs.AppsV1().Deployments("default").Update(ctx, d, metav1.UpdateOptions{})
	must(t, err)
	waitFor(t, 180*time.Second, "the rollout done and the old pods gone", func() bool {
		d, err := cs.AppsV1().Deployments("default").Get(ctx, rollName, metav1.GetOptions{})
		if err != nil || d.Status.ObservedGeneration < d.Generation || d.Status.UpdatedReplicas != 3 ||
			d.Status.AvailableReplicas != 3 || d.Status.Replicas != 3 {
			return false
		}
		pods := podsOf(t, cs, rollName)
		return len(pods) == 3 && !slices.ContainsFunc(pods, func(p string) bool { return slices.Contains(old, p) })
	})
	took := time.Since(start)
	time.Sleep(2 * time.Second)
	close(stop)
	<-done
	now := podsOf(t, cs, rollName)
	for _, from := range lastFrom {
		if !slices.Contains(now, from) {
			t.Errorf("after the rollout an answer came from %s, not one of the new pods %v", from, now)
		}
	}
	if failed != 0 {
		t.Errorf("rollout: %d of %d requests failed (first at %v)", failed, ok+failed, firstFails)
	}
	t.Logf("rollout of %d pods in %s under a new connection every 20 ms: %d answered, %d failed", len(old), took.Round(time.Second), ok, failed)
	return fmt.Sprintf("| services.mode ebpf, **kube-proxy absent** (stopped, `--cleanup`) | 3 backends: %s | rollout of the Deployment (3 pods) in %s: %d requests, %d failed |",
		spreadText(hits), took.Round(time.Second), ok+failed, failed)
}

func spreadText(hits map[string]int) string {
	var ns []string
	for _, n := range hits {
		ns = append(ns, fmt.Sprint(n))
	}
	slices.Sort(ns)
	return strings.Join(ns, "/") + " of 90 new connections"
}

// createDeployment is n agnhost netexec pods labelled app=name that keep
// serving 5 s after SIGTERM (--delay-shutdown), as a Deployment meant to
// roll without errors does: the endpoints go before the server does.
func createDeployment(t *testing.T, cs kubernetes.Interface, name string, n int32) {
	t.Helper()
	labels := map[string]string{"app": name}
	readiness := &corev1.Probe{
		ProbeHandler:  corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/readyz", Port: intstr.FromInt32(8080)}},
		PeriodSeconds: 1, TimeoutSeconds: 2, FailureThreshold: 3,
	}
	_, err := cs.AppsV1().Deployments("default").Create(context.Background(), node.Deployment(metav1.ObjectMeta{Name: name}, labels, n, corev1.PodSpec{
		Containers: []corev1.Container{{
			Name: "netexec", Image: node.AgnhostImage, ImagePullPolicy: corev1.PullNever,
			Args:           []string{"netexec", "--http-port=8080", "--delay-shutdown=5"},
			ReadinessProbe: readiness,
		}},
	}), metav1.CreateOptions{})
	must(t, err)
}

// podsOf lists the names of the pods labelled app=name that are not
// being deleted.
func podsOf(t *testing.T, cs kubernetes.Interface, name string) []string {
	t.Helper()
	l, err := cs.CoreV1().Pods("default").List(context.Background(), metav1.ListOptions{LabelSelector: "app=" + name})
	must(t, err)
	var out []string
	for _, p := range l.Items {
		if p.DeletionTimestamp == nil {
			out = append(out, p.Name)
		}
	}
	return out
}

// waitBackends waits for vip's frontend to have n backends.
func waitBackends(t *testing.T, bpffs string, vip netip.Addr, n int) {
	t.Helper()
	waitFor(t, 90*time.Second, fmt.Sprintf("the frontend of %s with %d backends", vip, n), func() bool {
		dp, err := loader.Open(bpffs)
		if err != nil {
			return false
		}
		defer dp.Close()
		fs, err := datapath.Frontends(&dp.Maps)
		return err == nil && slices.ContainsFunc(fs, func(f datapath.Frontend) bool { return f.VIP == vip && len(f.Backends) == n })
	})
}
