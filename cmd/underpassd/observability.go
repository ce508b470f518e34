package main

import (
	"context"
	"log/slog"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/underpass-cni/underpass/internal/events"
	"github.com/underpass-cni/underpass/internal/loader"
	"github.com/underpass-cni/underpass/internal/metrics"
)

// observability is the agent's Collectors hook: once the datapath is
// loaded, its counters go to /metrics (read at scrape time) and its IP
// conflict events to the log until ctx ends.
func observability(ctx context.Context, log *slog.Logger) func(dp *loader.Objects) []prometheus.Collector {
	return func(dp *loader.Objects) []prometheus.Collector {
		if err := events.Start(ctx, &dp.Maps, events.Options{Log: log.With("component", "events")}); err != nil {
			// Counters still count conflicts; only the log lines are lost.
			log.Error("IP conflicts will not be logged", "error", err)
		}
		// The agent serves underpass_endpoints and underpass_live_services itself.
		return []prometheus.Collector{metrics.New(&dp.Maps, metrics.Options{SkipGauges: true, Log: log.With("component", "metrics")})}
	}
}
