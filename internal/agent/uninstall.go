package agent

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/vishvananda/netlink"

	"github.com/underpass-cni/underpass/internal/adopt"
	"github.com/underpass-cni/underpass/internal/attach"
	"github.com/underpass-cni/underpass/internal/config"
	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/hostnat"
	"github.com/underpass-cni/underpass/internal/loader"
)

// Uninstall detaches every program underpass attached (parents, uplinks,
// endpoint filters in pod namespaces) and removes the pin directory, telling
// out what it removed. It works with a config that no longer parses (the
// default pin directory is used then) and refuses while an agent runs on
// the directory, which would attach again.
func Uninstall(configPath string, out io.Writer) error {
	dir := loader.DefaultBPFFS
	var uplinks []string
	if c, err := config.Load(configPath); err == nil {
		dir, uplinks = c.BPFFS, c.Uplinks
	} else {
		fmt.Fprintf(out, "warning: %v; using the default bpffs %s\n", err, dir)
	}
	if pid := running(dir); pid != 0 {
		return fmt.Errorf("underpassd (pid %d) is running on %s: stop it first, or it attaches again", pid, dir)
	}
	// The nftables table is not in bpffs: it goes whatever is pinned.
	if st, err := hostnat.Installed(); err == nil && st.Table {
		if err := hostnat.Remove(); err != nil {
			return fmt.Errorf("uninstall: %w", err)
		}
		fmt.Fprintf(out, "removed nftables table inet %s\n", hostnat.Table)
	}
	if _, err := os.Stat(dir); errors.Is(err, fs.ErrNotExist) {
		fmt.Fprintf(out, "nothing to remove: no datapath pinned at %s\n", dir)
		return nil
	}

	errs := detachEgress(dir, uplinks, out)
	errs = append(errs, detachXDP(dir, out)...)
	errs = append(errs, detachEndpoints(dir, out)...)
	errs = append(errs, detachQuarantined(dir, out)...)
	errs = append(errs, removePins(dir, out))
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("uninstall: %w", err)
	}
	fmt.Fprintln(out, "underpass is uninstalled from this node")
	return nil
}

