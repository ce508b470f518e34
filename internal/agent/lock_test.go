package agent

import (
	"errors"
	"io/fs"
	"os"
	"strconv"
	"strings"
	"testing"
)

// One agent per pin directory; the lock file goes with a clean stop.
func TestLock(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("needs root: the lock lives in " + LockDir)
	}
	bpffs := t.TempDir() // any path: only its name is hashed
	unlock, err := lock(bpffs)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := lock(bpffs); err == nil || !strings.Contains(err.Error(), "already runs") || !strings.Contains(err.Error(), strconv.Itoa(os.Getpid())) {
		t.Fatalf("second lock: %v, want 'another underpassd (pid %d) already runs'", err, os.Getpid())
	}
	if pid := running(bpffs); pid != os.Getpid() {
		t.Fatalf("running = %d, want %d", pid, os.Getpid())
	}
	unlock()
	if _, err := os.Stat(lockPath(bpffs)); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("lock file left after unlock: %v", err)
	}
	if pid := running(bpffs); pid != 0 {
		t.Fatalf("running = %d after unlock, want 0", pid)
	}
	unlock, err = lock(bpffs)
	if err != nil {
		t.Fatalf("lock after unlock: %v", err)
	}
	unlock()
}
