//go:build linux

package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/underpass-cni/underpass/internal/flock"
	"github.com/underpass-cni/underpass/test/demo"
)

// cleanup removes everything the demo creates; graceful (the end of this
// run) also deletes the pods through CNI DEL and uninstalls the datapath
// with underpassd --uninstall first, as an operator would. It reports each
// step and returns false if anything is left.
func (d *demoRun) cleanup(graceful bool) bool {
	r := &report{out: d.out, ok: true}
	for _, l := range d.listeners {
		l.Close()
	}
	d.listeners = nil
	if graceful {
		d.delPods(r)
	}
	d.stopProcesses(r)
	if graceful {
		d.uninstall(r)
	}
	d.deleteNamespaces(r)
	removeLeftovers(r)
	return r.ok
}

// report prints the steps of the cleanup, each passed or failed with its
// error; ok is false once one has failed.
type report struct {
	out io.Writer
	ok  bool
}

func (r *report) note(err error, format string, args ...any) {
	if err != nil {
		r.ok = false
		fmt.Fprintf(r.out, "  ✗ %s: %v\n", fmt.Sprintf(format, args...), err)
	} else {
		fmt.Fprintf(r.out, "  ✓ %s\n", fmt.Sprintf(format, args...))
	}
}

// delPods deletes the pods through CNI DEL, as the runtime would.
func (d *demoRun) delPods(r *report) {
	if d.cni == nil || d.netconf == nil || d.node == nil {
		return
	}
	for _, p := range d.pods {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		err := d.node.Do(func() error { return d.cni.DelNetworkList(ctx, d.netconf, p.rt()) })
		cancel()
		r.note(err, "CNI DEL %s", p.name)
	}
}

// stopProcesses stops this run's agent, and any process a crashed run left
// (found by the state directory on its command line).
func (d *demoRun) stopProcesses(r *report) {
	var pids []int
	if d.agent != nil && d.agent.Process != nil {
		select {
		case <-d.agentDone:
		default:
			pids = append(pids, d.agent.Process.Pid)
		}
	}
	for _, pid := range demo.Processes() {
		if len(pids) == 0 || pid != pids[0] {
			pids = append(pids, pid)
		}
	}
	for _, pid := range pids {
		name := procName(pid)
		r.note(stopProcess(pid, d.agentDone), "stop %s (pid %d)", name, pid)
	}
	if d.agentLog != nil {
		d.agentLog.Close()
	}
}

// uninstall detaches the programs with the agent's own uninstall, from
// inside the node netns, while the interfaces still exist. The config it
// reads names the demo's pin directory only, so it can never touch a real
// install's /sys/fs/bpf/underpass.
func (d *demoRun) uninstall(r *report) {
	nodePath := filepath.Join(demo.NetnsDir, demo.Prefix+"node")
	agentBin := filepath.Join(d.bin, "underpassd")
	if !exists(demo.BPFFS) || !exists(nodePath) || !exists(agentBin) {
		return
	}
	err := os.MkdirAll(demo.StateDir, 0o755)
	if err == nil {
		err = os.WriteFile(uninstallPath, []byte("bpffs: "+demo.BPFFS+"\n"), 0o644)
	}
	var out []byte
	if err == nil {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		out, err = exec.CommandContext(ctx, "nsenter", "--net="+nodePath, "--", agentBin, "--uninstall", "--config", uninstallPath).CombinedOutput()
		cancel()
	}
	r.note(err, "underpassd --uninstall (detach the programs, remove %s)", demo.BPFFS)
	if err != nil || os.Getenv("DEMO_VERBOSE") == "1" {
		d.detail("%s", out)
	}
}

// deleteNamespaces deletes the namespaces (pods first), and with them every
// link the demo made, the macvlans and the veth pair included.
func (d *demoRun) deleteNamespaces(r *report) {
	for _, p := range d.pods {
		p.ns.Close()
	}
	for _, n := range []*demo.NS{d.node, d.wire} {
		if n != nil {
			n.Close()
		}
	}
	names, err := demo.Namespaces()
	if err != nil {
		r.note(err, "list namespaces")
	}
	var nsErrs []error
	for _, n := range names {
		nsErrs = append(nsErrs, demo.DeleteNS(n))
	}
	if len(names) > 0 {
		r.note(errors.Join(nsErrs...), "delete namespaces %s", strings.Join(names, " "))
	}
}

// removeLeftovers removes what --uninstall did not (or a crashed run
// left), and checks that nothing is left.
func removeLeftovers(r *report) {
	if exists(demo.BPFFS) {
		r.note(os.RemoveAll(demo.BPFFS), "remove pins %s", demo.BPFFS)
	}
	if l := demo.AgentLockFile(); exists(l) {
		r.note(os.Remove(l), "remove the agent's lock file %s", l)
	}
	if exists(demo.StateDir) {
		r.note(os.RemoveAll(demo.StateDir), "remove %s (config, conflist, leases, log)", demo.StateDir)
	}
	if left := leftoversButLock(); len(left) > 0 {
		r.note(fmt.Errorf("%s", strings.Join(left, "; ")), "nothing left behind")
	} else {
		r.note(nil, "nothing left behind")
	}
}

// leftoversButLock is demo.Leftovers without the lock file this run holds.
func leftoversButLock() []string {
	var out []string
	for _, l := range demo.Leftovers() {
		if l != demo.LockFile {
			out = append(out, l)
		}
	}
	return out
}

func exists(p string) bool {
	_, err := os.Lstat(p)
	return err == nil
}

// stopProcess sends SIGTERM, waits up to 5 s, then SIGKILL. done, if not
// nil, is closed when the process was reaped (our own child).
func stopProcess(pid int, done <-chan struct{}) error {
	gone := func() bool {
		if done != nil {
			select {
			case <-done:
				return true
			default:
			}
		}
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			return true
		}
		// A zombie of someone else's is dead, just not reaped yet.
		if i := bytes.LastIndexByte(b, ')'); i > 0 && i+2 < len(b) && b[i+2] == 'Z' {
			return true
		}
		return false
	}
	if gone() {
		return nil
	}
	for _, sig := range []unix.Signal{unix.SIGTERM, unix.SIGKILL} {
		_ = unix.Kill(pid, sig)
		for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
			if gone() {
				return nil
			}
		}
	}
	return fmt.Errorf("still running after SIGKILL")
}

func procName(pid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
	if err != nil {
		return "process"
	}
	return strings.TrimSpace(string(b))
}

// takeLock makes sure one demo runs at a time; the lock file holds the pid.
func takeLock() (func(), error) {
	unlock, err := flock.PidFile(demo.LockFile, 0o644)
	if errors.Is(err, flock.ErrHeld) {
		return nil, fmt.Errorf("another demo (pid %s) is running: stop it with Ctrl-C first", flock.Holder(demo.LockFile))
	}
	return unlock, err
}