// detachEgress detaches the parent and uplink programs: the pinned tcx
// links, and the legacy (clsact) filters, which are not pinned, from every
// registered parent and configured uplink.
func detachEgress(dir string, uplinks []string, out io.Writer) []error {
	dp := &loader.Objects{Dir: dir}
	var errs []error
	detached := map[string]bool{}
	atts, err := attach.List(dir)
	if err != nil {
		errs = append(errs, err)
	}
	for _, att := range atts {
		if err := attach.DetachEgress(dp.EgressTarget(att.Role, att.Ifindex)); err != nil {
			errs = append(errs, err)
			continue
		}
		detached[fmt.Sprint(att.Role, att.Ifindex)] = true
		fmt.Fprintf(out, "detached %s program from %s\n", att.Role, attach.IfaceName(att.Ifindex))
	}
	if pm, err := openParents(dir); err == nil {
		for ifindex := range pm {
			if !detached[fmt.Sprint(attach.RoleParent, ifindex)] {
				if err := attach.DetachEgress(dp.EgressTarget(attach.RoleParent, ifindex)); err != nil {
					errs = append(errs, err)
				}
			}
		}
	}
	for _, name := range uplinks {
		if l, err := netlink.LinkByName(name); err == nil && !detached[fmt.Sprint(attach.RoleUplink, l.Attrs().Index)] {
			if err := attach.DetachEgress(dp.EgressTarget(attach.RoleUplink, l.Attrs().Index)); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errs
}

// detachXDP detaches the parents' XDP links.
func detachXDP(dir string, out io.Writer) []error {
	dp := &loader.Objects{Dir: dir}
	var errs []error
	xdps, _ := filepath.Glob(filepath.Join(dir, "links", "parent-xdp-*"))
	for _, p := range xdps {
		ifindex, err := strconv.Atoi(strings.TrimPrefix(filepath.Base(p), "parent-xdp-"))
		if err != nil {
			continue
		}
		if err := attach.DetachXDP(dp.XDPTarget(ifindex, "")); err != nil {
			errs = append(errs, err)
			continue
		}
		fmt.Fprintf(out, "detached XDP program from %s\n", attach.IfaceName(ifindex))
	}
	return errs
}

// detachEndpoints removes the endpoint filters, which live on the slaves in
// pod namespaces: the registrations say where.
func detachEndpoints(dir string, out io.Writer) []error {
	eps, err := openEndpoints(dir)
	if err != nil {
		return nil
	}
	var errs []error
	for _, id := range slices.Sorted(maps.Keys(eps)) {
		ep := eps[id]
		netnsPath, ifname := ep.Netns, ep.IfName
		if err := attach.CheckNetns(netnsPath); errors.Is(err, attach.ErrNetnsGone) {
			continue // the netns took the filters with it
		} else if err != nil {
			errs = append(errs, err)
			continue
		}
		if err := attach.DetachEndpoint(attach.EndpointOptions{ID: id, Ifindex: ep.Ifindex, Netns: netnsPath}); err != nil {
			errs = append(errs, err)
			continue
		}
		fmt.Fprintf(out, "detached endpoint programs from %s in %s\n", ifname, netnsPath)
	}
	return errs
}

// detachQuarantined removes the quarantined filters (attach.QuarantineEndpoint)
// from the slaves of the registered parents, in every namespace: no
// registration says where they are, and left behind they would keep the
// programs and maps alive with nothing to vet against.
func detachQuarantined(dir string, out io.Writer) []error {
	registered, err := readPinned(dir, datapath.Parents)
	if err != nil {
		return nil
	}
	var parents []adopt.Parent
	for ifindex := range registered {
		if l, err := netlink.LinkByIndex(ifindex); err == nil {
			parents = append(parents, adopt.Parent{Name: l.Attrs().Name, Ifindex: ifindex})
		}
	}
	slaves, err := adopt.Scan(parents, adopt.NetnsDirs)
	errs := []error{}
	if err != nil {
		errs = append(errs, fmt.Errorf("find quarantined slaves: %w", err))
	}
	for _, s := range slaves {
		f, err := attach.InspectEndpoint(s.Netns, s.Ifindex)
		if err != nil || !f.Quarantined {
			continue // gone meanwhile, or not quarantined
		}
		if err := attach.DetachEndpoint(attach.EndpointOptions{Ifindex: s.Ifindex, Netns: s.Netns}); err != nil {
			errs = append(errs, err)
			continue
		}
		fmt.Fprintf(out, "detached quarantined endpoint filters from %s in %s\n", s.IfName, s.Netns)
	}
	return errs
}

// removePins removes the pin directory, saying what was in it.
func removePins(dir string, out io.Writer) error {
	var nMaps, nProgs, nOther int
	_ = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return nil
		}
		switch filepath.Base(filepath.Dir(p)) {
		case "progs":
			nProgs++
		case filepath.Base(dir):
			nMaps++
		default:
			nOther++
		}
		return nil
	})
	if err := loader.Unload(dir); err != nil {
		return err
	}
	fmt.Fprintf(out, "removed %s (%d maps, %d programs, %d other pins)\n", dir, nMaps, nProgs, nOther)
	return nil
}

func openParents(dir string) (map[int]loader.Parent, error) { return readPinned(dir, datapath.Parents) }

func openEndpoints(dir string) (map[uint32]datapath.Endpoint, error) {
	return readPinned(dir, datapath.Endpoints)
}

// readPinned opens the datapath pinned in dir for one read.
func readPinned[T any](dir string, read func(*loader.Maps) (T, error)) (T, error) {
	dp, err := loader.Open(dir)
	if err != nil {
		var zero T
		return zero, err
	}
	defer dp.Close()
	return read(&dp.Maps)
}
