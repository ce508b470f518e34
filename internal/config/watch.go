package config

import (
	"context"
	"crypto/sha256"
	"fmt"
	"time"
)

// DefaultWatchInterval is how often Watch polls when given no interval.
const DefaultWatchInterval = 500 * time.Millisecond

// Watch polls the config file at path until ctx is done and reports each new
// state once: onChange with a parsed, valid config, or onError with why the file
// could not be read or parsed (the caller keeps running its old config). Either
// callback may be nil. Callbacks run on Watch's goroutine, one at a time.
//
// The path is opened afresh on every poll, following symlinks, because a
// mounted ConfigMap is updated by swapping a symlink, not by writing the file.
// The content is hashed each time instead of trusting mtime and size: file
// timestamps tick coarsely (a jiffy), so two quick same-size writes can share
// both, and a config file is small enough to read every poll.
//
// A state is reported only after two consecutive polls see it, so a file
// caught halfway through a non-atomic rewrite (truncated, or empty, which
// would parse as the defaults) is never applied. Reports thus lag a change by
// one to two intervals.
//
// The first stable state is reported too, so a change made between the
// caller's Load and the start of Watch is never lost; a caller that already
// applied that config can compare with reflect.DeepEqual (equal files parse
// to deeply equal configs). interval <= 0 means DefaultWatchInterval.
//
// A receive on reload (SIGHUP) makes Watch forget what it reported and
// read the file again: the state it finds is reported, changed or not,
// once it has held still for an interval, with trigger "SIGHUP". Going through the same stability
// check is why a SIGHUP never applies a half-written file, and going through
// the same memory is why a file put back after a SIGHUP is noticed.
func Watch(ctx context.Context, path string, interval time.Duration, reload <-chan struct{}, onChange func(c *Config, trigger string), onError func(error)) {
	if interval <= 0 {
		interval = DefaultWatchInterval
	}
	var pending, reported string
	trigger := "file changed"
	poll := func() {
		data, err := readFile(path)
		var state string
		if err != nil {
			state = "error: " + err.Error()
		} else {
			state = fmt.Sprintf("sha256:%x", sha256.Sum256(data))
		}
		if state != pending {
			pending = state // wait for the next poll to confirm it settled
			return
		}
		why := trigger
		if state == reported {
			return
		}
		reported = state
		trigger = "file changed"
		if err == nil {
			var c *Config
			if c, err = Parse(data); err == nil {
				if onChange != nil {
					onChange(c, why)
				}
				return
			}
			err = fmt.Errorf("config %s: %w", path, err)
		}
		if onError != nil {
			onError(err)
		}
	}

	t := time.NewTicker(interval)
	defer t.Stop()
	poll()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			poll()
		case <-reload:
			// A fresh stability check: this read, and the next poll one
			// interval from now confirms it (two reads back to back would
			// both see a writer that paused half-way).
			pending, reported, trigger = "", "", "SIGHUP"
			poll()
			t.Reset(interval)
		}
	}
}
