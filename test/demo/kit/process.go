//go:build linux

package kit

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// StartFromLockedThread starts cmd from a thread that stays alive as long
// as the demo: Pdeathsig fires when the *thread* that forked the child
// exits, and Go ends threads whose goroutine exits while locked (as
// namespace helpers do).
func StartFromLockedThread(cmd *exec.Cmd) error {
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

// StopProcess sends SIGTERM, waits (5 s or grace), then SIGKILL. done, if
// not nil, is closed when the process was reaped (our own child).
func StopProcess(pid int, done <-chan struct{}, grace ...time.Duration) error {
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

// ProcName is the command name of pid ("process" if it is gone).
func ProcName(pid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
	if err != nil {
		return "process"
	}
	return strings.TrimSpace(string(b))
}
