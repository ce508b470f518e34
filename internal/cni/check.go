package cni

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/ip"
	"github.com/containernetworking/plugins/pkg/ipam"
	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/underpass-cni/underpass/internal/attach"
	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
)

// check is CNI CHECK: the interface still looks like prevResult says, and
// the datapath still has the endpoint as ADD registered it. Every error
// names what drifted.
func check(c *Conf, args *skel.CmdArgs) error {
	if c.PrevResult == nil {
		return invalidConf("CHECK needs prevResult: the runtime passes the result of ADD")
	}
	prev, err := current.NewResultFromResult(c.PrevResult)
	if err != nil {
		return errorf(types.ErrDecodingFailure, "prevResult: %v", err)
	}
	dp, err := openDatapath(c.BPFFS, types.ErrTryAgainLater)
	if err != nil {
		return err
	}
	defer dp.Close()

	if !c.Chained && c.IPAM.Type != "" {
		if err := ipam.ExecCheck(c.IPAM.Type, args.StdinData); err != nil {
			return fmt.Errorf("ipam %s: %w", c.IPAM.Type, err)
		}
	}
	var master int
	if !c.Chained {
		l, err := resolveMaster(c.Master)
		if err != nil {
			return err
		}
		master = l.Attrs().Index
	}

	idx, intf := resultIface(prev, args.IfName, args.Netns)
	if intf == nil {
		return fmt.Errorf("prevResult has no interface %q in the container netns", args.IfName)
	}
	ipcs, addrs, err := ifaceIPs(prev, idx)
	if err != nil {
		return err
	}

	var s *slave
	err = ns.WithNetNSPath(args.Netns, func(ns.NetNS) error {
		s, err = checkSlave(c, args.IfName, intf.Mac, ipcs, prev.Routes)
		return err
	})
	if err != nil {
		return fmt.Errorf("interface drifted: %w", err)
	}
	if master != 0 && s.ParentIndex != master {
		return fmt.Errorf("interface drifted: %s hangs off ifindex %d, master %s is ifindex %d", args.IfName, s.ParentIndex, c.Master, master)
	}
	if err := checkRegistration(dp, args, s, addrs); err != nil {
		return fmt.Errorf("datapath drifted: %w: delete and re-create the pod, or restart it", err)
	}
	return nil
}

// checkSlave compares the slave ifname with the config and what prevResult
// says of it (MAC, addresses, routes); it runs inside the container netns.
func checkSlave(c *Conf, ifname, mac string, ipcs []*current.IPConfig, routes []*types.Route) (*slave, error) {
	s, err := inspectSlave(ifname)
	if err != nil {
		return nil, err
	}
	if want, err := net.ParseMAC(mac); mac != "" && (err != nil || want.String() != s.MAC.String()) {
		return nil, fmt.Errorf("%s has MAC %s, prevResult says %s", ifname, s.MAC, mac)
	}
	if !c.Chained && s.Kind != c.Kind {
		return nil, fmt.Errorf("%s is a %s, the config says %s", ifname, s.Kind, c.Kind)
	}
	if !c.Chained && s.Mode != c.DatapathMode {
		return nil, fmt.Errorf("%s is in mode %s, the config says %s", ifname, s.Mode, c.DatapathMode)
	}
	if !s.Up {
		return nil, fmt.Errorf("%s is down", ifname)
	}
	if err := ip.ValidateExpectedInterfaceIPs(ifname, ipcs); err != nil {
		return nil, err
	}
	// No routes of ours: only those IPAM (or the previous plugin) asked
	// for, which must still be there.
	return s, ip.ValidateExpectedRoute(routes)
}

