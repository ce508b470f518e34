//go:build linux

package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
	"syscall"
	"time"

	"github.com/underpass-cni/underpass/internal/config"
	"github.com/underpass-cni/underpass/internal/testutil"
	"github.com/underpass-cni/underpass/test/demo"
)

// agentConfig is the demo's /etc/underpass/underpass.yaml.
func agentConfig(action string) string {
	return fmt.Sprintf(`# underpassd config of the demo (see the README, "Agent configuration", for every key)
hostReachability: true
staleServices:
  cidrs: [%s]
  action: %s
services:
  static: [%s]
  kubernetes: "false"
metrics: {listen: %q}
bpffs: %s
`, svcCIDR, action, liveVIP, demo.MetricsAddr, demo.BPFFS)
}

// writeConfig writes the agent config atomically (as a ConfigMap update
// does), after checking it parses.
func writeConfig(path, body string) error {
	if _, err := config.Parse([]byte(body)); err != nil {
		return fmt.Errorf("demo config does not parse: %w", err)
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(body), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// startAgent runs underpassd in the node netns and waits for /readyz.
func (d *demoRun) startAgent(ctx context.Context) error {
	if err := writeConfig(configPath, agentConfig("drop")); err != nil {
		return err
	}
	log, err := os.Create(agentLogPath)
	if err != nil {
		return err
	}
	d.agentLog = log
	cmd := d.node.Command(context.Background(), filepath.Join(d.bin, "underpassd"), "--config", configPath)
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{
		// Its own process group: Ctrl-C in the terminal reaches the demo
		// only, which stops the agent in order.
		Setpgid: true,
		// If the demo dies, so does the agent (leftovers are swept by the
		// next run anyway).
		Pdeathsig: syscall.SIGTERM,
	}
	if err := startFromLockedThread(cmd); err != nil {
		return fmt.Errorf("start: %w", err)
	}
	d.agent = cmd
	d.agentDone = make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(d.agentDone)
	}()

	// HTTP from inside the node netns: the agent listens on the node's
	// loopback, which only sockets created in that netns reach.
	d.httpClient = testutil.NetnsHTTPClient(d.node.Do, 3*time.Second)
	took, err := testutil.WaitReady(ctx, d.get, d.agentDone, 30*time.Second, 100*time.Millisecond)
	if errors.Is(err, testutil.ErrExited) {
		return fmt.Errorf("exited during start-up (%s)", d.agent.ProcessState)
	}
	if err != nil {
		return err
	}
	d.ok("underpassd (pid %d) loaded the datapath, pinned in %s, ready after %s", d.agent.Process.Pid, demo.BPFFS, took.Round(10*time.Millisecond))
	d.detail("config %s: services.static [%s], staleServices.cidrs [%s], action drop", configPath, liveVIP, svcCIDR)
	return nil
}

// startFromLockedThread starts cmd from a thread that stays alive as long
// as the demo: Pdeathsig fires when the *thread* that forked the child
// exits, and Go ends threads whose goroutine exits while locked (as
// namespace helpers do).
func startFromLockedThread(cmd *exec.Cmd) error {
	starterOnce.Do(func() {
		starter = make(chan startReq)
		go func() {
			runtime.LockOSThread() // for the program's lifetime
			for r := range starter {
				r.err <- r.cmd.Start()
			}
		}()
	})
	r := startReq{cmd: cmd, err: make(chan error, 1)}
	starter <- r
	return <-r.err
}

type startReq struct {
	cmd *exec.Cmd
	err chan error
}

var (
	starterOnce sync.Once
	starter     chan startReq
)

// get fetches path from the agent's HTTP endpoint in the node netns.
func (d *demoRun) get(path string) (int, string, error) {
	return testutil.HTTPGet(d.httpClient, "http://"+demo.MetricsAddr+path)
}
