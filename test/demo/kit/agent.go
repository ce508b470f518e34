//go:build linux

package kit

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	"github.com/underpass-cni/underpass/internal/config"
	"github.com/underpass-cni/underpass/internal/testutil"
	"github.com/underpass-cni/underpass/test/netenv"
)

// WriteConfig writes an agent config atomically (as a ConfigMap update
// does), after checking it parses.
func WriteConfig(path, body string) error {
	if _, err := config.Parse([]byte(body)); err != nil {
		return fmt.Errorf("demo config does not parse: %w", err)
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(body), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// Agent is the demo's underpassd, running in the node netns.
type Agent struct {
	Cmd  *exec.Cmd
	Done chan struct{} // closed once it exited (and was reaped)
	Log  *os.File
	// HTTP reaches the agent's metrics.listen from inside the node netns.
	HTTP *http.Client
	addr string
}

// StartAgent runs bin/underpassd --config configPath in node, its output
// in logPath, and waits (30 s) for /readyz on metricsAddr; it returns how
// long that took. The agent has its own process group (Ctrl-C in the
// terminal reaches the demo only, which stops the agent in order) and dies
// with the demo (Pdeathsig; leftovers are swept by the next run anyway).
// The Agent is returned, for the cleanup, as soon as it started.
func StartAgent(ctx context.Context, node *netenv.NS, bin, configPath, logPath, metricsAddr string) (*Agent, time.Duration, error) {
	log, err := os.Create(logPath)
	if err != nil {
		return nil, 0, err
	}
	a := &Agent{Log: log, addr: metricsAddr}
	cmd := node.Command(context.Background(), filepath.Join(bin, "underpassd"), "--config", configPath)
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
	if err := StartFromLockedThread(cmd); err != nil {
		log.Close()
		return nil, 0, fmt.Errorf("start: %w", err)
	}
	a.Cmd = cmd
	a.Done = make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(a.Done)
	}()
	// HTTP from inside the node netns: the agent listens on the node's
	// loopback, which only sockets created in that netns reach.
	a.HTTP = testutil.NetnsHTTPClient(node.Do, 3*time.Second)
	took, err := testutil.WaitReady(ctx, a.Get, a.Done, 30*time.Second, 100*time.Millisecond)
	if errors.Is(err, testutil.ErrExited) {
		return a, 0, fmt.Errorf("exited during start-up (%s)", cmd.ProcessState)
	}
	return a, took, err
}

// Get fetches path from the agent's HTTP endpoint in the node netns.
func (a *Agent) Get(path string) (int, string, error) {
	return testutil.HTTPGet(a.HTTP, "http://"+a.addr+path)
}

// Pid is the agent's pid.
func (a *Agent) Pid() int { return a.Cmd.Process.Pid }

// Running says whether the agent has not exited yet.
func (a *Agent) Running() bool { return !testutil.Closed(a.Done) }

// UninstallAgent detaches the programs with the agent's own uninstall
// (bin/underpassd --uninstall), from inside the node netns (NSPath("node"))
// while the interfaces still exist. The config it writes to configPath
// names the demo's pin directory only, so it can never touch a real
// install's /sys/fs/bpf/underpass. It does nothing without pins, the node
// netns or the agent binary; else it notes the step and returns the
// uninstall's output and error.
func (n Names) UninstallAgent(r *Report, bin, configPath string) ([]byte, error) {
	nodePath := n.NSPath("node")
	agentBin := filepath.Join(bin, "underpassd")
	if !Exists(n.BPFFS) || !Exists(nodePath) || !Exists(agentBin) {
		return nil, nil
	}
	err := os.MkdirAll(n.StateDir, 0o755)
	if err == nil {
		err = os.WriteFile(configPath, []byte("bpffs: "+n.BPFFS+"\n"), 0o644)
	}
	var out []byte
	if err == nil {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		out, err = exec.CommandContext(ctx, "nsenter", "--net="+nodePath, "--", agentBin, "--uninstall", "--config", configPath).CombinedOutput()
		cancel()
	}
	r.Note(err, "underpassd --uninstall (detach the programs, remove %s)", n.BPFFS)
	return out, err
}
