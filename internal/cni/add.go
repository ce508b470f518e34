package cni

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"strings"

	cnins "github.com/containernetworking/cni/pkg/ns"
	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/ipam"
	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/utils/sysctl"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
)

// Funcs are the verbs for skel.PluginMainFuncs. Each returns a *types.Error
// (cniError), so the runtime gets a CNI error code, not just a message.
func Funcs() skel.CNIFuncs {
	return skel.CNIFuncs{
		Add:    verb(add),
		Del:    verb(withConf(parseConfForDel, del)),
		Check:  verb(withConf(ParseConf, check)),
		Status: verb(withConf(ParseConf, status)),
		GC:     verb(withConf(ParseConf, gc)),
	}
}

func verb(f func(*skel.CmdArgs) error) func(*skel.CmdArgs) error {
	return func(args *skel.CmdArgs) error { return cniError(f(args)) }
}

// withConf parses the network configuration before f. ADD parses its own,
// inside its timed phases.
func withConf(parse func([]byte) (*Conf, error), f func(*Conf, *skel.CmdArgs) error) func(*skel.CmdArgs) error {
	return func(args *skel.CmdArgs) error {
		c, err := parse(args.StdinData)
		if err != nil {
			return err
		}
		return f(c, args)
	}
}

// add is CNI ADD.
func add(args *skel.CmdArgs) (err error) {
	ph := newPhases()
	defer ph.log("add")
	c, err := ParseConf(args.StdinData)
	if err != nil {
		return err
	}
	cargs, err := parseCNIArgs(args.Args)
	if err != nil {
		return err
	}
	if err := c.applyMACArg(cargs.MAC); err != nil {
		return err
	}
	// What only the user can fix is reported before what goes away by
	// itself (the datapath loading), and before IPAM takes an address.
	if err := checkAdd(args, c); err != nil {
		return err
	}
	var master netlink.Link
	if !c.Chained {
		if master, err = resolveMaster(c.Master); err != nil {
			return err
		}
	}
	ph.mark("parse")
	// IPAM, the longest step, runs from here while everything up to the
	// registration does (see overlapIPAM); a failed ADD releases what it
	// got.
	var call *ipamCall
	if !c.Chained && c.IPAM.Type != "" {
		call = newIPAMCall(c.IPAM.Type, args.StdinData)
		if overlapIPAM[c.IPAM.Type] {
			call.start()
		}
		defer func() {
			if err != nil {
				err = call.joinRelease(err)
			}
		}()
	}
	// The datapath first: without it there is nothing to create a pod for.
	dp, err := openDatapath(c.BPFFS, types.ErrTryAgainLater)
	if err != nil {
		return err
	}
	defer dp.Close()
	ph.mark("open_datapath")
	netns, err := ns.GetNS(args.Netns)
	if err != nil {
		return errorf(types.ErrInvalidNetNS, "open container netns %q: %v", args.Netns, err)
	}
	defer netns.Close()

	base := datapath.Endpoint{ContainerID: args.ContainerID, IfName: args.IfName, Netns: args.Netns, PodName: cargs.PodName, PodNamespace: cargs.PodNamespace, Network: c.Name}
	var result types.Result
	if c.Chained {
		result, err = addChained(c, dp, netns, base, ph)
	} else {
		result, err = addMain(c, args, dp, netns, master, base, call, ph)
	}
	if err != nil {
		return err
	}
	return types.PrintResult(result, c.CNIVersion)
}

