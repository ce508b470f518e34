package testutil

import (
	"fmt"
	"runtime"

	"github.com/vishvananda/netns"
)

// LockThread locks the calling goroutine to its OS thread for work that
// moves the thread to another network namespace; restore (deferred) puts
// the thread back where it was and only then unlocks it. A thread left
// locked would die with its goroutine, but Go cannot end the process's
// main thread: that one stays wedged, for the process's life, in the
// namespace the work left it in, and /proc/<pid>/ns/net shows that
// namespace (the agent's adopter then takes the test process for a
// container there, and the namespace outlives its deletion). When the way
// back fails, the thread stays locked.
func LockThread() (restore func(), err error) {
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		return func() {}, fmt.Errorf("this thread's netns: %w", err)
	}
	return func() {
		if netns.Set(orig) == nil {
			runtime.UnlockOSThread()
		}
		orig.Close()
	}, nil
}
