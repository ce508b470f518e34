package cni

import (
	"log/slog"
	"time"
)

// phases times the steps of one plugin call for the debug log
// (UNDERPASS_CNI_DEBUG=1): where a slow ADD spends its time.
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
	log.Debug(msg, append(p.attrs, slog.Duration("total", time.Since(p.start)))...)
}
