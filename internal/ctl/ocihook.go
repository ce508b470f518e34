package ctl

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"slices"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/underpass-cni/underpass/internal/adopt"
	"github.com/underpass-cni/underpass/internal/config"
)

// hookFlags are the flags of oci-hook.
type hookFlags struct {
	config  string
	dadWait time.Duration
}

func (f *hookFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.config, "config", config.DefaultPath, "underpassd's config `file`: its adopt.parents and bpffs")
	fs.DurationVar(&f.dadWait, "dad-wait", 3*time.Second, "how long to wait for the container's IPv6 addresses to pass duplicate address detection")
}

// ociState is the part of the OCI runtime state a hook reads on stdin.
type ociState struct {
	ID     string `json:"id"`
	Status string `json:"status"`
	Pid    int    `json:"pid"`
}

// maxState bounds what the hook reads from stdin: a state is a few KiB.
const maxState = 1 << 20

// runOCIHook is an OCI runtime hook (Podman's hooks.d, stage
// createRuntime or prestart): it registers the container's slaves on the
// agent's adopt.parents before the container's first process runs, so no
// frame of it leaves unguarded — the agent's namespace scan would serve it
// up to a scan interval later. The scan still owns the endpoint from then
// on: it finds it registered under the same name and keeps it, and
// removes it when the container's namespace goes.
//
// A container with no slave on those parents (another network, none, the
// host's) is none of its business: it exits 0 without opening the
// datapath. One that has such a slave and cannot be registered fails the
// hook, and with it the container's start: it would otherwise run
// unguarded on a parent the operator gave to underpass.
func runOCIHook(_ context.Context, env Env, _ *options, f *hookFlags) error {
	in := env.Stdin
	if in == nil {
		in = os.Stdin
	}
	var st ociState
	if err := json.NewDecoder(io.LimitReader(in, maxState)).Decode(&st); err != nil {
		return fmt.Errorf("oci-hook: reading the container state on stdin: %w", err)
	}
	if st.Status != "creating" && st.Status != "created" || st.Pid <= 0 {
		return nil // poststop and the like: the scan unregisters what went
	}
	cfg, parents, err := hookConfig(f.config, st.Pid)
	if err != nil || cfg == nil {
		return err
	}
	found, err := settled(parents, st.Pid, f.dadWait)
	if err != nil {
		return fmt.Errorf("oci-hook: container %.12s: %w", st.ID, err)
	}
	if len(found) == 0 {
		return nil
	}
	// A slave whose every address is still tentative could not be
	// registered, and would run with no programs: refused. (One with
	// no address at all is left to the agent's scan, as for an engine that
	// lets the container address itself: there is nothing to register.)
	for _, s := range found {
		if len(s.Addrs) == 0 && s.Tentative > 0 {
			return fmt.Errorf("oci-hook: container %.12s: the addresses of %s are still in duplicate address detection after %s (--dad-wait)",
				st.ID, s.IfName, f.dadWait)
		}
	}
	dp, err := open(cfg.BPFFS)
	if err != nil {
		return fmt.Errorf("oci-hook: container %.12s has a slave on %s: %w", st.ID, found[0].ParentName, err)
	}
	defer dp.Close()
	// The hook's parent is the runtime (runc, crun), whose parent is
	// Podman's conmon, started with the container's name.
	hookName := adopt.PodmanName(os.Getppid())
	name := func(s *adopt.Slave) string {
		if hookName != "" {
			return hookName
		}
		return adopt.Name(s)
	}
	res, err := adopt.Adopt(dp, found, name, slog.New(slog.DiscardHandler))
	if err != nil {
		return fmt.Errorf("oci-hook: container %.12s: %w", st.ID, err)
	}
	for _, ep := range res.Added {
		fmt.Fprintf(env.Stdout, "adopted %s %s (parent %s, %v) as endpoint %d\n", ep.PodName, ep.IfName, ep.ParentName, ep.Addrs, ep.ID)
	}
	return nil
}

// hookConfig loads the agent's configuration at path and its adopt.parents.
// A nil configuration and no error: nothing on this host is ours.
func hookConfig(path string, pid int) (*config.Config, []adopt.Parent, error) {
	cfg, err := config.Load(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil, nil // underpass is not configured on this host
	}
	if err != nil {
		// Which parents are ours is unknown: only a container with a
		// macvlan/ipvlan slave on some parent here is refused, so that a
		// typo in the config does not stop every container on the host.
		if found, serr := adopt.ScanPid(allLinks(), adopt.NetnsDirs, pid); serr == nil && len(found) == 0 {
			return nil, nil, nil
		}
		return nil, nil, fmt.Errorf("oci-hook: %w", err)
	}
	parents, missing := adopt.ParentsByName(cfg.Adopt.Parents)
	for n, err := range missing {
		// A parent not on this host (yet) has no slaves; one that could
		// not be looked up might.
		if !errors.As(err, &netlink.LinkNotFoundError{}) {
			return nil, nil, fmt.Errorf("oci-hook: adopt.parents %s: %w", n, err)
		}
	}
	return cfg, parents, nil
}

// settled scans pid's namespace until no address of its slaves is still in
// duplicate address detection, for at most wait. An IPv6 address is
// tentative for about a second after the engine sets it (netavark does not
// skip DAD): registered without it, the host could not reach the
// container over IPv6 until the agent's next scan, or at all while the
// agent is down. The container's start waits that long only when it has
// such an address; after wait, what has settled is registered and the
// scan adds the rest.
func settled(parents []adopt.Parent, pid int, wait time.Duration) ([]adopt.Slave, error) {
	deadline := time.Now().Add(wait)
	for {
		found, err := adopt.ScanPid(parents, adopt.NetnsDirs, pid)
		if err != nil || !slices.ContainsFunc(found, func(s adopt.Slave) bool { return s.Tentative > 0 }) || time.Now().After(deadline) {
			return found, err
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// allLinks is every link of this namespace as a parent.
func allLinks() []adopt.Parent {
	links, _ := netlink.LinkList()
	out := make([]adopt.Parent, 0, len(links))
	for _, l := range links {
		out = append(out, adopt.Parent{Name: l.Attrs().Name, Ifindex: l.Attrs().Index})
	}
	return out
}
