//go:build linux

package main

import (
	"context"
	"os"
	"time"

	"github.com/underpass-cni/underpass/test/demo"
	"github.com/underpass-cni/underpass/test/demo/kit"
)

// cleanup removes everything the demo creates; graceful (the end of this
// run) also deletes the pods through CNI DEL and uninstalls the datapath
// with underpassd --uninstall first, as an operator would. It reports each
// step and returns false if anything is left.
func (d *demoRun) cleanup(graceful bool) bool {
	r := kit.NewReport(d.Out)
	for _, l := range d.listeners {
		l.Close()
	}
	d.listeners = nil
	if graceful {
		d.delPods(r)
	}
	d.stopProcesses(r)
	if graceful {
		if out, err := demo.Names.UninstallAgent(r, d.bin, uninstallPath); err != nil || os.Getenv("DEMO_VERBOSE") == "1" {
			d.Detail("%s", out)
		}
	}
	// The namespaces (pods first), and with them every link the demo
	// made, the macvlans and the veth pair included.
	for _, p := range d.pods {
		p.ns.Close()
	}
	demo.Names.DeleteNamespaces(r, d.node, d.wire)
	// What --uninstall did not remove (or a crashed run left).
	demo.Names.RemovePins(r)
	demo.Names.RemoveStateDir(r, "config, conflist, leases, log")
	kit.NothingLeft(r, leftoversButLock())
	return r.OK
}

// delPods deletes the pods through CNI DEL, as the runtime would.
func (d *demoRun) delPods(r *kit.Report) {
	if d.cni == nil || d.netconf == nil || d.node == nil {
		return
	}
	for _, p := range d.pods {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		err := d.node.Do(func() error { return d.cni.DelNetworkList(ctx, d.netconf, p.rt()) })
		cancel()
		r.Note(err, "CNI DEL %s", p.name)
	}
}

// stopProcesses stops this run's agent, and any process a crashed run left
// (found by the state directory on its command line).
func (d *demoRun) stopProcesses(r *kit.Report) {
	var pids []int
	agentPid := 0
	if d.agent != nil && d.agent.Running() {
		agentPid = d.agent.Pid()
		pids = append(pids, agentPid)
	}
	for _, pid := range demo.Names.Processes() {
		if pid != agentPid {
			pids = append(pids, pid)
		}
	}
	for _, pid := range pids {
		// Only this run's agent has a reaper to wait for; a crashed run's
		// leftover is signalled and polled.
		var done chan struct{}
		if pid == agentPid {
			done = d.agent.Done
		}
		name := kit.ProcName(pid)
		r.Note(kit.StopProcess(pid, done), "stop %s (pid %d)", name, pid)
	}
	if d.agent != nil {
		d.agent.Log.Close()
	}
}

// leftoversButLock is demo.Leftovers without the lock file this run holds.
func leftoversButLock() []string { return demo.Names.ButLock(demo.Leftovers()) }
