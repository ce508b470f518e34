package testutil

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
	"syscall"
	"time"
)

// Proc is a long-running process of a test (etcd, kube-apiserver, the
// kubelet, containerd, underpassd...) in its own process group, logging to
// a file. It dies with the test binary (Pdeathsig).
type Proc struct {
	Name string // the binary's base name
	Log  string // the log file

	exit
	cmd  *exec.Cmd
	once sync.Once
}

// exit is how a child process of a test ended: done is closed once it has
// exited, err is then Wait's result.
type exit struct {
	done chan struct{}
	err  error
}

func newExit() exit { return exit{done: make(chan struct{})} }

// Done is closed when the process has exited; Err is then Wait's result.
func (e *exit) Done() <-chan struct{} { return e.done }

// Err is the process's exit error, valid once Done is closed.
func (e *exit) Err() error { return e.err }

// Exited reports whether the process has ended.
func (e *exit) Exited() bool { return Closed(e.done) }

// Closed reports, without waiting, whether ch is closed (a process's or a
// goroutine's done channel).
func Closed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// StartProc starts path with args, stdout and stderr to logFile.
//
// Pdeathsig fires when the forking *thread* exits, and Go ends a thread
// whose goroutine exits locked (netenv creates namespaces that way): forked
// from an unlocked thread, a process was killed whenever such a goroutine
// later ran on that thread (seen: the apiserver, about one run in two of a
// test that made namespaces after starting it). So the forking thread stays
// locked to one goroutine until the process has exited.
func StartProc(path, logFile string, args ...string) (*Proc, error) {
	log, err := os.Create(logFile)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(path, args...)
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Setpgid:   true,            // Stop signals the whole group
		Pdeathsig: syscall.SIGKILL, // no orphans if the test binary dies
	}
	p := &Proc{Name: filepath.Base(path), Log: logFile, exit: newExit(), cmd: cmd}
	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		p.err = cmd.Wait()
		log.Close()
		close(p.done)
	}()
	if err := <-started; err != nil {
		log.Close()
		return nil, fmt.Errorf("start %s: %w", path, err)
	}
	return p, nil
}

// Stop sends SIGTERM to the process group, SIGKILL after grace, and then
// SIGKILL to what is left of the group (children it started). Once only.
func (p *Proc) Stop(grace time.Duration) {
	p.once.Do(func() {
		pgid := p.cmd.Process.Pid
		_ = syscall.Kill(-pgid, syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(grace):
			_ = syscall.Kill(-pgid, syscall.SIGKILL)
			<-p.done
		}
		_ = syscall.Kill(-pgid, syscall.SIGKILL)
	})
}

// Tail is the end of the process's log, at most n bytes.
func (p *Proc) Tail(n int) string {
	data, _ := os.ReadFile(p.Log)
	if len(data) > n {
		data = data[len(data)-n:]
	}
	return string(data)
}
