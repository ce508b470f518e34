package testutil

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
)

// RefPluginsVersion is the containernetworking/plugins release the tests and
// benchmarks compare with: the one go.mod requires.
const RefPluginsVersion = "v1.9.1"

// BuildPlugin builds the underpass CNI plugin to out, static as released;
// tags add build tags (underpass_failpoints: the fault-injection build).
func BuildPlugin(out string, tags ...string) error {
	return BuildCommand(out, "underpass", tags...)
}

// BuildCommand builds cmd/<name> to out as make build does: static
// (CGO_ENABLED=0), so it also runs in the scratch release image.
func BuildCommand(out, name string, tags ...string) error {
	args := []string{"build", "-trimpath", "-o", out}
	if len(tags) > 0 {
		args = append(args, "-tags", strings.Join(tags, ","))
	}
	cmd := exec.Command("go", append(args, "github.com/underpass-cni/underpass/cmd/"+name)...)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("build %s: %v\n%s", name, err, b)
	}
	return nil
}

// ReferencePlugins builds the reference plugins (macvlan, ipvlan, ptp,
// loopback, host-local, static, portmap) once per version into $HOME/.cache/underpass/cni-plugins-<version>
// and returns that directory. No testing.TB: TestMain calls it too.
func ReferencePlugins() (string, error) {
	home, err := os.UserHomeDir()
	if err != nil {
		return "", err
	}
	dir := filepath.Join(home, ".cache", "underpass", "cni-plugins-"+RefPluginsVersion)
	want := map[string]string{
		"macvlan":    "main/macvlan",
		"ipvlan":     "main/ipvlan",
		"ptp":        "main/ptp",
		"host-local": "ipam/host-local",
		"static":     "ipam/static",
		"loopback":   "main/loopback", // containerd's CRI sets up lo with it
		"portmap":    "meta/portmap",  // hostPort, chained last (test/node)
	}
	var pkgs []string
	for name, p := range want {
		if _, err := os.Stat(filepath.Join(dir, name)); err != nil {
			pkgs = append(pkgs, "github.com/containernetworking/plugins/plugins/"+p+"@"+RefPluginsVersion)
		}
	}
	if len(pkgs) == 0 {
		return dir, nil
	}
	slices.Sort(pkgs)
	cmd := exec.Command("go", append([]string{"install"}, pkgs...)...)
	// Outside the module: @version installs ignore go.mod anyway, and the
	// neutral directory keeps it that way.
	cmd.Dir = os.TempDir()
	cmd.Env = append(os.Environ(), "GOBIN="+dir, "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("install reference plugins %v: %v\n%s", pkgs, err, b)
	}
	return dir, nil
}

// Helm returns the path of the helm binary: $UNDERPASS_HELM (make test sets
// it), else what test/helm.sh builds (once per version, cached; the version
// is set only there).
func Helm() (string, error) { return builtTool("UNDERPASS_HELM", "helm.sh") }

// CoreDNS returns the path of the coredns binary: $UNDERPASS_COREDNS (make
// test sets it), else what test/coredns.sh builds (cached by version).
func CoreDNS() (string, error) { return builtTool("UNDERPASS_COREDNS", "coredns.sh") }

// builtTool is $env if set, else the path that test/<script> prints after
// building the tool into its cache.
func builtTool(env, script string) (string, error) {
	if p := os.Getenv(env); p != "" {
		return p, nil
	}
	_, self, _, ok := runtime.Caller(0)
	if !ok {
		return "", fmt.Errorf("cannot locate test/%s", script)
	}
	path := filepath.Join(filepath.Dir(self), "..", "..", "test", script)
	var stderr strings.Builder
	cmd := exec.Command(path)
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("%s: %w\n%s", path, err, stderr.String())
	}
	return strings.TrimSpace(string(out)), nil
}

// WriteConflist writes a network configuration list (cniVersion version,
// the given name and plugins) to path and loads it back, as a runtime reads
// /etc/cni/net.d.
func WriteConflist(path, name, version string, plugins ...any) (*libcni.NetworkConfigList, error) {
	b, err := json.MarshalIndent(map[string]any{"cniVersion": version, "name": name, "plugins": plugins}, "", "  ")
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		return nil, err
	}
	return libcni.NetworkConfFromFile(path)
}

// PodRuntimeConf is the runtime config of a pod's CNI call as the kubelet's
// runtime passes it: IgnoreUnknown, the pod's namespace and name, then more.
func PodRuntimeConf(id, netns, ifname, podNamespace, podName string, more ...[2]string) *libcni.RuntimeConf {
	return &libcni.RuntimeConf{
		ContainerID: id, NetNS: netns, IfName: ifname,
		Args: append([][2]string{{"IgnoreUnknown", "1"}, {"K8S_POD_NAMESPACE", podNamespace}, {"K8S_POD_NAME", podName}}, more...),
	}
}

// CNIAdd runs ADD of the network list for rt with do, which runs its
// argument inside a network namespace (the node's NS.Do: the plugins start
// there, as on a node), and returns the result in the current version.
func CNIAdd(ctx context.Context, do func(func() error) error, c *libcni.CNIConfig, l *libcni.NetworkConfigList, rt *libcni.RuntimeConf) (*current.Result, error) {
	var res types.Result
	err := do(func() error {
		var err error
		res, err = c.AddNetworkList(ctx, l, rt)
		return err
	})
	if err != nil {
		return nil, err
	}
	return current.NewResultFromResult(res)
}

// ResultAddrs reads what the tests need of an ADD result: the last IPv4 and
// IPv6 address (unmapped) and the MAC of the interface ifname in the
// sandbox (nil without one).
func ResultAddrs(r *current.Result, ifname string) (ip4, ip6 netip.Addr, mac net.HardwareAddr) {
	for _, ipc := range r.IPs {
		a, _ := netip.AddrFromSlice(ipc.Address.IP)
		if a = a.Unmap(); a.Is4() {
			ip4 = a
		} else {
			ip6 = a
		}
	}
	for _, intf := range r.Interfaces {
		if intf.Name == ifname && intf.Sandbox != "" {
			mac, _ = net.ParseMAC(intf.Mac)
		}
	}
	return ip4, ip6, mac
}
