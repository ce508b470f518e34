//go:build linux

package deploy_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os/exec"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/containernetworking/cni/libcni"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/yaml"

	"github.com/underpass-cni/underpass/internal/cni"
	"github.com/underpass-cni/underpass/internal/config"
	"github.com/underpass-cni/underpass/internal/testutil"
)

const chartDir = "../../deploy/helm/underpass"

// helmTemplate renders the chart with helm template (values as --set
// pairs) into its objects; a render error is returned with helm's message.
func helmTemplate(t *testing.T, set ...string) ([]*unstructured.Unstructured, error) {
	t.Helper()
	helm, err := testutil.Helm()
	if err != nil {
		t.Fatal(err)
	}
	args := []string{"template", "underpass", chartDir, "--namespace", agentNamespace}
	for _, s := range set {
		args = append(args, "--set", s)
	}
	var stderr bytes.Buffer
	cmd := exec.Command(helm, args...)
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("helm %v: %w: %s", args, err, strings.TrimSpace(stderr.String()))
	}
	objs, err := decodeObjects(out)
	if err != nil {
		t.Fatalf("helm template output does not decode: %v\n%s", err, out)
	}
	return objs, nil
}

// TestHelmLint runs helm lint --strict on the chart, with the default
// values and with main mode.
func TestHelmLint(t *testing.T) {
	helm, err := testutil.Helm()
	if err != nil {
		t.Fatal(err)
	}
	for _, set := range [][]string{nil, {"--set", "network.mode=main", "--set", "network.master=eth0"}} {
		out, err := exec.Command(helm, append([]string{"lint", "--strict", chartDir}, set...)...).CombinedOutput()
		if err != nil {
			t.Errorf("helm lint --strict %v: %v\n%s", set, err, out)
		}
	}
}

// TestHelmChartIsTheManifests renders the chart with its default values
// and compares every object with deploy/kubernetes (but the Namespace,
// which a chart leaves to helm --create-namespace and the user's Pod
// Security labels): the two install paths are one install. The chart's
// own labels and the config checksum annotation are the only differences
// allowed; the ConfigMap's two files are compared parsed, not as text.
func TestHelmChartIsTheManifests(t *testing.T) {
	rendered, err := helmTemplate(t)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]*unstructured.Unstructured{}
	for _, d := range manifests(t) {
		if strings.HasPrefix(d.file, "deploy/kubernetes/") && d.obj.GetKind() != "Namespace" {
			want[d.obj.GetKind()+"/"+d.obj.GetName()] = d.obj
		}
	}
	got := map[string]*unstructured.Unstructured{}
	for _, o := range rendered {
		got[o.GetKind()+"/"+o.GetName()] = o
	}
	if k1, k2 := sortedKeys(got), sortedKeys(want); !slices.Equal(k1, k2) {
		t.Fatalf("the chart renders %v, deploy/kubernetes has %v", k1, k2)
	}
	for key, w := range want {
		g := normalizeChartObject(t, got[key].DeepCopy())
		w = normalizeChartObject(t, w.DeepCopy())
		if !reflect.DeepEqual(g.Object, w.Object) {
			gy, _ := yaml.Marshal(g.Object)
			wy, _ := yaml.Marshal(w.Object)
			t.Errorf("%s: the chart's default render differs from deploy/kubernetes:\n%s", key, lineDiff(string(wy), string(gy)))
		}
	}
}

// normalizeChartObject drops what only the chart adds and parses the
// ConfigMap's files.
func normalizeChartObject(t *testing.T, o *unstructured.Unstructured) *unstructured.Unstructured {
	t.Helper()
	for _, path := range [][]string{{"metadata", "labels"}, {"spec", "template", "metadata", "labels"}} {
		labels, ok, _ := unstructured.NestedStringMap(o.Object, path...)
		if !ok {
			continue
		}
		for _, k := range []string{"app.kubernetes.io/instance", "app.kubernetes.io/managed-by", "app.kubernetes.io/version", "helm.sh/chart"} {
			delete(labels, k)
		}
		_ = unstructured.SetNestedStringMap(o.Object, labels, path...)
	}
	unstructured.RemoveNestedField(o.Object, "spec", "template", "metadata", "annotations", "checksum/config")
	if o.GetKind() == "ConfigMap" {
		data, _, _ := unstructured.NestedStringMap(o.Object, "data")
		parsed := map[string]any{}
		for k, v := range data {
			var m any
			if err := yaml.Unmarshal([]byte(v), &m); err != nil {
				t.Fatalf("ConfigMap data.%s: %v", k, err)
			}
			parsed[k] = m
		}
		o.Object["data"] = parsed
	}
	// Round trip through JSON: numbers and nil slices alike on both sides.
	b, err := json.Marshal(o.Object)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	return &unstructured.Unstructured{Object: m}
}

func sortedKeys[V any](m map[string]V) []string {
	var ks []string
	for k := range m {
		ks = append(ks, k)
	}
	slices.Sort(ks)
	return ks
}