// checkAdd refuses an ADD that cannot work whatever the node's state: the
// names do not fit the registry, the plugin runs in the container's netns,
// or a chained entry has nothing before it.
func checkAdd(args *skel.CmdArgs, c *Conf) error {
	// The network name is the configuration's; the rest the runtime's.
	if err := datapath.CheckAttachment("", "", "", c.Name); err != nil {
		return invalidConf("%v", err)
	}
	if err := datapath.CheckAttachment(args.ContainerID, args.IfName, args.Netns, c.Name); err != nil {
		return errorf(types.ErrInvalidEnvironmentVariables, "%v", err)
	}
	// skel refuses a plugin that runs inside CNI_NETNS only after ADD has
	// returned, when IPAM has handed out an address that the IPAM plugin's
	// own copy of that check then hid from the rollback.
	if ov := strings.ToUpper(args.NetnsOverride); ov != "TRUE" && ov != "1" {
		if inside, err := cnins.CheckNetNS(args.Netns); err == nil && inside {
			return errorf(types.ErrInvalidNetNS, "the plugin runs inside CNI_NETNS %s: the runtime must run it from the host network namespace", args.Netns)
		}
	}
	if c.Chained && c.PrevResult == nil {
		return invalidConf("underpass has no interface keys, so it is chained, but no plugin before it returned a result: put it after the macvlan or ipvlan plugin in the plugins list, or set master (and ipam) for underpass to create the interface itself")
	}
	return nil
}

// addMain creates the slave, takes the addresses from call (nil: no IPAM)
// and registers the endpoint. Every step undoes itself when a later one
// fails: the named err is what the deferred rollbacks look at (add releases
// the addresses).
func addMain(c *Conf, args *skel.CmdArgs, dp *loader.Objects, netns ns.NetNS, master netlink.Link, ep datapath.Endpoint, call *ipamCall, ph *phases) (_ types.Result, err error) {
	m := &dp.Maps
	if err := checkMain(c, args, m, master); err != nil {
		return nil, err
	}
	ph.mark("master")

	link, err := createSlave(c, master, args.IfName, netns)
	if err != nil {
		return nil, err
	}
	ph.mark("create_slave")
	defer func() {
		if err != nil {
			// An IPAM type that may use the interface releases while it
			// is there (see overlapIPAM); add's own rollback then has
			// nothing left to release.
			if call != nil && !overlapIPAM[call.typ] {
				err = call.joinRelease(err)
			}
			if derr := deleteLinkIn(netns.Path(), args.IfName); derr != nil {
				err = errors.Join(err, fmt.Errorf("roll back: delete %s: %w", args.IfName, derr))
			}
		}
	}()
	if err := failpoint("add-link"); err != nil {
		return nil, err
	}
	result := &current.Result{
		CNIVersion: current.ImplementedSpecVersion,
		Interfaces: []*current.Interface{{Name: args.IfName, Mac: link.Attrs().HardwareAddr.String(), Sandbox: netns.Path()}},
		DNS:        c.DNS,
	}
	if err := addIPAMResult(result, call, c); err != nil {
		return nil, err
	}
	ph.mark("ipam")
	if err := failpoint("add-ipam"); err != nil {
		return nil, err
	}
	_, addrs, err := ifaceIPs(result, 0)
	if err != nil {
		return nil, err
	}
	// IPAMs whose config is not readable here (whereabouts, dhcp) are
	// checked on what they handed out.
	if err := checkServiceOverlap(m, "pod subnet", addrs); err != nil {
		return nil, err
	}

	ep.Ifindex = link.Attrs().Index
	ep.MAC = link.Attrs().HardwareAddr
	ep.Addrs = addrs
	ep.ParentIfindex = master.Attrs().Index
	ep.ParentName = master.Attrs().Name
	ep.ParentMAC = master.Attrs().HardwareAddr
	ep.Mode = c.DatapathMode
	// The programs go on before the link comes up, so the counters see its
	// first frame and the spoofing guard is in place before it can send.
	err = attachEndpoint(dp, netns, &ep, ph, func() error { return configureSlave(args.IfName, ep.Ifindex, result, c.SlaveMAC != nil) })
	if err != nil {
		return nil, err
	}
	ph.mark("configure")
	return result, nil
}

