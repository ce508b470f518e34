// Command underpassctl inspects the underpass datapath on this node: status,
// endpoints, services and counters, read from the pinned maps, so it works
// while underpassd is down.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/underpass-cni/underpass/internal/ctl"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "underpassctl: %v\n", err)
		if errors.Is(err, ctl.ErrUsage) {
			os.Exit(2)
		}
		os.Exit(1)
	}
}

func run() error {
	// Ctrl-C ends `stats --watch` cleanly.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return ctl.Run(ctx, os.Args[1:], ctl.Env{Stdin: os.Stdin, Stdout: os.Stdout, Stderr: os.Stderr})
}
