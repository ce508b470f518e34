//go:build linux

package kit

import (
	"context"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/underpass-cni/underpass/internal/testutil"
)

// This file is the harness of the demos' tests.

// Make runs `make target BIN=bin` in root with env added to the
// environment, as a user would, and returns its output; it fails the test
// if make fails.
func Make(t *testing.T, root, target, bin string, env ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	start := time.Now()
	cmd := exec.CommandContext(ctx, "make", "--no-print-directory", target, "BIN="+bin)
	cmd.Dir = root
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	t.Logf("make %s (%s):\n%s", target, time.Since(start).Round(100*time.Millisecond), out)
	if err != nil {
		t.Fatalf("make %s: %v", target, err)
	}
	return string(out)
}

// CheckOutput checks that out has every pattern of each list in order and
// no failed step.
func CheckOutput(t *testing.T, out string, lists ...[]string) {
	t.Helper()
	rest := out
	for _, list := range lists {
		for _, p := range list {
			loc := regexp.MustCompile(p).FindStringIndex(rest)
			if loc == nil {
				t.Errorf("the demo's output lacks (in order) %q", p)
				continue
			}
			rest = rest[loc[1]:]
		}
	}
	for l := range strings.SplitSeq(out, "\n") {
		if strings.Contains(l, "✗") {
			t.Errorf("failed step: %s", strings.TrimSpace(l))
		}
	}
	if t.Failed() {
		t.Logf("demo output:\n%s", out)
	}
}

// Running is a demo binary started by Start.
type Running struct {
	Cmd  *exec.Cmd
	Out  *testutil.SyncBuffer
	done chan error
}

// Start runs the demo binary demoBin with args in its own process group
// (as a shell does), with env as its environment (nil: the test's); the
// test's cleanup kills it.
func Start(t *testing.T, env []string, demoBin string, args ...string) *Running {
	t.Helper()
	d := &Running{Out: &testutil.SyncBuffer{}, done: make(chan error, 1)}
	d.Cmd = exec.Command(demoBin, args...)
	d.Cmd.Env = env
	d.Cmd.Stdout, d.Cmd.Stderr = d.Out, d.Out
	d.Cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := d.Cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { d.done <- d.Cmd.Wait() }()
	t.Cleanup(func() {
		_ = d.Cmd.Process.Kill()
		<-d.done
		d.done <- nil
	})
	return d
}

// WaitFor waits until the output contains s (at most a minute).
func (d *Running) WaitFor(t *testing.T, s string) {
	t.Helper()
	deadline := time.After(time.Minute)
	for !strings.Contains(d.Out.String(), s) {
		select {
		case err := <-d.done:
			d.done <- err
			t.Fatalf("the demo exited (%v) before printing %q:\n%s", err, s, d.Out.String())
		case <-deadline:
			t.Fatalf("no %q after a minute:\n%s", s, d.Out.String())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// Interrupt sends SIGINT to the demo's process group, as the terminal
// does on Ctrl-C (processes the demo started in groups of their own are
// left to it to stop in order).
func (d *Running) Interrupt(t *testing.T) {
	t.Helper()
	if err := syscall.Kill(-d.Cmd.Process.Pid, syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
}

// Kill kills the demo (SIGKILL), as a crash would.
func (d *Running) Kill(t *testing.T) {
	t.Helper()
	if err := d.Cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
}

// Wait waits (at most timeout) for the demo to exit and returns how.
func (d *Running) Wait(t *testing.T, timeout time.Duration) error {
	t.Helper()
	select {
	case err := <-d.done:
		d.done <- err
		return err
	case <-time.After(timeout):
		t.Fatalf("the demo did not exit within %s:\n%s", timeout, d.Out.String())
		return nil
	}
}

// Prepare fails the test unless every tool is installed (needs: the
// message, with a %s for the missing tool) and the demo has nothing left (leftovers empty: none runs,
// none crashed; hint says what to do about it). Whatever happens, the
// test's cleanup runs demoBin --bin bin --cleanup if something is left.
func Prepare(t *testing.T, needs, hint string, leftovers func() []string, demoBin, bin string, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf(needs+": %v", tool, err)
		}
	}
	if left := leftovers(); len(left) > 0 {
		t.Fatalf("%s: %v", hint, left)
	}
	t.Cleanup(func() {
		// Whatever happened, leave the machine clean for the next test.
		if len(leftovers()) > 0 {
			out, _ := exec.Command(demoBin, "--bin", bin, "--cleanup").CombinedOutput()
			t.Logf("cleanup after the test:\n%s", out)
		}
	})
}

// MakeDemo runs Make (target, env) as the subtest "make target" and check
// on its output, then ends the test if make did not build demoBin.
func MakeDemo(t *testing.T, root, target, bin, demoBin string, check func(t *testing.T, out string), env ...string) {
	t.Helper()
	t.Run("make "+target, func(t *testing.T) {
		check(t, Make(t, root, target, bin, env...))
	})
	if _, err := os.Stat(demoBin); err != nil {
		t.Fatalf("make %s did not build %s", target, demoBin)
	}
}

// Crash kills the demo (SIGKILL) once its output has at, waits for it to
// exit, and fails the test unless that left something behind (leftovers):
// the next run's recovery must have something to do.
func (d *Running) Crash(t *testing.T, at string, leftovers func() []string) {
	t.Helper()
	d.WaitFor(t, at)
	d.Kill(t)
	_ = d.Wait(t, time.Minute)
	if left := leftovers(); len(left) == 0 {
		t.Fatal("kill -9 left nothing behind: the recovery path is not exercised")
	} else {
		t.Logf("left by kill -9: %v", left)
	}
}
