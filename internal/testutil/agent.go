package testutil

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The harness the test tiers that run the real underpassd (test/agent,
// test/soak) and the demo (test/demo/cmd/demo) share: building the agent,
// running it with its output kept, reaching its HTTP endpoints inside the
// node's network namespace, waiting for /readyz and reading /metrics.

// BuildAgent builds underpassd to out as the agent tiers run it: with the
// race detector when UNDERPASS_RACE=1, with tags if given. The go tool's
// output goes to stderr. No testing.TB: TestMain calls it.
func BuildAgent(out string, tags ...string) error {
	args := []string{"build", "-o", out}
	if os.Getenv("UNDERPASS_RACE") == "1" {
		args = append(args, "-race") // the agent under the race detector
	}
	if len(tags) > 0 {
		args = append(args, "-tags", strings.Join(tags, ","))
	}
	args = append(args, "github.com/underpass-cni/underpass/cmd/underpassd")
	cmd := exec.Command("go", args...)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("build underpassd: %v", err)
	}
	return nil
}

// Agent is a running underpassd (started through nsenter, which execs it:
// the process is the agent itself) whose output is kept in Out.
type Agent struct {
	exit
	Cmd *exec.Cmd
	Out *SyncBuffer
}

// StartAgent starts cmd with its stdout and stderr in Out. When tb ends the
// agent is killed if still running and, if tb failed, its output is logged
// under name: all of it, or the last tailLines lines when tailLines > 0.
func StartAgent(tb testing.TB, name string, cmd *exec.Cmd, tailLines int) *Agent {
	tb.Helper()
	a := &Agent{exit: newExit(), Cmd: cmd, Out: &SyncBuffer{}}
	cmd.Stdout, cmd.Stderr = a.Out, a.Out
	if err := cmd.Start(); err != nil {
		tb.Fatalf("start underpassd: %v", err)
	}
	go func() {
		a.err = cmd.Wait()
		close(a.done)
	}()
	tb.Cleanup(func() {
		a.Kill()
		if !tb.Failed() {
			return
		}
		if tailLines > 0 {
			tb.Logf("%s log (last %d lines):\n%s", name, tailLines, TailLines(a.Out.String(), tailLines))
		} else {
			tb.Logf("%s log:\n%s", name, a.Out.String())
		}
	})
	return a
}

// Pid is the agent's pid.
func (a *Agent) Pid() int { return a.Cmd.Process.Pid }

// Kill SIGKILLs the agent, if still running, and waits for it.
func (a *Agent) Kill() {
	if a.Exited() {
		return
	}
	_ = a.Cmd.Process.Signal(syscall.SIGKILL)
	<-a.done
}

// Terminate sends SIGTERM and waits up to grace for the agent to exit; false
// means it is still running. Its exit status is Err.
func (a *Agent) Terminate(grace time.Duration) bool {
	_ = a.Cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-a.done:
		return true
	case <-time.After(grace):
		return false
	}
}

// WaitReady waits up to timeout for get("/readyz") to answer 200 and
// returns how long that took; it fails tb at once, with the agent's output,
// if the agent exits first.
func (a *Agent) WaitReady(tb testing.TB, get func(path string) (int, string, error), timeout time.Duration) time.Duration {
	tb.Helper()
	took, err := WaitReady(context.Background(), get, a.done, timeout, 20*time.Millisecond)
	if errors.Is(err, ErrExited) {
		tb.Fatalf("underpassd exited (%v) before it was ready:\n%s", a.err, a.Out.String())
	}
	if err != nil {
		tb.Fatalf("underpassd %v", err)
	}
	return took
}

// ErrExited is WaitReady's error for an agent that exited before it was
// ready.
var ErrExited = errors.New("exited before it was ready")

// WaitReady polls get("/readyz") every interval until it answers 200 and
// returns how long that took. It gives up with ErrExited once exited is
// closed, with ctx's error once ctx ends, and after timeout with an error
// that quotes the last answer.
func WaitReady(ctx context.Context, get func(path string) (int, string, error), exited <-chan struct{}, timeout, interval time.Duration) (time.Duration, error) {
	start := time.Now()
	var last string
	for time.Since(start) < timeout {
		select {
		case <-exited:
			return 0, ErrExited
		case <-ctx.Done():
			return 0, ctx.Err()
		default:
		}
		code, body, err := get("/readyz")
		if err == nil && code == http.StatusOK {
			return time.Since(start), nil
		}
		last = fmt.Sprint(code, " ", strings.TrimSpace(body), " ", err)
		time.Sleep(interval)
	}
	return 0, fmt.Errorf("not ready after %s (last /readyz: %s)", timeout, last)
}

// NetnsHTTPClient is an HTTP client whose sockets are made by do, which runs
// its argument inside a network namespace (netenv's and test/demo's NS.Do):
// it reaches an agent listening on that namespace's loopback. Keep-alives
// are off, so no connection outlives its request.
func NetnsHTTPClient(do func(func() error) error, timeout time.Duration) *http.Client {
	return &http.Client{
		Timeout: timeout,
		Transport: &http.Transport{
			DisableKeepAlives: true,
			DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				var c net.Conn
				err := do(func() error {
					var err error
					c, err = (&net.Dialer{}).DialContext(ctx, network, addr)
					return err
				})
				return c, err
			},
		},
	}
}

// HTTPGet fetches url with c and returns the status code and the body.
func HTTPGet(c *http.Client, url string) (int, string, error) {
	resp, err := c.Get(url)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

// SeriesValue finds one series in a Prometheus text exposition body: series
// is the name with its labels as exposed (`name{k="v"}`, or the bare name).
// found is false when no line has it; err is a value that does not parse.
func SeriesValue(body, series string) (v float64, found bool, err error) {
	sc := bufio.NewScanner(strings.NewReader(body))
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), series+" "); ok {
			v, err := strconv.ParseFloat(strings.TrimSpace(rest), 64)
			return v, true, err
		}
	}
	return 0, false, nil
}

// TailLines is the last n lines of s, after a line that counts the ones
// left out.
func TailLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = append([]string{fmt.Sprintf("… %d lines before", len(lines)-n)}, lines[len(lines)-n:]...)
	}
	return strings.Join(lines, "\n")
}
