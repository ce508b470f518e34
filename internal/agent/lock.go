package agent

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/underpass-cni/underpass/internal/flock"
)

// LockDir holds one lock file per pin directory: bpffs cannot hold regular
// files, so the lock lives in /run.
const LockDir = "/run/underpass"

func lockPath(bpffs string) string {
	sum := sha256.Sum256([]byte(filepath.Clean(bpffs)))
	return filepath.Join(LockDir, fmt.Sprintf("underpassd-%x.lock", sum[:8]))
}

// lock makes sure one agent owns a pin directory. The lock file goes when
// the agent stops (a kill -9 leaves it, unlocked, for the next start).
func lock(bpffs string) (func(), error) {
	// Root-only, like the pins.
	if err := os.MkdirAll(LockDir, 0o700); err != nil {
		return nil, fmt.Errorf("create %s: %w", LockDir, err)
	}
	unlock, err := flock.PidFile(lockPath(bpffs), 0o600)
	if errors.Is(err, flock.ErrHeld) {
		return nil, fmt.Errorf("another underpassd (pid %s) already runs on %s", flock.Holder(lockPath(bpffs)), bpffs)
	}
	return unlock, err
}

// running returns the pid of the agent holding bpffs, -1 when its pid is
// unknown, or 0.
func running(bpffs string) int {
	if held, pid := flock.Held(lockPath(bpffs)); held {
		return pid
	}
	return 0
}
