package hostnat

import (
	"os/exec"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/underpass-cni/underpass/internal/testutil"
)

// inNewNetns runs fn on a locked thread in a fresh network namespace; the
// thread goes back to its own namespace before it is unlocked
// (testutil.OnOwnThread), so no other goroutine ever runs in that one.
func inNewNetns(t *testing.T, fn func() error) error {
	t.Helper()
	return testutil.OnOwnThread(func() error {
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			return err
		}
		return fn()
	})
}

// The table is written whole, rewritten harmlessly, read back, and removed
// twice without error; `nft` shows the rule the README describes.
func TestInstallRemove(t *testing.T) {
	testutil.RequireRoot(t)
	nft, err := exec.LookPath("nft")
	if err != nil {
		t.Fatalf("this test reads the rules back with nft (make deps installs it): %v", err)
	}
	err = inNewNetns(t, func() error {
		if st, err := Installed(); err != nil || st.Table {
			t.Errorf("fresh netns: %+v, %v", st, err)
		}
		for range 2 {
			if err := Install(Marks{Steered: 0x00200000, Service: 0x00400000}, []string{"eth0", "eth1"}); err != nil {
				return err
			}
		}
		st, err := Installed()
		if err != nil || !st.Table || st.Rules != 4 || st.Rules != Rules(2) || st.Flows != 0 {
			t.Errorf("after Install: %+v, %v; want the table, 4 rules (two per parent), 0 flows", st, err)
		}
		// exec forks from this locked thread: nft lists this netns.
		out, err := exec.Command(nft, "list", "table", "inet", Table).CombinedOutput()
		if err != nil {
			t.Errorf("nft list: %v: %s", err, out)
		}
		for _, parent := range []string{"eth0", "eth1"} {
			for _, want := range []string{
				`iifname "` + parent + `" meta mark & 0x00400000 == 0x00400000 counter packets 0 bytes 0 masquerade`,
				`iifname "` + parent + `" meta mark & 0x00200000 == 0x00200000 ct status dnat counter packets 0 bytes 0 masquerade`,
			} {
				if !strings.Contains(string(out), want) {
					t.Errorf("nft shows\n%s\nwant a rule %q", out, want)
				}
			}
		}
		if n := strings.Count(string(out), "masquerade"); n != 4 {
			t.Errorf("%d masquerade rules after two installs for two parents, want 4", n)
		}
		// A flushed chain is not the table the agent installed.
		if out, err := exec.Command(nft, "flush", "table", "inet", Table).CombinedOutput(); err != nil {
			t.Errorf("nft flush: %v: %s", err, out)
		}
		if st, _ := Installed(); !st.Table || st.Rules != 0 {
			t.Errorf("after a flush: %+v, want the table with 0 rules", st)
		}
		for range 2 {
			if err := Remove(); err != nil {
				return err
			}
		}
		if st, err := Installed(); err != nil || st.Table {
			t.Errorf("after Remove: %+v, %v", st, err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