// checkMain refuses a main-mode ADD that cannot work before anything is
// created: an IPAM subnet in a service CIDR, an interface a previous plugin
// made already, an MTU above the master's.
func checkMain(c *Conf, args *skel.CmdArgs, m *loader.Maps, master netlink.Link) error {
	if err := checkServiceOverlap(m, "ipam subnet", c.IPAMSubnets); err != nil {
		return err
	}
	if c.PrevResult != nil {
		if prev, perr := current.NewResultFromResult(c.PrevResult); perr == nil {
			if _, intf := resultIface(prev, args.IfName, args.Netns); intf != nil {
				return invalidConf("a previous plugin created %s already: to chain underpass after it, remove master, mode, macvlanMode, ipvlanMode, mtu and ipam from the underpass entry", args.IfName)
			}
		}
	}
	if mtu := master.Attrs().MTU; c.MTU > mtu {
		return invalidConf("mtu %d is larger than master %s's MTU %d: lower mtu, or leave it out to use the master's", c.MTU, master.Attrs().Name, mtu)
	}
	return checkSlaveMAC(c.SlaveMAC, master)
}

// checkSlaveMAC refuses a MAC asked for that is the parent's own, or a
// router's the node knows on the parent (the gateway of a route through
// it, or an IPv6 neighbour flagged a router): a slave with it would take
// the router's frames from its bridged neighbours, and the datapath would
// take the router for the pod. Not any neighbour's: the node's neighbour
// table holds the pods too (it reaches them through the parent), and a pod
// made again with its own MAC must get it back. A wire host that is not
// the node's router is not known here.
func checkSlaveMAC(mac net.HardwareAddr, master netlink.Link) error {
	if mac == nil {
		return nil
	}
	name := master.Attrs().Name
	if bytes.Equal(mac, master.Attrs().HardwareAddr) {
		return invalidConf("the MAC asked for, %s, is master %s's own: ask for another", mac, name)
	}
	routes, err := netlinksafe.RouteList(master, netlink.FAMILY_ALL)
	if err != nil {
		return fmt.Errorf("list the routes through %s: %w", name, err)
	}
	gateways := map[string]bool{}
	for _, r := range routes {
		if r.Gw != nil {
			gateways[r.Gw.String()] = true
		}
		for _, nh := range r.MultiPath {
			if nh.Gw != nil {
				gateways[nh.Gw.String()] = true
			}
		}
	}
	neighs, err := netlink.NeighList(master.Attrs().Index, netlink.FAMILY_ALL)
	if err != nil {
		return fmt.Errorf("list the neighbours on %s: %w", name, err)
	}
	for _, n := range neighs {
		if bytes.Equal(n.HardwareAddr, mac) && (gateways[n.IP.String()] || n.Flags&netlink.NTF_ROUTER != 0) {
			return invalidConf("the MAC asked for, %s, is the router %s's on master %s: ask for another", mac, n.IP, name)
		}
	}
	return nil
}

// addIPAMResult puts the addresses, routes and DNS that call handed out
// (nil: no IPAM) into result.
func addIPAMResult(result *current.Result, call *ipamCall, c *Conf) error {
	if call == nil {
		return nil
	}
	ir, err := call.result()
	if err != nil {
		return err
	}
	for _, ipc := range ir.IPs {
		ipc.Interface = current.Int(0) // every address is the slave's
	}
	result.IPs, result.Routes = ir.IPs, ir.Routes
	if !ir.DNS.IsEmpty() && c.DNS.IsEmpty() {
		result.DNS = ir.DNS
	}
	return nil
}

