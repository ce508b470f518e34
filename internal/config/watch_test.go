package config

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/underpass-cni/underpass/internal/attach"
)

type watchEvent struct {
	cfg     *Config
	trigger string
	err     error
}

// startWatch runs Watch on path with a short interval and returns its events.
func startWatch(t *testing.T, path string) <-chan watchEvent {
	t.Helper()
	return startWatchReload(t, path, 5*time.Millisecond, nil)
}

func startWatchReload(t *testing.T, path string, interval time.Duration, reload <-chan struct{}) <-chan watchEvent {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	events := make(chan watchEvent, 16)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		Watch(ctx, path, interval, reload,
			func(c *Config, trigger string) { events <- watchEvent{cfg: c, trigger: trigger} },
			func(err error) { events <- watchEvent{err: err} })
	}()
	t.Cleanup(func() {
		cancel()
		wg.Wait() // Watch must return once ctx is done
	})
	return events
}

func next(t *testing.T, events <-chan watchEvent) watchEvent {
	t.Helper()
	select {
	case ev := <-events:
		return ev
	case <-time.After(5 * time.Second):
		t.Fatal("no event from Watch within 5s")
		return watchEvent{}
	}
}

func expectQuiet(t *testing.T, events <-chan watchEvent) {
	t.Helper()
	select {
	case ev := <-events:
		t.Fatalf("unexpected event: cfg %+v, err %v", ev.cfg, ev.err)
	case <-time.After(100 * time.Millisecond):
	}
}

// writeAtomic replaces path the way editors and config tools do, so the
// watcher never sees a half-written file in this test.
func writeAtomic(t *testing.T, path, content string) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

func TestWatch(t *testing.T) {
	path := filepath.Join(t.TempDir(), "underpass.yaml")
	writeAtomic(t, path, "xdp: native\n")
	events := startWatch(t, path)

	// The first stable state is reported.
	if ev := next(t, events); ev.err != nil || ev.cfg.XDPMode() != attach.XDPNative {
		t.Fatalf("initial: %+v", ev)
	}
	expectQuiet(t, events)

	// valid -> invalid: an error naming the path and the key; no config.
	writeAtomic(t, path, "xdp: fast\n")
	if ev := next(t, events); ev.err == nil || !strings.Contains(ev.err.Error(), path) || !strings.Contains(ev.err.Error(), `xdp: "fast"`) {
		t.Fatalf("invalid: %+v", ev)
	}
	expectQuiet(t, events) // an unchanged bad file is reported once, not every poll

	// invalid -> valid.
	writeAtomic(t, path, "xdp: generic\n")
	if ev := next(t, events); ev.err != nil || ev.cfg.XDPMode() != attach.XDPGeneric {
		t.Fatalf("valid again: %+v", ev)
	}

	// Rewriting the same content (new mtime, new inode) is not a change.
	writeAtomic(t, path, "xdp: generic\n")
	expectQuiet(t, events)

	// In-place rewrite with the same size: only the hash can tell.
	if err := os.WriteFile(path, []byte("xdp: generik\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if ev := next(t, events); ev.err == nil || !strings.Contains(ev.err.Error(), "generik") {
		t.Fatalf("same-size rewrite: %+v", ev)
	}

	// A vanished file is an error (the caller keeps its config), and its
	// return is a change.
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if ev := next(t, events); ev.err == nil || !errors.Is(ev.err, os.ErrNotExist) {
		t.Fatalf("removed: %+v", ev)
	}
	writeAtomic(t, path, "xdp: off\n")
	if ev := next(t, events); ev.err != nil || ev.cfg.XDPMode() != attach.XDPOff {
		t.Fatalf("recreated: %+v", ev)
	}
}

// TestWatchConfigMap mimics kubelet's atomic writer: the file is a symlink
// into ..data, itself a symlink to a timestamped directory that is swapped.
func TestWatchConfigMap(t *testing.T) {
	dir := t.TempDir()
	version := func(name, content string) {
		t.Helper()
		if err := os.Mkdir(filepath.Join(dir, name), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, name, "underpass.yaml"), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		tmp := filepath.Join(dir, "..data_tmp")
		if err := os.Symlink(name, tmp); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, filepath.Join(dir, "..data")); err != nil {
			t.Fatal(err)
		}
	}
	version("..v1", "logLevel: debug\n")
	path := filepath.Join(dir, "underpass.yaml")
	if err := os.Symlink("..data/underpass.yaml", path); err != nil {
		t.Fatal(err)
	}

	events := startWatch(t, path)
	if ev := next(t, events); ev.err != nil || ev.cfg.LogLevel != "debug" {
		t.Fatalf("initial: %+v", ev)
	}
	version("..v2", "logLevel: warn\n")
	if ev := next(t, events); ev.err != nil || ev.cfg.LogLevel != "warn" {
		t.Fatalf("after swap: %+v", ev)
	}
}

// TestWatchStopsAndNilCallbacks checks that nil callbacks are allowed and that
// Watch returns when its context ends.
func TestWatchStopsAndNilCallbacks(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	done := make(chan struct{})
	go func() {
		Watch(ctx, filepath.Join(t.TempDir(), "missing.yaml"), 0, nil, nil, nil)
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Watch did not return after its context ended")
	}
}

// SIGHUP: the file is re-read and reported even when unchanged, never while
// it is half-written, and a file put back after a SIGHUP is noticed.
func TestWatchReload(t *testing.T) {
	path := filepath.Join(t.TempDir(), "underpass.yaml")
	a := "logLevel: warn\nstaleServices: {action: drop}\n"
	b := "logLevel: debug\nstaleServices: {action: reject}\n"
	writeAtomic(t, path, a)
	reload := make(chan struct{})
	// A long interval, so that the half-written file below is caught
	// between two polls.
	events := startWatchReload(t, path, 300*time.Millisecond, reload)
	if ev := next(t, events); ev.err != nil || ev.cfg.LogLevel != "warn" || ev.trigger != "file changed" {
		t.Fatalf("first report: %+v", ev)
	}

	// Unchanged file: SIGHUP reports it again.
	reload <- struct{}{}
	if ev := next(t, events); ev.err != nil || ev.cfg.LogLevel != "warn" || ev.trigger != "SIGHUP" {
		t.Fatalf("SIGHUP on an unchanged file: %+v", ev)
	}

	// Half-written when the SIGHUP comes, complete right after: only the
	// complete file is reported.
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_TRUNC, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteString(b[:len("logLevel: debug\n")]); err != nil {
		t.Fatal(err)
	}
	reload <- struct{}{}
	time.Sleep(20 * time.Millisecond)
	if _, err := f.WriteString(b[len("logLevel: debug\n"):]); err != nil {
		t.Fatal(err)
	}
	f.Close()
	ev := next(t, events)
	if ev.err != nil || ev.cfg.StaleServices.Action != "reject" {
		t.Fatalf("after a SIGHUP during a rewrite: %+v (the half-written file was applied)", ev)
	}

	// Put back after the SIGHUP: the watcher's memory is what the SIGHUP
	// reported, so the old content is a change.
	writeAtomic(t, path, a)
	if ev := next(t, events); ev.err != nil || ev.cfg.LogLevel != "warn" || ev.trigger != "file changed" {
		t.Fatalf("file put back after a SIGHUP: %+v", ev)
	}
	expectQuiet(t, events)
}
