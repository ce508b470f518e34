package cni_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/underpass-cni/underpass/test/netenv"
)

// Malformed environments, as a broken or hostile runtime would call the
// plugin: each gets a CNI error with the right code and a message naming
// what is wrong, and nothing is created.
func TestMalformedEnv(t *testing.T) {
	h := newHarness(t, harnessOpts{})
	p := h.newPod("env")
	conf, err := json.Marshal(map[string]any{"cniVersion": "1.1.0", "name": "up-env", "type": "underpass",
		"master": "eth0", "bpffs": h.bpffs, "ipam": h.hostLocal(false)})
	must(t, err)
	notNS := filepath.Join(t.TempDir(), "not-a-netns")
	must(t, os.WriteFile(notNS, nil, 0o600))
	base := map[string]string{
		"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "ctr-env", "CNI_NETNS": p.netns, "CNI_IFNAME": "eth0",
		"CNI_PATH": refDir, "CNI_ARGS": "K8S_POD_NAME=env;K8S_POD_NAMESPACE=default",
	}
	for _, tc := range []struct {
		name  string
		env   map[string]string // "" deletes the variable
		stdin []byte
		code  uint
		msg   string
	}{
		{"unknown command", map[string]string{"CNI_COMMAND": "EXPLODE"}, conf, types.ErrInvalidEnvironmentVariables, "EXPLODE"},
		{"no container id", map[string]string{"CNI_CONTAINERID": ""}, conf, types.ErrInvalidEnvironmentVariables, "CNI_CONTAINERID"},
		{"container id with a slash", map[string]string{"CNI_CONTAINERID": "../../etc"}, conf, types.ErrInvalidEnvironmentVariables, "containerID"},
		{"container id too long for the registry", map[string]string{"CNI_CONTAINERID": strings.Repeat("c", 72)}, conf, types.ErrInvalidEnvironmentVariables, "container id"},
		{"netns path too long for the registry", map[string]string{"CNI_NETNS": "/var/run/netns/" + strings.Repeat("n", 120)}, conf, types.ErrInvalidEnvironmentVariables, "netns path"},
		{"no netns", map[string]string{"CNI_NETNS": ""}, conf, types.ErrInvalidEnvironmentVariables, "CNI_NETNS"},
		{"netns that does not exist", map[string]string{"CNI_NETNS": "/var/run/netns/underpass-no-such-ns"}, conf, types.ErrInvalidNetNS, "underpass-no-such-ns"},
		{"netns that is a plain file", map[string]string{"CNI_NETNS": notNS}, conf, types.ErrInvalidNetNS, "not-a-netns"},
		{"no ifname", map[string]string{"CNI_IFNAME": ""}, conf, types.ErrInvalidEnvironmentVariables, "CNI_IFNAME"},
		{"ifname too long", map[string]string{"CNI_IFNAME": "eth0-much-too-long"}, conf, types.ErrInvalidEnvironmentVariables, "interface name"},
		{"ifname with a slash", map[string]string{"CNI_IFNAME": "eth/0"}, conf, types.ErrInvalidEnvironmentVariables, "interface name"},
		{"CNI_ARGS without =", map[string]string{"CNI_ARGS": "K8S_POD_NAME"}, conf, types.ErrInvalidEnvironmentVariables, "CNI_ARGS"},
		{"CNI_ARGS with a control character", map[string]string{"CNI_ARGS": "K8S_POD_NAME=a\x01b;IgnoreUnknown=1"}, conf, types.ErrInvalidEnvironmentVariables, "control characters"},
		{"CNI_ARGS with invalid UTF-8", map[string]string{"CNI_ARGS": "K8S_POD_NAMESPACE=\xff\xfe"}, conf, types.ErrInvalidEnvironmentVariables, "invalid UTF-8"},
		{"no CNI_PATH", map[string]string{"CNI_PATH": ""}, conf, types.ErrInvalidEnvironmentVariables, "CNI_PATH"},
		{"CNI_PATH without the IPAM plugin", map[string]string{"CNI_PATH": "/nonexistent"}, conf, types.ErrInternal, "host-local"},
		{"empty stdin", nil, []byte{}, types.ErrDecodingFailure, "network config"},
		{"stdin not JSON", nil, []byte("{cniVersion: 1.1.0"), types.ErrDecodingFailure, "network config"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env := os.Environ()
			for k, v := range base {
				if nv, ok := tc.env[k]; ok {
					v = nv
				}
				if v != "" {
					env = append(env, k+"="+v)
				}
			}
			var stdout, stderr bytes.Buffer
			cmd := exec.Command(filepath.Join(pluginDir, "underpass"))
			cmd.Env, cmd.Stdin, cmd.Stdout, cmd.Stderr = env, bytes.NewReader(tc.stdin), &stdout, &stderr
			err := h.inNode(cmd.Run)
			if err == nil {
				t.Fatalf("ADD succeeded: %s", stdout.String())
			}
			var e types.Error
			if jerr := json.Unmarshal(stdout.Bytes(), &e); jerr != nil {
				t.Fatalf("stdout is not a CNI error (%v): %q, stderr %q", jerr, stdout.String(), stderr.String())
			}
			if e.Code != tc.code || !strings.Contains(e.Msg+" "+e.Details, tc.msg) {
				t.Fatalf("error %d %q (%s), want code %d saying %q", e.Code, e.Msg, e.Details, tc.code, tc.msg)
			}
			t.Logf("code %d: %s", e.Code, e.Msg)
			h.assertNoLeak(t, nil, p.ns)
		})
	}
}

