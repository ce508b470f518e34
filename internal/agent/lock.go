package agent

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// LockDir holds one lock file per pin directory. bpffs cannot hold regular
// files, so the lock lives in /run; flock is released by the kernel when the
// holder dies, so kill -9 never leaves a stale lock.
const LockDir = "/run/underpass"

func lockPath(bpffs string) string {
	sum := sha256.Sum256([]byte(filepath.Clean(bpffs)))
	return filepath.Join(LockDir, fmt.Sprintf("underpassd-%x.lock", sum[:8]))
}

// lock makes sure one agent owns a pin directory. The lock file goes when
// the agent stops (a kill -9 leaves it, unlocked, for the next start): a
// holder unlinks it before it unlocks, and whoever locks a file checks that
// it is still the one at the path, so two agents never hold two files.
func lock(bpffs string) (func(), error) {
	// Root-only, like the pins.
	if err := os.MkdirAll(LockDir, 0o700); err != nil {
		return nil, fmt.Errorf("create %s: %w", LockDir, err)
	}
	path := lockPath(bpffs)
	for {
		f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
		if err != nil {
			return nil, fmt.Errorf("open lock %s: %w", path, err)
		}
		if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
			f.Close()
			if errors.Is(err, unix.EWOULDBLOCK) {
				return nil, fmt.Errorf("another underpassd (pid %s) already runs on %s", holder(path), bpffs)
			}
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		var held, now unix.Stat_t
		if unix.Fstat(int(f.Fd()), &held) != nil || unix.Stat(path, &now) != nil || held.Ino != now.Ino || held.Dev != now.Dev {
			f.Close() // its holder removed it as we locked it: take the new one
			continue
		}
		_ = f.Truncate(0)
		_, _ = f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
		return func() {
			os.Remove(path)
			f.Close()
		}, nil
	}
}

// running returns the pid of the agent holding bpffs, or 0.
func running(bpffs string) int {
	path := lockPath(bpffs)
	f, err := os.Open(path)
	if err != nil {
		return 0
	}
	defer f.Close()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_SH|unix.LOCK_NB); err == nil {
		unix.Flock(int(f.Fd()), unix.LOCK_UN)
		return 0
	}
	pid, _ := strconv.Atoi(holder(path))
	if pid == 0 {
		pid = -1
	}
	return pid
}

func holder(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return "?"
	}
	return strings.TrimSpace(string(b))
}
