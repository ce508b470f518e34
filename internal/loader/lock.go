package loader

import "github.com/underpass-cni/underpass/internal/flock"

// Lock takes the datapath's writer lock: an flock on the pin directory,
// so nothing lives outside bpffs and the kernel drops the lock when its
// holder dies. The CNI plugin holds it around the read-modify-write steps
// of ADD, DEL and GC; the agent holds it to confirm and remove a dead
// endpoint (so it never acts on an attachment a DEL is half-way through)
// and to move endpoints to a re-created parent. Single map updates need no
// lock.
func (dp *Objects) Lock() (unlock func(), err error) {
	return flock.Wait(dp.Dir)
}
