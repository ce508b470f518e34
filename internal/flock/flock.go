// Package flock is underpass's one advisory-lock helper. flock(2) locks are
// released by the kernel when their holder dies, so a kill -9 never leaves
// a stale lock behind.
package flock

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// ErrHeld means that another process holds the lock.
var ErrHeld = errors.New("locked by another process")

// Wait locks path (a directory or an existing file, opened read-only)
// exclusively, waiting for the holder. Closing, through unlock, releases it.
func Wait(path string) (unlock func(), err error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s to lock it: %w", path, err)
	}
	for {
		err = unix.Flock(fd, unix.LOCK_EX)
		if !errors.Is(err, unix.EINTR) {
			break
		}
	}
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	return func() { unix.Close(fd) }, nil // closing the last fd releases the flock
}

// PidFile takes the lock file at path without waiting and writes this
// process's pid into it; unlock removes the file, then releases it. When
// another process holds it, the error wraps ErrHeld and names its pid. A
// holder unlinks the file before it unlocks, and whoever locks a file
// checks that it is still the one at path, so two processes never hold two
// files.
func PidFile(path string, perm os.FileMode) (unlock func(), err error) {
	for {
		f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, perm)
		if err != nil {
			return nil, fmt.Errorf("open lock %s: %w", path, err)
		}
		if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
			f.Close()
			if errors.Is(err, unix.EWOULDBLOCK) {
				return nil, fmt.Errorf("%w (pid %s)", ErrHeld, Holder(path))
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

// Held reports whether someone holds the lock file at path, and its pid
// (-1 when the file does not say).
func Held(path string) (bool, int) {
	f, err := os.Open(path)
	if err != nil {
		return false, 0
	}
	defer f.Close()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_SH|unix.LOCK_NB); err == nil {
		unix.Flock(int(f.Fd()), unix.LOCK_UN)
		return false, 0
	}
	pid, err := strconv.Atoi(Holder(path))
	if err != nil || pid == 0 {
		pid = -1
	}
	return true, pid
}

// Holder is the pid written in the lock file at path, "?" when unreadable.
func Holder(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return "?"
	}
	return strings.TrimSpace(string(b))
}