// lineDiff lists the lines only in a (-) and only in b (+).
func lineDiff(a, b string) string {
	al, bl := strings.Split(a, "\n"), strings.Split(b, "\n")
	var out []string
	for _, l := range al {
		if !slices.Contains(bl, l) {
			out = append(out, "- "+l)
		}
	}
	for _, l := range bl {
		if !slices.Contains(al, l) {
			out = append(out, "+ "+l)
		}
	}
	return strings.Join(out, "\n")
}

// TestHelmValues renders the chart with the values users set and checks
// that each reaches the objects, that the config and conflist parse as
// underpassd and the plugin parse them, and that bad values fail the
// render with a message naming the value.
func TestHelmValues(t *testing.T) {
	objs, err := helmTemplate(t,
		"image.repository=registry.example/underpass", "image.tag=v9",
		"network.mode=main", "network.master=bond0", "network.macvlanMode=private",
		"network.ipam.type=host-local", "network.ipam.subnet=10.20.0.0/24",
		"cni.binDir=/usr/libexec/cni", "cni.confDir=/etc/cni/multus", "cni.conflistName=00-underpass.conflist",
		"netnsDirs={/var/run/netns,/run/containerd/netns}",
		"config.staleServices.cidrs={10.43.0.0/16}", "config.staleServices.action=reject",
		"config.hostCIDRs={169.254.25.10/32}", "config.metrics.listen=0.0.0.0:9901",
		"config.bpffs=/sys/fs/bpf/underpass-b",
	)
	if err != nil {
		t.Fatal(err)
	}
	var ds, cm *unstructured.Unstructured
	for _, o := range objs {
		switch o.GetKind() {
		case "DaemonSet":
			ds = o
		case "ConfigMap":
			cm = o
		}
	}
	if ds == nil || cm == nil {
		t.Fatalf("no DaemonSet or ConfigMap in the render")
	}
	raw, _, _ := unstructured.NestedString(cm.Object, "data", "underpass.yaml")
	c, err := config.Parse([]byte(raw))
	if err != nil {
		t.Fatalf("the rendered agent config does not parse: %v\n%s", err, raw)
	}
	if got := fmt.Sprint(c.ServiceCIDRs()); !strings.Contains(got, "10.43.0.0/16") || c.StaleServices.Action != "reject" || c.BPFFS != "/sys/fs/bpf/underpass-b" || c.Metrics.Listen != "0.0.0.0:9901" {
		t.Errorf("agent config: service CIDRs %s, action %s, bpffs %s, listen %s", got, c.StaleServices.Action, c.BPFFS, c.Metrics.Listen)
	}
	conflist, _, _ := unstructured.NestedString(cm.Object, "data", "underpass.conflist")
	list, err := libcni.ConfListFromBytes([]byte(conflist))
	if err != nil {
		t.Fatalf("the rendered conflist: %v\n%s", err, conflist)
	}
	if len(list.Plugins) != 1 || list.Plugins[0].Network.Type != "underpass" {
		t.Fatalf("main mode: plugins %s", conflist)
	}
	var entry map[string]any
	if err := json.Unmarshal(list.Plugins[0].Bytes, &entry); err != nil {
		t.Fatal(err)
	}
	entry["name"], entry["cniVersion"] = list.Name, list.CNIVersion
	b, _ := json.Marshal(entry)
	pc, err := cni.ParseConf(b)
	if err != nil {
		t.Fatalf("the plugin refuses the rendered main-mode entry: %v\n%s", err, b)
	}
	if pc.Master != "bond0" || pc.BPFFS != "/sys/fs/bpf/underpass-b" || entry["macvlanMode"] != "private" {
		t.Errorf("main-mode entry: %s", b)
	}

	ctr, _, _ := unstructured.NestedSlice(ds.Object, "spec", "template", "spec", "containers")
	agent := ctr[0].(map[string]any)
	if img := agent["image"]; img != "registry.example/underpass:v9" {
		t.Errorf("image %v", img)
	}
	for _, probe := range []string{"livenessProbe", "readinessProbe"} {
		port, _, _ := unstructured.NestedFieldNoCopy(agent, probe, "httpGet", "port")
		if fmt.Sprint(port) != "9901" {
			t.Errorf("%s port %v, want config.metrics.listen's 9901", probe, port)
		}
	}
	yds, _ := yaml.Marshal(ds.Object)
	for _, want := range []string{"path: /usr/libexec/cni", "path: /etc/cni/multus", "value: 00-underpass.conflist",
		"mountPath: /run/containerd/netns", "path: /run/containerd/netns", "mountPath: /var/run/netns"} {
		if !strings.Contains(string(yds), want) {
			t.Errorf("DaemonSet: no %q in\n%s", want, yds)
		}
	}

	for _, bad := range []struct {
		set  []string
		want string
	}{
		{[]string{"network.mode=main"}, "network.master is required in main mode"},
		{[]string{"network.mode=ipvlan"}, `network.mode "ipvlan": want chained or main`},
	} {
		_, err := helmTemplate(t, bad.set...)
		if err == nil || !strings.Contains(err.Error(), bad.want) {
			t.Errorf("helm template %v: %v, want an error naming %q", bad.set, err, bad.want)
		}
	}
}
