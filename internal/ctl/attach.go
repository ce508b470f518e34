package ctl

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"

	"github.com/underpass-cni/underpass/internal/adopt"
	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
)

// attachFlags are the flags of attach and detach.
type attachFlags struct {
	netns, ifname, name string
}

func (f *attachFlags) register(withName bool) func(*flag.FlagSet) {
	return func(fs *flag.FlagSet) {
		fs.StringVar(&f.netns, "netns", "", "the container's network namespace: a path (/run/netns/x, a Docker SandboxKey) or a pid")
		fs.StringVar(&f.ifname, "ifname", "eth0", "the macvlan or ipvlan slave inside it")
		if withName {
			fs.StringVar(&f.name, "name", "", "what metrics and underpassctl call it (default: the namespace's name, or the process and pid)")
		}
	}
}

func (f *attachFlags) check(cmd string) error {
	if f.netns == "" {
		return fmt.Errorf("%w: %s needs --netns <path|pid>", ErrUsage, cmd)
	}
	return nil
}

// runAttach registers a slave that no CNI call made (`ip netns`, LXC,
// systemd-nspawn) as an endpoint, its programs attached: the host reaches
// it and it the host. It stays until detach, or until its namespace or
// interface goes (the agent's endpoint collector).
func runAttach(_ context.Context, env Env, o *options, dp *loader.Objects, f *attachFlags) error {
	if err := f.check("attach"); err != nil {
		return err
	}
	s, err := adopt.Inspect(adopt.NetnsPath(f.netns), f.ifname)
	if err != nil {
		return err
	}
	name := f.name
	if name == "" {
		name = adopt.Name(s)
	}
	ep, err := adopt.Register(dp, s, adopt.AttachedNetwork, name, slog.New(slog.DiscardHandler))
	if err != nil {
		return err
	}
	if o.output == "json" {
		return writeJSON(env.Stdout, ep)
	}
	fmt.Fprintf(env.Stdout, "attached %s %s (parent %s, %v) as endpoint %d\n", name, ep.IfName, ep.ParentName, ep.Addrs, ep.ID)
	return nil
}

// runDetach is attach's undo: the programs go, the registration goes.
func runDetach(_ context.Context, env Env, _ *options, dp *loader.Objects, f *attachFlags) error {
	if err := f.check("detach"); err != nil {
		return err
	}
	cid, err := adopt.ContainerIDOf(adopt.NetnsPath(f.netns))
	if err != nil {
		return err
	}
	unlock, err := dp.Lock()
	if err != nil {
		return err
	}
	defer unlock()
	id, ep, err := datapath.Find(&dp.Maps, cid, f.ifname)
	if err != nil {
		return err
	}
	if id == 0 {
		return fmt.Errorf("%s in %s is not attached", f.ifname, f.netns)
	}
	if ep.Network != adopt.AttachedNetwork {
		return errors.New("that interface was registered by " + ep.Network + ", not underpassctl attach: leave it to its owner")
	}
	if err := datapath.RemoveEndpoint(dp, id); err != nil {
		return err
	}
	fmt.Fprintf(env.Stdout, "detached %s %s (endpoint %d)\n", ep.PodName, ep.IfName, id)
	return nil
}
