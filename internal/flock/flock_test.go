package flock

import (
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

func TestPidFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "x.lock")
	unlock, err := PidFile(path, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	if held, pid := Held(path); !held || pid != os.Getpid() {
		t.Errorf("Held = %v, %d; want true, %d", held, pid, os.Getpid())
	}
	_, err = PidFile(path, 0o600)
	if !errors.Is(err, ErrHeld) {
		t.Errorf("second PidFile: %v, want ErrHeld", err)
	}
	if want := "(pid " + strconv.Itoa(os.Getpid()) + ")"; err == nil || !contains(err.Error(), want) {
		t.Errorf("second PidFile: %v, want it to name %s", err, want)
	}
	unlock()
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("lock file left after unlock: %v", err)
	}
	if held, _ := Held(path); held {
		t.Error("Held after unlock")
	}
}

func TestWaitBlocksUntilUnlocked(t *testing.T) {
	dir := t.TempDir()
	unlock, err := Wait(dir)
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan struct{})
	go func() {
		u, err := Wait(dir)
		if err == nil {
			u()
		}
		close(got)
	}()
	select {
	case <-got:
		t.Fatal("a second Wait took a held lock")
	case <-time.After(200 * time.Millisecond):
	}
	unlock()
	select {
	case <-got:
	case <-time.After(10 * time.Second):
		t.Fatal("the second Wait never got the lock after unlock")
	}
}

func contains(s, sub string) bool { return strings.Contains(s, sub) }
