//go:build linux

package deploy_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/underpass-cni/underpass/internal/config"
	"github.com/underpass-cni/underpass/internal/testutil"
)

// The systemd unit for hosts without Kubernetes, checked by systemd's own
// `systemd-analyze verify` (syntax, directives, the binary it starts) with
// ExecStart pointed at a freshly built underpassd; no systemd runs here to
// start it. Its config path is the one underpassctl's OCI hook reads.
func TestSystemdUnit(t *testing.T) {
	const unit = "../../deploy/systemd/underpassd.service"
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Fatalf("systemd-analyze (Debian package systemd; make deps installs it): %v", err)
	}
	text, err := os.ReadFile(unit)
	if err != nil {
		t.Fatal(err)
	}
	exec := "ExecStart=/usr/local/bin/underpassd --config " + config.DefaultPath + "\n"
	if !strings.Contains(string(text), exec) {
		t.Fatalf("%s does not start underpassd with the config the OCI hook reads (%q)", unit, exec)
	}
	dir := t.TempDir()
	bin := filepath.Join(dir, "underpassd")
	if err := testutil.BuildAgent(bin); err != nil {
		t.Fatal(err)
	}
	local := filepath.Join(dir, "underpassd.service")
	if err := os.WriteFile(local, []byte(strings.Replace(string(text), "/usr/local/bin/underpassd", bin, 1)), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := execCommand(analyze, "verify", local)
	// verify exits 0 with warnings on stderr: a directive it does not know
	// or a value it ignores is a warning, not an error.
	if err != nil || strings.Contains(out, "underpassd.service") {
		t.Fatalf("systemd-analyze verify %s: %v\n%s", unit, err, out)
	}
}

func execCommand(name string, args ...string) (string, error) {
	out, err := exec.Command(name, args...).CombinedOutput()
	return string(out), err
}
