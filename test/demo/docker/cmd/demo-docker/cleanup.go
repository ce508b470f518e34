//go:build linux

package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	dd "github.com/underpass-cni/underpass/test/demo/docker"
	"github.com/underpass-cni/underpass/test/demo/kit"
)

// cleanup removes everything the demo creates; graceful (the end of this
// run) first removes the containers and uninstalls the datapath as an
// operator would. It reports each step and returns false if anything is
// left.
func (d *demoRun) cleanup(graceful bool) bool {
	r := kit.NewReport(d.Out)
	if graceful && len(d.containers) > 0 && d.dockerd != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		out, err := d.docker(ctx, "ps", "-aq")
		if err == nil && out != "" {
			_, err = d.docker(ctx, append([]string{"rm", "-f"}, strings.Fields(out)...)...)
			r.Note(err, "docker rm -f (the containers left)")
		}
		cancel()
	}
	// The agent first (it follows dockerd), then dockerd: SIGTERM stops
	// its containers, containerd and shims, and unmounts.
	if d.agent != nil {
		r.Note(kit.StopProcess(d.agent.Pid(), d.agent.Done), "stop underpassd (pid %d)", d.agent.Pid())
	}
	if d.dockerd != nil {
		r.Note(kit.StopProcess(d.dockerd.Process.Pid, d.dockerdDone, 30*time.Second), "stop dockerd (pid %d; it stops containerd and the shims)", d.dockerd.Process.Pid)
	}
	// What a crash left: dockerd first (SIGTERM: it stops its
	// containers), containerd, the shims; then the containers' own
	// processes, with SIGKILL (a container's init ignores SIGTERM).
	for _, pid := range dd.Processes() {
		name := kit.ProcName(pid)
		r.Note(kit.StopProcess(pid, nil), "stop %s (pid %d)", name, pid)
	}
	for _, pid := range dd.ContainerProcesses() {
		name := kit.ProcName(pid)
		_ = unix.Kill(pid, unix.SIGKILL)
		r.Note(kit.StopProcess(pid, nil), "kill %s (pid %d, in a container's cgroup)", name, pid)
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
		r.Note(errors.Join(errs...), "remove %d cgroups of the containers", len(cgs))
	}
	if d.agent != nil {
		d.agent.Log.Close()
	}
	if d.dockerLog != nil {
		d.dockerLog.Close()
	}
	// Detach the programs with the agent's own uninstall while eth0
	// still exists (its state directory holds the config it reads).
	if graceful && kit.Exists(dd.StateDir) {
		if out, err := dd.Names.UninstallAgent(r, d.bin, uninstallPath); err != nil {
			d.Detail("%s", out)
		}
	}
	if d.agent != nil {
		d.agent.HTTP.CloseIdleConnections()
	}
	dd.Names.DeleteNamespaces(r, d.node, d.wire)
	if m := dd.Mounts(); len(m) > 0 {
		var errs []error
		for _, p := range m {
			if err := unix.Unmount(p, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
				errs = append(errs, fmt.Errorf("%s: %w", p, err))
			}
		}
		r.Note(errors.Join(errs...), "unmount %d mounts left below %s", len(m), dd.StateDir)
	}
	dd.Names.RemovePins(r)
	if kit.Exists(dd.KeyMarker) && kit.Exists(dd.TrustKey) {
		r.Note(os.Remove(dd.TrustKey), "remove %s (dockerd wrote it)", dd.TrustKey)
	}
	dd.Names.RemoveStateDir(r, "dockerd's roots, config, logs")
	kit.NothingLeft(r, leftoversButLock())
	return r.OK
}

// leftoversButLock is dd.Leftovers without the lock file this run holds.
func leftoversButLock() []string { return dd.Names.ButLock(dd.Leftovers()) }
