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
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	dd "github.com/underpass-cni/underpass/test/demo/docker"
	"github.com/underpass-cni/underpass/test/netenv"
)

// cleanup removes everything the demo creates; graceful (the end of this
// run) first removes the containers and uninstalls the datapath as an
// operator would. It reports each step and returns false if anything is
// left.
func (d *demoRun) cleanup(graceful bool) bool {
	r := &report{out: d.out, ok: true}
	if graceful && len(d.containers) > 0 && d.dockerd != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		out, err := d.docker(ctx, "ps", "-aq")
		if err == nil && out != "" {
			_, err = d.docker(ctx, append([]string{"rm", "-f"}, strings.Fields(out)...)...)
			r.note(err, "docker rm -f (the containers left)")
		}
		cancel()
	}
	// The agent first (it follows dockerd), then dockerd: SIGTERM stops
	// its containers, containerd and shims, and unmounts.
	if d.agent != nil {
		r.note(stopProcess(d.agent.Process.Pid, d.agentDone), "stop underpassd (pid %d)", d.agent.Process.Pid)
	}
	if d.dockerd != nil {
		r.note(stopProcess(d.dockerd.Process.Pid, d.dockerdDone, 30*time.Second), "stop dockerd (pid %d; it stops containerd and the shims)", d.dockerd.Process.Pid)
	}
	// What a crash left: dockerd first (SIGTERM: it stops its
	// containers), containerd, the shims; then the containers' own
	// processes, with SIGKILL (a container's init ignores SIGTERM).
	for _, pid := range dd.Processes() {
		name := procName(pid)
		r.note(stopProcess(pid, nil), "stop %s (pid %d)", name, pid)
	}
	for _, pid := range dd.ContainerProcesses() {
		name := procName(pid)
		_ = unix.Kill(pid, unix.SIGKILL)
		r.note(stopProcess(pid, nil), "kill %s (pid %d, in a container's cgroup)", name, pid)
	}
	// Cgroups of containers a crash left (with their state directory,
	// which names them): empty once their processes are gone.
	if cgs := dd.Cgroups(); len(cgs) > 0 {
		var errs []error
		for _, cg := range cgs {
			var err error
			for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(50 * time.Millisecond) {
				if err = os.Remove(cg); err == nil || errors.Is(err, os.ErrNotExist) || time.Now().After(deadline) {
					break
				}
			}
			if err != nil && !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, err)
			}
		}
		r.note(errors.Join(errs...), "remove %d cgroups of the containers", len(cgs))
	}
	for _, f := range []*os.File{d.agentLog, d.dockerLog} {
		if f != nil {
			f.Close()
		}
	}
	if graceful {
		d.uninstall(r)
	}
	if d.httpClient != nil {
		d.httpClient.CloseIdleConnections()
	}
	for _, n := range []*netenv.NS{d.node, d.wire} {
		if n != nil {
			n.Close()
		}
	}
	names, err := dd.Namespaces()
	if err != nil {
		r.note(err, "list namespaces")
	}
	var nsErrs []error
	for _, n := range names {
		nsErrs = append(nsErrs, netenv.DeleteNSPath(filepath.Join(dd.NetnsDir, n)))
	}
	if len(names) > 0 {
		r.note(errors.Join(nsErrs...), "delete namespaces %s", strings.Join(names, " "))
	}
	if m := dd.Mounts(); len(m) > 0 {
		var errs []error
		for _, p := range m {
			if err := unix.Unmount(p, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
				errs = append(errs, fmt.Errorf("%s: %w", p, err))
			}
		}
		r.note(errors.Join(errs...), "unmount %d mounts left below %s", len(m), dd.StateDir)
	}
	if exists(dd.BPFFS) {
		r.note(os.RemoveAll(dd.BPFFS), "remove pins %s", dd.BPFFS)
	}
	if l := dd.AgentLockFile(); exists(l) {
		r.note(os.Remove(l), "remove the agent's lock file %s", l)
	}
	if exists(dd.KeyMarker) && exists(dd.TrustKey) {
		r.note(os.Remove(dd.TrustKey), "remove %s (dockerd wrote it)", dd.TrustKey)
	}
	if exists(dd.StateDir) {
		r.note(os.RemoveAll(dd.StateDir), "remove %s (dockerd's roots, config, logs)", dd.StateDir)
	}
	if left := leftoversButLock(); len(left) > 0 {
		r.note(fmt.Errorf("%s", strings.Join(left, "; ")), "nothing left behind")
	} else {
		r.note(nil, "nothing left behind")
	}
	return r.ok
}

// uninstall detaches the programs with the agent's own uninstall, from
// inside the node netns, while eth0 still exists; its config names the
// demo's pin directory only.
func (d *demoRun) uninstall(r *report) {
	nodePath := filepath.Join(dd.NetnsDir, dd.Prefix+"node")
	agentBin := filepath.Join(d.bin, "underpassd")
	if !exists(dd.BPFFS) || !exists(nodePath) || !exists(agentBin) || !exists(dd.StateDir) {
		return
	}
	err := os.WriteFile(uninstallPath, []byte("bpffs: "+dd.BPFFS+"\n"), 0o644)
	var out []byte
	if err == nil {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		out, err = exec.CommandContext(ctx, "nsenter", "--net="+nodePath, "--", agentBin, "--uninstall", "--config", uninstallPath).CombinedOutput()
		cancel()
	}
	r.note(err, "underpassd --uninstall (detach the programs, remove %s)", dd.BPFFS)
	if err != nil {
		d.detail("%s", out)
	}
}

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

func leftoversButLock() []string {
	var out []string
	for _, l := range dd.Leftovers() {
		if l != dd.LockFile {
			out = append(out, l)
		}
	}
	return out
}

func exists(p string) bool {
	_, err := os.Lstat(p)
	return err == nil
}

// stopProcess sends SIGTERM, waits (5 s or grace), then SIGKILL. done, if
// not nil, is closed when the process was reaped (our own child).
func stopProcess(pid int, done <-chan struct{}, grace ...time.Duration) error {
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
		if i := bytes.LastIndexByte(b, ')'); i > 0 && i+2 < len(b) && b[i+2] == 'Z' {
			return true
		}
		return false
	}
	wait := 5 * time.Second
	if len(grace) > 0 {
		wait = grace[0]
	}
	for _, sig := range []syscall.Signal{unix.SIGTERM, unix.SIGKILL} {
		if gone() {
			return nil
		}
		_ = unix.Kill(pid, sig)
		for deadline := time.Now().Add(wait); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
			if gone() {
				return nil
			}
		}
		wait = 5 * time.Second
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