// configureSlave sets result's addresses and routes on the slave and brings
// it up; it runs inside the container netns.
func configureSlave(ifname string, ifindex int, result *current.Result, macAsked bool) error {
	// Announce the addresses at once (the reference macvlan plugin does the
	// same): neighbours may remember a previous owner's MAC.
	_, _ = sysctl.Sysctl(fmt.Sprintf("net/ipv4/conf/%s/arp_notify", ifname), "1")
	_, _ = sysctl.Sysctl(fmt.Sprintf("net/ipv6/conf/%s/ndisc_notify", ifname), "1")
	var err error
	if len(result.IPs) > 0 {
		err = ipam.ConfigureIface(ifname, result)
	} else {
		var l netlink.Link
		if l, err = netlink.LinkByIndex(ifindex); err == nil {
			err = netlink.LinkSetUp(l)
		}
	}
	// ipam.ConfigureIface reports the errno as text (%v), not wrapped.
	// (ipvlan says the same of an address another slave has.)
	if macAsked && err != nil && (errors.Is(err, unix.EADDRINUSE) || strings.Contains(err.Error(), unix.EADDRINUSE.Error())) {
		// macvlan checks a MAC only when the slave comes up: one asked
		// for (runtimeConfig.mac, CNI_ARGS MAC) that the parent or a
		// slave underpass does not know has.
		if l, lerr := netlink.LinkByIndex(ifindex); lerr == nil {
			return fmt.Errorf("configure %s: %w: its MAC %s is in use on the parent (the NIC itself, or another slave of it)", ifname, err, l.Attrs().HardwareAddr)
		}
	}
	if err != nil {
		return fmt.Errorf("configure %s: %w", ifname, err)
	}
	return nil
}

// addChained adopts the slave a previous plugin created and passes its
// result on unchanged.
func addChained(c *Conf, dp *loader.Objects, netns ns.NetNS, ep datapath.Endpoint, ph *phases) (types.Result, error) {
	prev, err := current.NewResultFromResult(c.PrevResult)
	if err != nil {
		return nil, errorf(types.ErrDecodingFailure, "prevResult: %v", err)
	}
	idx, intf := resultIface(prev, ep.IfName, ep.Netns)
	if intf == nil {
		return nil, invalidConf("prevResult has no interface %q in the container netns: chain underpass after the macvlan or ipvlan plugin that creates it", ep.IfName)
	}
	_, addrs, err := ifaceIPs(prev, idx)
	if err != nil {
		return nil, err
	}
	if err := checkServiceOverlap(&dp.Maps, "pod subnet", addrs); err != nil {
		return nil, err
	}
	var s *slave
	if err := netns.Do(func(ns.NetNS) error {
		var err error
		s, err = inspectSlave(ep.IfName)
		return err
	}); err != nil {
		return nil, err
	}
	ph.mark("inspect")
	if mac, perr := net.ParseMAC(intf.Mac); intf.Mac != "" && (perr != nil || mac.String() != s.MAC.String()) {
		return nil, fmt.Errorf("prevResult says %s has MAC %s, the container's has %s: the previous plugin's result is stale", ep.IfName, intf.Mac, s.MAC)
	}
	parent, err := netlink.LinkByIndex(s.ParentIndex)
	if err != nil {
		return nil, fmt.Errorf("the parent of %s (ifindex %d) is not in the host netns: underpass needs the slave's parent on the node (no linkInContainer): %w", ep.IfName, s.ParentIndex, err)
	}
	// ipvlan slaves carry their parent's MAC: a mismatch means the index
	// named some other link of the host.
	if s.Kind == ModeIPvlan && parent.Attrs().HardwareAddr.String() != s.MAC.String() {
		return nil, fmt.Errorf("the parent of %s (ifindex %d) is not in the host netns: %s has another MAC", ep.IfName, s.ParentIndex, parent.Attrs().Name)
	}

	ep.Ifindex = s.Ifindex
	ep.MAC = s.MAC
	ep.Addrs = addrs
	ep.ParentIfindex = parent.Attrs().Index
	ep.ParentName = parent.Attrs().Name
	ep.ParentMAC = parent.Attrs().HardwareAddr
	ep.Mode = s.Mode
	if err := attachEndpoint(dp, netns, &ep, ph, nil); err != nil {
		return nil, err
	}
	return c.PrevResult, nil
}
