// Package ctl is underpassctl: it reads the pinned datapath directly (maps,
// links, the interfaces they are attached to), so it answers while
// underpassd is down, restarting or stuck, which is when it is needed most.
// Commands write to the writers they are given, so tests run them in-process.
package ctl

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/underpass-cni/underpass/internal/loader"
)

// ErrUsage marks a command line that could not be understood; main exits
// with status 2 for it, as flag does.
var ErrUsage = errors.New("usage")

const usage = `underpassctl: inspect the underpass datapath on this node.

It reads the pinned maps and links in the bpffs directly: it works while
underpassd is down. Run it as root in the host network namespace.

Usage:
  underpassctl [flags] status      datapath, attachments, XDP, kernel features
  underpassctl [flags] endpoints   registered endpoints (pods)
  underpassctl [flags] services    live service IPs, service and host CIDRs
  underpassctl [flags] stats       per-endpoint counters
  underpassctl [flags] stats --watch [--interval 1s]
                                   live view with rates; Ctrl-C to exit
  underpassctl [flags] attach --netns <path|pid> [--ifname eth0] [--name N]
                                   serve a macvlan/ipvlan slave no CNI call made
                                   (ip netns, LXC, systemd-nspawn) as an endpoint
  underpassctl [flags] detach --netns <path|pid> [--ifname eth0]
  underpassctl oci-hook [--config /etc/underpass/underpass.yaml] [--dad-wait 3s]
                                   OCI runtime hook (Podman hooks.d, createRuntime):
                                   registers a container's slaves on adopt.parents
                                   before it runs; the OCI state on stdin; the
                                   datapath is the config's bpffs (not --bpffs)

Flags (before or after the command):
`

// Env is what a command works with: injected so tests capture the output.
type Env struct {
	Stdin          io.Reader // oci-hook's container state
	Stdout, Stderr io.Writer
}

// options are the flags every command takes.
type options struct {
	bpffs  string
	output string
}

type command struct {
	name  string
	flags func(*flag.FlagSet) // command-only flags
	run   func(ctx context.Context, env Env, o *options, dp *loader.Objects) error
	// noOpen: run opens the datapath itself, if it needs it (dp is nil).
	noOpen bool
}

func commands() []*command {
	sf := &statsFlagValues{}
	af := &attachFlags{}
	hf := &hookFlags{}
	return []*command{
		{name: "status", run: runStatus},
		{name: "endpoints", run: runEndpoints},
		{name: "services", run: runServices},
		{name: "stats", flags: sf.register, run: func(ctx context.Context, env Env, o *options, dp *loader.Objects) error {
			return runStats(ctx, env, o, dp, sf)
		}},
		{name: "attach", flags: af.register(true), run: func(ctx context.Context, env Env, o *options, dp *loader.Objects) error {
			return runAttach(ctx, env, o, dp, af)
		}},
		{name: "detach", flags: af.register(false), run: func(ctx context.Context, env Env, o *options, dp *loader.Objects) error {
			return runDetach(ctx, env, o, dp, af)
		}},
		{name: "oci-hook", flags: hf.register, noOpen: true, run: func(ctx context.Context, env Env, o *options, _ *loader.Objects) error {
			return runOCIHook(ctx, env, o, hf)
		}},
	}
}

