package loader

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// Lock takes the datapath's writer lock: an flock on the pin directory,
// so nothing lives outside bpffs and the kernel drops the lock when its
// holder dies. The CNI plugin holds it around the read-modify-write steps
// of ADD, DEL and GC; the agent holds it to confirm and remove a dead
// endpoint (so it never acts on an attachment a DEL is half-way through)
// and to move endpoints to a re-created parent. Single map updates need no
// lock.
func (dp *Datapath) Lock() (unlock func(), err error) {
	fd, err := unix.Open(dp.Dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s to lock it: %w", dp.Dir, err)
	}
	for {
		err = unix.Flock(fd, unix.LOCK_EX)
		if !errors.Is(err, unix.EINTR) {
			break
		}
	}
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("lock %s: %w", dp.Dir, err)
	}
	return func() { unix.Close(fd) }, nil // closing the last fd releases the flock
}