// readOnlyExec runs plugins in a private mount namespace where every
// filesystem but bpffs, proc, sys, dev and the netns mounts is read-only:
// what a node with a full or read-only /run, /var or /tmp looks like to the
// plugin.
type readOnlyExec struct{ *invoke.DefaultExec }

const readOnlyScript = `mount --make-rprivate /
awk '$3 !~ /^(bpf|proc|sysfs|devtmpfs|devpts|nsfs|cgroup2?|securityfs|debugfs|tracefs|mqueue|hugetlbfs)$/ {print $2}' /proc/self/mounts |
while read -r m; do mount -o remount,bind,ro "$m" 2>/dev/null || true; done
exec "$@"`

func (e readOnlyExec) ExecPlugin(ctx context.Context, plugin string, stdin []byte, environ []string) ([]byte, error) {
	var stdout, stderr bytes.Buffer
	c := exec.CommandContext(ctx, "unshare", "--mount", "sh", "-c", readOnlyScript, "sh", plugin)
	c.Env, c.Stdin, c.Stdout, c.Stderr = environ, bytes.NewReader(stdin), &stdout, &stderr
	if err := c.Run(); err != nil {
		var te types.Error
		if json.Unmarshal(stdout.Bytes(), &te) == nil && te.Code != 0 {
			return nil, &te
		}
		return nil, fmt.Errorf("%s: %w (stderr %q)", filepath.Base(plugin), err, stderr.String())
	}
	return stdout.Bytes(), nil
}

// The plugin keeps no state files (its lock is an flock on the pin
// directory), so ADD, CHECK and DEL work with every other filesystem
// read-only. IPAM is static here: host-local's leases are IPAM's state, and
// a failing IPAM is covered by TestAddFailures.
func TestReadOnlyHost(t *testing.T) {
	h := newHarness(t, harnessOpts{})
	// The wrapper itself must work, or the test proves nothing.
	out, err := exec.Command("unshare", "--mount", "sh", "-c", readOnlyScript+"; touch /run/underpass-ro-probe", "sh").CombinedOutput()
	if err == nil {
		os.Remove("/run/underpass-ro-probe")
		t.Fatalf("the read-only wrapper left /run writable: %s", out)
	}
	wrap := &invoke.DefaultExec{RawExec: &invoke.RawExec{Stderr: os.Stderr}, PluginDecoder: version.PluginDecoder{}}
	roCNI := libcni.NewCNIConfigWithCacheDir([]string{pluginDir, refDir}, h.cacheDir, readOnlyExec{wrap})
	u := h.env.Uplinks[0]
	conf := h.mainConf(false)
	conf["ipam"] = map[string]any{"type": "static", "addresses": []any{map[string]any{"address": u.IP4(120).String(), "gateway": u.Gateway4.String()}},
		"routes": []any{map[string]any{"dst": "0.0.0.0/0"}}}
	l := h.conflist("up-ro", "1.1.0", conf)
	prev := h.cni
	h.cni = roCNI
	t.Cleanup(func() { h.cni = prev })
	p := h.addFirstPod(l, "ro")
	h.checkRegistered(t, p)
	if err := h.check(l, p); err != nil {
		t.Fatalf("CHECK: %v", err)
	}
	netenv.MustPing(t, h.env.Node, p.ip4, 3)
	h.del(l, p)
	h.assertNoLeak(t, nil, p.ns)
}
