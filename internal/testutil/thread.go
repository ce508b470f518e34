package testutil

import (
	"fmt"
	"runtime"

	"github.com/vishvananda/netns"
)

// OnOwnThread runs fn on a thread locked to a goroutine of its own, for
// work that moves the thread to another network namespace, and returns
// fn's error. The thread is put back in its namespace before it is
// unlocked. A thread left locked would die with its goroutine, but Go
// cannot end the process's main thread: that one would stay wedged, for
// the process's life, in the namespace fn left it in, and
// /proc/<pid>/ns/net would show that namespace (the agent's adopter then
// takes the test process for a container there, and the namespace
// outlives its deletion). When the way back fails, the thread stays
// locked.
func OnOwnThread(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			errc <- fmt.Errorf("this thread's netns: %w", err)
			return
		}
		defer orig.Close()
		defer func() {
			if netns.Set(orig) == nil {
				runtime.UnlockOSThread()
			}
		}()
		errc <- fn()
	}()
	return <-errc
}