// Run runs underpassctl with args (without the program name).
func Run(ctx context.Context, args []string, env Env) error {
	o := &options{bpffs: loader.DefaultBPFFS, output: "table"}
	global := flag.NewFlagSet("underpassctl", flag.ContinueOnError)
	global.SetOutput(env.Stderr)
	commonFlags(global, o)
	global.Usage = func() {
		fmt.Fprint(env.Stderr, usage)
		global.PrintDefaults()
	}
	if err := global.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return fmt.Errorf("%w: %w", ErrUsage, err)
	}
	if global.NArg() == 0 {
		global.Usage()
		return fmt.Errorf("%w: no command given", ErrUsage)
	}
	name := global.Arg(0)
	if name == "help" {
		global.SetOutput(env.Stdout)
		fmt.Fprint(env.Stdout, usage)
		global.PrintDefaults()
		return nil
	}
	var cmd *command
	for _, c := range commands() {
		if c.name == name {
			cmd = c
		}
	}
	if cmd == nil {
		return fmt.Errorf("%w: unknown command %q (status, endpoints, services, stats, attach, detach, oci-hook)", ErrUsage, name)
	}

	// The command's own flag set knows the common flags too, so both
	// `underpassctl -o json stats` and `underpassctl stats -o json` work.
	fs := flag.NewFlagSet("underpassctl "+name, flag.ContinueOnError)
	fs.SetOutput(env.Stderr)
	commonFlags(fs, o)
	if cmd.flags != nil {
		cmd.flags(fs)
	}
	if err := fs.Parse(global.Args()[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return fmt.Errorf("%w: %w", ErrUsage, err)
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("%w: %s takes no arguments, got %q", ErrUsage, name, fs.Args())
	}
	if o.output != "table" && o.output != "json" {
		return fmt.Errorf("%w: -o %q: want table or json", ErrUsage, o.output)
	}
	if cmd.noOpen {
		return cmd.run(ctx, env, o, nil)
	}
	dp, err := open(o.bpffs)
	if err != nil {
		return err
	}
	defer dp.Close()
	return cmd.run(ctx, env, o, dp)
}

// commonFlags defines the flags every command takes, defaulting to what o
// holds: defining a flag sets its variable, and the command's flag set must
// not undo what the global one parsed.
func commonFlags(fs *flag.FlagSet, o *options) {
	fs.StringVar(&o.bpffs, "bpffs", o.bpffs, "pin `directory` of the datapath (underpassd's bpffs)")
	fs.StringVar(&o.output, "o", o.output, "output `format`: table or json")
}

// open opens the pinned datapath with an error that says what to do.
func open(dir string) (*loader.Objects, error) {
	dp, err := loader.Open(dir)
	switch {
	case err == nil:
		return dp, nil
	case errors.Is(err, fs.ErrPermission) || errors.Is(err, unix.EPERM):
		return nil, fmt.Errorf("reading the datapath pinned in %s needs root (CAP_BPF and CAP_NET_ADMIN): %w", dir, err)
	case errors.Is(err, loader.ErrNotLoaded):
		if _, statErr := os.Stat(dir); statErr != nil {
			return nil, fmt.Errorf("datapath not loaded in %s: start underpassd", dir)
		}
		// Something is pinned, but not all of it: the loader says what.
		return nil, fmt.Errorf("datapath not loaded in %s: start underpassd (%w)", dir, err)
	}
	return nil, err
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// humanBytes formats a byte count with binary units.
func humanBytes(b float64) string {
	const unit = 1024
	if b < unit {
		return fmt.Sprintf("%.0f B", b)
	}
	div, exp := float64(unit), 0
	for n := b / unit; n >= unit && exp < 5; n /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", b/div, "KMGTPE"[exp])
}

// humanCount formats a packet count or rate compactly.
func humanCount(n float64) string {
	switch {
	case n >= 1e9:
		return fmt.Sprintf("%.1fG", n/1e9)
	case n >= 1e6:
		return fmt.Sprintf("%.1fM", n/1e6)
	case n >= 1e4:
		return fmt.Sprintf("%.1fk", n/1e3)
	case n == float64(int64(n)):
		return fmt.Sprintf("%d", int64(n))
	}
	return fmt.Sprintf("%.1f", n)
}

func age(t time.Time, now time.Time) string {
	if t.IsZero() || t.Unix() == 0 {
		return "-"
	}
	d := now.Sub(t)
	switch {
	case d < 0:
		return "0s"
	case d < time.Minute:
		return fmt.Sprintf("%ds", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%dm", int(d.Minutes()))
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh", int(d.Hours()))
	}
	return fmt.Sprintf("%dd", int(d.Hours()/24))
}

func joinOr(items []string, none string) string {
	if len(items) == 0 {
		return none
	}
	return strings.Join(items, ",")
}
