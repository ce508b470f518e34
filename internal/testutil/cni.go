package testutil

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
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
