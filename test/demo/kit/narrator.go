//go:build linux

package kit

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/underpass-cni/underpass/internal/flock"
)

// Narrator prints a demo's steps: section titles, passed (✓) and failed
// (✗) steps, and indented detail, counting the steps and the failures.
type Narrator struct {
	Out           io.Writer
	Steps, Failed int
}

// Section prints a section title.
func (n *Narrator) Section(format string, args ...any) {
	fmt.Fprintf(n.Out, "\n── %s\n", fmt.Sprintf(format, args...))
}

// OK prints a passed step.
func (n *Narrator) OK(format string, args ...any) {
	n.Steps++
	fmt.Fprintf(n.Out, "  ✓ %s\n", fmt.Sprintf(format, args...))
}

// Fail prints a failed step.
func (n *Narrator) Fail(format string, args ...any) {
	n.Steps++
	n.Failed++
	fmt.Fprintf(n.Out, "  ✗ %s\n", fmt.Sprintf(format, args...))
}

// Check prints a passed step if ok, else a failed one, and returns ok.
func (n *Narrator) Check(ok bool, format string, args ...any) bool {
	if ok {
		n.OK(format, args...)
	} else {
		n.Fail(format, args...)
	}
	return ok
}

// Detail prints lines under a step, indented.
func (n *Narrator) Detail(format string, args ...any) {
	for _, l := range strings.Split(strings.TrimRight(fmt.Sprintf(format, args...), "\n"), "\n") {
		fmt.Fprintf(n.Out, "      %s\n", l)
	}
}

// RunScene runs a demo's scene between the sweep of what an earlier run
// left (leftovers not empty: cleanup(false) under "Leftovers of an earlier
// run") and its own cleanup (cleanup(true) under "Cleanup"), which always
// runs: on success, failure, Ctrl-C (which cancels the scene's context)
// and panics in the scene; a second Ctrl-C does not stop it. kill -9 is
// what the leftover sweep is for. It returns the scene's exit code, 1 if
// a cleanup failed.
func (n *Narrator) RunScene(leftovers func() []string, cleanup func(graceful bool) bool, scene func(ctx context.Context) int) (code int) {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if left := leftovers(); len(left) > 0 {
		n.Section("Leftovers of an earlier run")
		if !cleanup(false) {
			return 1
		}
	}
	defer func() {
		if r := recover(); r != nil {
			fmt.Fprintf(n.Out, "  ✗ demo crashed: %v\n", r)
			code = 1
		}
		signal.Ignore(os.Interrupt, syscall.SIGTERM) // a second Ctrl-C must not stop the cleanup
		n.Section("Cleanup")
		if !cleanup(true) && code == 0 {
			code = 1
		}
	}()
	return scene(ctx)
}

// ErrReported is a demo's error when its output has already said what
// failed.
var ErrReported = errors.New("a step failed")

// Run is a demo's command line after the flags: as root, under the lock
// that keeps it to one at a time (another one running: an error that
// names it as what), either only the cleanup (cleanupOnly) or the demo
// (main, an exit code). Its error is ErrReported when a step failed.
func (n Names) Run(what, rootHint string, cleanupOnly bool, cleanup func(graceful bool) bool, main func() int) error {
	if os.Geteuid() != 0 {
		return errors.New(rootHint)
	}
	unlock, err := flock.PidFile(n.LockFile, 0o644)
	if errors.Is(err, flock.ErrHeld) {
		return fmt.Errorf("another %s (pid %s) is running: stop it with Ctrl-C first", what, flock.Holder(n.LockFile))
	}
	if err != nil {
		return err
	}
	defer unlock()
	if cleanupOnly {
		if !cleanup(false) {
			return ErrReported
		}
		return nil
	}
	if main() != 0 {
		return ErrReported
	}
	return nil
}

// LabSection is a demo's first section: it builds the lab (build: BuildLab
// with s, and what else the demo's lab has) and says what the wire is;
// false means the demo cannot go on.
func (n *Narrator) LabSection(names Names, s LabSpec, build func() error) bool {
	n.Section("1. The node: network namespaces")
	if err := build(); err != nil {
		n.Fail("%v", err)
		return false
	}
	n.OK("%s: bridge br0 is the switch and the gateway %s/%d", names.Prefix+"wire", s.Gateway, s.Subnet.Bits())
	return true
}