// checkRegistration compares the datapath's entries for the attachment
// with the interface.
func checkRegistration(dp *loader.Objects, args *skel.CmdArgs, s *slave, addrs []netip.Prefix) error {
	m := &dp.Maps
	id, ep, err := datapath.Find(m, args.ContainerID, args.IfName)
	if err != nil {
		return err
	}
	if id == 0 {
		return fmt.Errorf("endpoint %s/%s is not registered", args.ContainerID, args.IfName)
	}
	if ep.Netns != args.Netns {
		return fmt.Errorf("endpoint %d is registered in netns %s, not %s", id, ep.Netns, args.Netns)
	}
	if ep.Ifindex != s.Ifindex {
		return fmt.Errorf("endpoint %d is registered for ifindex %d, %s is ifindex %d", id, ep.Ifindex, args.IfName, s.Ifindex)
	}
	if ep.ParentIfindex != s.ParentIndex {
		return fmt.Errorf("endpoint %d is registered on parent ifindex %d, %s hangs off ifindex %d", id, ep.ParentIfindex, args.IfName, s.ParentIndex)
	}
	if ep.MAC.String() != s.MAC.String() {
		return fmt.Errorf("endpoint %d is registered with MAC %s, %s has %s", id, ep.MAC, args.IfName, s.MAC)
	}
	if ep.Mode != s.Mode {
		return fmt.Errorf("endpoint %d is registered as %s, %s is %s", id, ep.Mode, args.IfName, s.Mode)
	}
	got := ep.Addrs
	sortPrefixes(got)
	want := slices.Clone(addrs)
	sortPrefixes(want)
	if !slices.Equal(got, want) {
		return fmt.Errorf("endpoint %d is registered with addresses %v, prevResult has %v", id, got, want)
	}
	if err := checkLookups(m, s, id, addrs); err != nil {
		return err
	}
	return checkPrograms(args, s, id)
}

// checkLookups says whether the addresses and MAC of endpoint id lead to
// it, and its parent and counters are there.
func checkLookups(m *loader.Maps, s *slave, id uint32, addrs []netip.Prefix) error {
	want := slices.Clone(addrs)
	sortPrefixes(want)
	for _, p := range want {
		k := datapath.EpIPKey(p.Addr(), s.ParentIndex)
		var ref loader.EndpointRef
		if err := m.EpByIp.Lookup(&k, &ref); err != nil || ref.Id != id {
			return fmt.Errorf("address %s does not lead to endpoint %d in ep_by_ip", p.Addr(), id)
		}
	}
	if s.Mode == loader.ModeMacvlan {
		k := datapath.MACKey(s.MAC, s.ParentIndex)
		var ref loader.EndpointRef
		if err := m.EpByMac.Lookup(&k, &ref); err != nil || ref.Id != id {
			return fmt.Errorf("MAC %s does not lead to endpoint %d in ep_by_mac", s.MAC, id)
		}
	}
	if _, err := datapath.GetParent(m, s.ParentIndex); errors.Is(err, datapath.ErrNoParent) {
		return fmt.Errorf("parent ifindex %d is not registered", s.ParentIndex)
	} else if err != nil {
		return err
	}
	if _, err := datapath.EndpointStats(m, id); err != nil {
		return fmt.Errorf("endpoint %d has no counters", id)
	}
	return nil
}

// checkPrograms says whether both filters on the slave run endpoint id.
func checkPrograms(args *skel.CmdArgs, s *slave, id uint32) error {
	att, err := attach.InspectEndpoint(args.Netns, s.Ifindex)
	if err != nil {
		return fmt.Errorf("programs of endpoint %d: %w", id, err)
	}
	if att.Quarantined {
		return fmt.Errorf("programs of endpoint %d: the interface is quarantined (its filters run as no endpoint and drop all it sends: the agent found it replaced, another MAC or name)", id)
	}
	var problems []string
	for _, d := range []struct {
		name string
		id   uint32
	}{{"ingress", att.Ingress}, {"egress", att.Egress}} {
		switch d.id {
		case id:
		case 0:
			problems = append(problems, d.name+" not attached")
		default:
			problems = append(problems, fmt.Sprintf("%s runs endpoint %d's program", d.name, d.id))
		}
	}
	if len(problems) > 0 {
		return fmt.Errorf("programs of endpoint %d on %s: %s", id, args.IfName, strings.Join(problems, "; "))
	}
	return nil
}

func sortPrefixes(ps []netip.Prefix) {
	slices.SortFunc(ps, func(a, b netip.Prefix) int {
		if c := a.Addr().Compare(b.Addr()); c != 0 {
			return c
		}
		return a.Bits() - b.Bits()
	})
}
