package hostnat

import (
	"os/exec"
	"runtime"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/underpass-cni/underpass/internal/testutil"
)

// inNewNetns runs fn on a thread in a fresh network namespace. The thread
// stays locked, so Go ends it with the goroutine and no other goroutine
// ever runs in that namespace.
func inNewNetns(t *testing.T, fn func() error) error {
	t.Helper()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			errc <- err
			return
		}
		errc <- fn()
	}()
	return <-errc
}

// The table is written whole, rewritten harmlessly, read back, and removed
// twice without error; `nft` shows the rule the README describes.
func TestInstallRemove(t *testing.T) {
	testutil.RequireRoot(t)
	err := inNewNetns(t, func() error {
		if ok, _, err := Installed(); err != nil || ok {
			t.Errorf("fresh netns: installed %v, %v", ok, err)
		}
		for range 2 {
			if err := Install(0x00200000); err != nil {
				return err
			}
		}
		ok, flows, err := Installed()
		if err != nil || !ok || flows != 0 {
			t.Errorf("after Install: installed %v, %d flows, %v", ok, flows, err)
		}
		if nft, err := exec.LookPath("nft"); err == nil {
			// exec forks from this locked thread: nft lists this netns.
			out, err := exec.Command(nft, "list", "table", "inet", Table).CombinedOutput()
			if err != nil {
				t.Errorf("nft list: %v: %s", err, out)
			}
			want := "meta mark & 0x00200000 == 0x00200000 ct status dnat counter packets 0 bytes 0 masquerade"
			if !strings.Contains(string(out), want) {
				t.Errorf("nft shows\n%s\nwant a rule %q", out, want)
			}
			if n := strings.Count(string(out), "masquerade"); n != 1 {
				t.Errorf("%d masquerade rules after two installs, want 1", n)
			}
		}
		for range 2 {
			if err := Remove(); err != nil {
				return err
			}
		}
		if ok, _, err := Installed(); err != nil || ok {
			t.Errorf("after Remove: installed %v, %v", ok, err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
