package testutil

import (
	"fmt"
	"os"
	"path"
	"testing"
)

// Main is the TestMain of a test tier that runs binaries it builds first
// (test/agent, test/cni, test/soak). Unless run as root it fails at once,
// in one line naming tier ("test/cni"). Otherwise setup builds what the
// tests run into tmp, a fresh temporary directory removed once they have
// run; its error ends the test binary before any test. Main does not
// return: it exits with the tests' status, or 1.
func Main(m *testing.M, tier string, setup func(tmp string) error) {
	os.Exit(runMain(m, tier, setup))
}

func runMain(m interface{ Run() int }, tier string, setup func(tmp string) error) int {
	if os.Geteuid() != 0 {
		fmt.Fprintf(os.Stderr, "%s must run as root (netns, eBPF): sudo go test ./%s\n", tier, tier)
		return 1
	}
	tmp, err := os.MkdirTemp("", "underpass-"+path.Base(tier)+"-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(tmp)
	if err := setup(tmp); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return m.Run()
}
