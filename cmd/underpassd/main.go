// Command underpassd is the underpass node agent: it loads and attaches the
// eBPF datapath, applies /etc/underpass/underpass.yaml live, keeps the live
// service set from Kubernetes, collects dead endpoints and serves metrics.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/underpass-cni/underpass/internal/agent"
	"github.com/underpass-cni/underpass/internal/config"
)

// version is set at build time: -ldflags "-X main.version=v0.1.0".
var version = "dev"

const usage = `underpassd: the underpass node agent.

It loads the eBPF datapath into the bpffs pin directory (adopting maps a
previous run pinned, so pods keep working across restarts and upgrades),
attaches it to every parent NIC with registered endpoints and to the
configured uplinks, and keeps it in line with the config file, which is
reloaded live when it changes or on SIGHUP (an invalid file is rejected and
the previous config stays). SIGTERM/SIGINT stop the agent and leave the
datapath pinned and attached; --uninstall removes it.

Serves /metrics, /healthz and /readyz on metrics.listen (default
127.0.0.1:9775). Run it in the host network namespace, as root.

Usage:
  underpassd [--config FILE] [--log-level LEVEL]
  underpassd --uninstall [--config FILE]
  underpassd --version

Flags:
`

func main() {
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "underpassd: %v\n", err)
		os.Exit(1)
	}
}

func run() error {
	fs := flag.NewFlagSet("underpassd", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), usage)
		fs.PrintDefaults()
	}
	configPath := fs.String("config", config.DefaultPath, "agent config `file` (YAML)")
	uninstall := fs.Bool("uninstall", false, "detach every underpass program (parents, uplinks, endpoints), remove the pin directory and say what was removed")
	logLevel := fs.String("log-level", "", "debug, info, warn or error; overrides the config's logLevel")
	showVersion := fs.Bool("version", false, "print the version and exit")
	if err := fs.Parse(os.Args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q (see --help)", fs.Args())
	}
	if *showVersion {
		fmt.Println("underpassd", version)
		return nil
	}

	level := new(slog.LevelVar)
	fixed := *logLevel != ""
	if fixed {
		switch strings.ToLower(*logLevel) {
		case "debug", "info", "warn", "error":
			_ = level.UnmarshalText([]byte(*logLevel))
		default:
			return fmt.Errorf("--log-level %q: want debug, info, warn or error", *logLevel)
		}
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	slog.SetDefault(log)

	if *uninstall {
		return agent.Uninstall(*configPath, os.Stdout)
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	a, err := agent.New(agent.Options{
		ConfigPath: *configPath,
		Log:        log,
		Level:      level,
		LevelFixed: fixed,
		Loader:     loaderOptions(),
		Version:    version,
		Reload:     sighup(),
		Collectors: observability(ctx, log),
	})
	if err != nil {
		return err
	}
	return a.Run(ctx)
}

// sighup turns SIGHUP into reload requests; one pending is enough.
func sighup() <-chan struct{} {
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	reload := make(chan struct{}, 1)
	go func() {
		for range hup {
			select {
			case reload <- struct{}{}:
			default:
			}
		}
	}()
	return reload
}
