package node

import (
	"context"
	"fmt"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
)

// ClusterDNS is the kube-dns Service's ClusterIP, the kubelet's clusterDNS.
const ClusterDNS = "10.96.0.10"

// CoreDNSImage is built here from test/coredns.sh's binary.
const CoreDNSImage = "registry.k8s.io/coredns/coredns:underpass"

// corefile serves the cluster domain from the API and nothing else: this
// node has no upstream resolver (test traffic stays in the machine).
const corefile = `.:53 {
    errors
    health :8080
    ready :8181
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 30
    }
    cache 30
    loadbalance
}
`

// StartClusterDNS deploys CoreDNS as a cluster's DNS is deployed: a
// Deployment in kube-system on the node's pod network (whatever CNI config
// is in place now), reaching the API through the kubernetes Service with
// its ServiceAccount, behind the kube-dns Service at ClusterDNS. It waits
// until CoreDNS is Ready (the kubelet probes it) and returns a function
// that removes it all and waits for the pod to go.
func StartClusterDNS(tb testing.TB, cs kubernetes.Interface) (stop func()) {
	tb.Helper()
	ctx := context.Background()
	const ns, name = "kube-system", "coredns"
	labels := map[string]string{"k8s-app": "kube-dns"}
	meta := metav1.ObjectMeta{Name: name, Namespace: ns, Labels: labels}
	var err error
	create := func(what string, e error) {
		tb.Helper()
		if e != nil && err == nil {
			err = fmt.Errorf("create %s: %w", what, e)
		}
	}
	_, e := cs.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: meta}, metav1.CreateOptions{})
	create("ServiceAccount", e)
	_, e = cs.RbacV1().ClusterRoles().Create(ctx, &rbacv1.ClusterRole{
		ObjectMeta: metav1.ObjectMeta{Name: "system:coredns"},
		Rules: []rbacv1.PolicyRule{
			{APIGroups: []string{""}, Resources: []string{"endpoints", "services", "pods", "namespaces"}, Verbs: []string{"list", "watch"}},
			{APIGroups: []string{"discovery.k8s.io"}, Resources: []string{"endpointslices"}, Verbs: []string{"list", "watch"}},
		},
	}, metav1.CreateOptions{})
	create("ClusterRole", e)
	_, e = cs.RbacV1().ClusterRoleBindings().Create(ctx, &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "system:coredns"},
		RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: "system:coredns"},
		Subjects:   []rbacv1.Subject{{Kind: "ServiceAccount", Name: name, Namespace: ns}},
	}, metav1.CreateOptions{})
	create("ClusterRoleBinding", e)
	_, e = cs.CoreV1().ConfigMaps(ns).Create(ctx, &corev1.ConfigMap{ObjectMeta: meta, Data: map[string]string{"Corefile": corefile}}, metav1.CreateOptions{})
	create("ConfigMap", e)
	probe := func(path string, port int32) *corev1.Probe {
		return &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: path, Port: intstr.FromInt32(port)}}, PeriodSeconds: 2}
	}
	_, e = cs.AppsV1().Deployments(ns).Create(ctx, Deployment(meta, labels, 1, corev1.PodSpec{
		ServiceAccountName: name,
		DNSPolicy:          corev1.DNSDefault,
		Containers: []corev1.Container{{
			Name: "coredns", Image: CoreDNSImage, ImagePullPolicy: corev1.PullNever,
			Args: []string{"-conf", "/etc/coredns/Corefile"},
			Ports: []corev1.ContainerPort{
				{Name: "dns", ContainerPort: 53, Protocol: corev1.ProtocolUDP},
				{Name: "dns-tcp", ContainerPort: 53, Protocol: corev1.ProtocolTCP},
			},
			ReadinessProbe: probe("/ready", 8181),
			LivenessProbe:  probe("/health", 8080),
			VolumeMounts:   []corev1.VolumeMount{{Name: "config", MountPath: "/etc/coredns", ReadOnly: true}},
		}},
		Volumes: []corev1.Volume{{Name: "config", VolumeSource: corev1.VolumeSource{
			ConfigMap: &corev1.ConfigMapVolumeSource{LocalObjectReference: corev1.LocalObjectReference{Name: name}}}}},
	}), metav1.CreateOptions{})
	create("Deployment", e)
	_, e = cs.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "kube-dns", Namespace: ns, Labels: labels},
		Spec: corev1.ServiceSpec{
			ClusterIP: ClusterDNS,
			Selector:  labels,
			Ports: []corev1.ServicePort{
				{Name: "dns", Port: 53, Protocol: corev1.ProtocolUDP, TargetPort: intstr.FromInt32(53)},
				{Name: "dns-tcp", Port: 53, Protocol: corev1.ProtocolTCP, TargetPort: intstr.FromInt32(53)},
			},
		},
	}, metav1.CreateOptions{})
	create("Service kube-dns", e)

	stop = func() {
		tb.Helper()
		_ = cs.CoreV1().Services(ns).Delete(ctx, "kube-dns", metav1.DeleteOptions{})
		_ = cs.AppsV1().Deployments(ns).Delete(ctx, name, metav1.DeleteOptions{})
		_ = cs.CoreV1().ConfigMaps(ns).Delete(ctx, name, metav1.DeleteOptions{})
		_ = cs.RbacV1().ClusterRoleBindings().Delete(ctx, "system:coredns", metav1.DeleteOptions{})
		_ = cs.RbacV1().ClusterRoles().Delete(ctx, "system:coredns", metav1.DeleteOptions{})
		_ = cs.CoreV1().ServiceAccounts(ns).Delete(ctx, name, metav1.DeleteOptions{})
		deadline := time.Now().Add(90 * time.Second)
		for {
			pods, err := cs.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "k8s-app=kube-dns"})
			if err == nil && len(pods.Items) == 0 {
				return
			}
			if time.Now().After(deadline) {
				tb.Errorf("CoreDNS pods still there 90 s after their Deployment was deleted: %v", err)
				return
			}
			time.Sleep(500 * time.Millisecond)
		}
	}
	if err != nil {
		stop()
		tb.Fatalf("cluster DNS: %v", err)
	}

	deadline := time.Now().Add(2 * time.Minute)
	for {
		d, err := cs.AppsV1().Deployments(ns).Get(ctx, name, metav1.GetOptions{})
		if err == nil && d.Status.ReadyReplicas == 1 {
			return stop
		}
		if time.Now().After(deadline) {
			pods, _ := cs.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "k8s-app=kube-dns"})
			var state []string
			for _, p := range pods.Items {
				state = append(state, fmt.Sprintf("%s %s %+v", p.Name, p.Status.Phase, p.Status.ContainerStatuses))
			}
			stop()
			if apierrors.IsNotFound(err) {
				tb.Fatalf("cluster DNS: the Deployment is gone")
			}
			tb.Fatalf("cluster DNS: CoreDNS not Ready after 2 min (%v): %v", err, state)
		}
		time.Sleep(time.Second)
	}
}
