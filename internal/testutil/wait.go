package testutil

import (
	"bytes"
	"sync"
	"testing"
	"time"
)

// Must fails the test at once on err.
func Must(tb testing.TB, err error) {
	tb.Helper()
	if err != nil {
		tb.Fatal(err)
	}
}

// WaitFor polls cond every 20 ms until it holds, and fails the test, naming
// what it waited for, once timeout has passed.
func WaitFor(tb testing.TB, timeout time.Duration, what string, cond func() bool) {
	tb.Helper()
	WaitForEvery(tb, timeout, 20*time.Millisecond, what, cond)
}

// WaitForEvery is WaitFor polling every interval: for a cond that costs
// (an API list, a scrape).
func WaitForEvery(tb testing.TB, timeout, interval time.Duration, what string, cond func() bool) {
	tb.Helper()
	if !Poll(timeout, interval, cond) {
		tb.Fatalf("timed out after %s waiting for %s", timeout, what)
	}
}

// Poll polls cond every interval until it holds (true) or timeout has
// passed (false).
func Poll(timeout, interval time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(interval)
	}
	return true
}

// SyncBuffer is a bytes.Buffer that a process's output and a test may use
// at once.
type SyncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *SyncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *SyncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// Len is the number of bytes written so far.
func (s *SyncBuffer) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Len()
}
