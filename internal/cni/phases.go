package cni

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// phases times the steps of one plugin call for the debug log
// (UNDERPASS_CNI_DEBUG=1): where a slow ADD spends its time. Beside each
// step's wall time it logs, for the whole call, the CPU time the process
// used and how long its threads waited for a CPU (schedstat run delay):
// wall time that is neither was spent blocked.
type phases struct {
	start, last time.Time
	attrs       []any
}

func newPhases() *phases {
	now := time.Now()
	return &phases{start: now, last: now}
}

// mark ends the step called name.
func (p *phases) mark(name string) {
	now := time.Now()
	p.attrs = append(p.attrs, slog.Duration(name, now.Sub(p.last)))
	p.last = now
}

func (p *phases) log(msg string) {
	if !log.Enabled(context.Background(), slog.LevelDebug) {
		return
	}
	attrs := append(p.attrs, slog.Duration("total", time.Since(p.start)))
	var ru unix.Rusage
	if unix.Getrusage(unix.RUSAGE_SELF, &ru) == nil {
		attrs = append(attrs, slog.Duration("cpu", time.Duration(ru.Utime.Nano()+ru.Stime.Nano())))
	}
	if d, ok := runDelay(); ok {
		attrs = append(attrs, slog.Duration("runqueue_wait", d))
	}
	log.Debug(msg, attrs...)
}

// runDelay sums the time this process's threads spent runnable but not
// running, since they started (/proc/self/task/*/schedstat, 2nd field).
func runDelay() (time.Duration, bool) {
	files, err := filepath.Glob("/proc/self/task/*/schedstat")
	if err != nil || len(files) == 0 {
		return 0, false
	}
	var sum time.Duration
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		fields := strings.Fields(string(b))
		if len(fields) < 2 {
			continue
		}
		ns, err := strconv.ParseInt(fields[1], 10, 64)
		if err != nil {
			continue
		}
		sum += time.Duration(ns)
	}
	return sum, true
}
