package adopt

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/underpass-cni/underpass/internal/attach"
	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
)

// The network names adopted endpoints carry in the registry. CNI GC, which
// works per network, never touches them. Adopted: found by the agent's
// scan, removed by it when the scan no longer finds them. Attached: by
// `underpassctl attach`, removed by `underpassctl detach` or when their
// namespace or interface goes (the endpoint collector).
const (
	AdoptedNetwork  = datapath.AdoptedNetwork
	AttachedNetwork = datapath.AttachedNetwork
)

// ContainerID is the registry's name of s's namespace: stable while the
// namespace lives, whatever path reaches it.
func ContainerID(s *Slave) string {
	return "netns-" + strings.ReplaceAll(s.NetnsID, ":", "-")
}

// Name is what s's endpoint is called in metrics and underpassctl (its
// "pod"): a Podman container's name, else the pin's name (`ip netns` name,
// Docker sandbox, Podman netns), or the command and pid of a process in it.
func Name(s *Slave) string {
	// The lowest few: a container's first process comes before what enters
	// its namespace later (short of pid wrap-around), and a namespace of
	// many processes would cost two /proc reads each, every scan.
	for _, pid := range s.Pids[:min(len(s.Pids), maxNamePids)] {
		if n := PodmanName(pid); n != "" {
			return n
		}
	}
	if dir, file := filepath.Split(s.Netns); file == "net" && strings.HasPrefix(dir, "/proc/") {
		pid := filepath.Base(filepath.Dir(filepath.Clean(dir)))
		comm, _ := os.ReadFile(filepath.Join("/proc", pid, "comm"))
		return strings.TrimSpace(string(comm)) + "-" + pid
	}
	return filepath.Base(s.Netns)
}

// maxNamePids is how many of a namespace's processes Name asks.
const maxNamePids = 8

// PodmanName is the name of the Podman container pid runs in, or "": a
// Podman container's processes are children of its conmon, which was
// started with the container's name (-n <name>). Read from /proc, it
// needs neither the podman CLI nor its state (whatever its --root).
func PodmanName(pid int) string {
	if pid <= 0 {
		return ""
	}
	stat, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		return ""
	}
	// pid (comm) state ppid …: comm may hold spaces and parentheses.
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 {
		return ""
	}
	f := strings.Fields(string(stat[i+1:]))
	if len(f) < 2 {
		return ""
	}
	ppid := f[1]
	if comm, _ := os.ReadFile(filepath.Join("/proc", ppid, "comm")); strings.TrimSpace(string(comm)) != "conmon" {
		return ""
	}
	cmdline, err := os.ReadFile(filepath.Join("/proc", ppid, "cmdline"))
	if err != nil {
		return ""
	}
	return conmonName(strings.Split(strings.TrimRight(string(cmdline), "\x00"), "\x00"))
}

// conmonName is the container name in conmon's arguments (-n, --name,
// --name=), if short enough to keep.
func conmonName(args []string) string {
	for i, a := range args {
		var n string
		switch {
		case (a == "-n" || a == "--name") && i+1 < len(args):
			n = args[i+1]
		case strings.HasPrefix(a, "--name="):
			n = strings.TrimPrefix(a, "--name=")
		default:
			continue
		}
		if n == "" || len(n) > maxName {
			return ""
		}
		return n
	}
	return ""
}

// Endpoint is s as the registry holds it, in network.
func Endpoint(s *Slave, network, name string) (*datapath.Endpoint, error) {
	parent, err := net.InterfaceByIndex(s.ParentIfindex)
	if err != nil {
		return nil, fmt.Errorf("parent %s: %w", s.ParentName, err)
	}
	return &datapath.Endpoint{ContainerID: ContainerID(s), IfName: s.IfName, PodName: name, Network: network,
		ParentName: s.ParentName, ParentIfindex: s.ParentIfindex, ParentMAC: parent.HardwareAddr,
		Ifindex: s.Ifindex, Mode: s.Mode, MAC: s.MAC, Addrs: s.Addrs, Netns: s.Netns}, nil
}

// Register makes s an endpoint of network: registered, its programs
// attached. On error nothing of it is left.
func Register(dp *loader.Objects, s *Slave, network, name string, log *slog.Logger) (*datapath.Endpoint, error) {
	return register(dp, s, network, name, log, 0)
}

// register is Register, replacing registration replaces (0: none) of the
// same interface under another name.
func register(dp *loader.Objects, s *Slave, network, name string, log *slog.Logger, replaces uint32) (*datapath.Endpoint, error) {
	ep, err := Endpoint(s, network, name)
	if err != nil {
		return nil, err
	}
	netns, err := ns.GetNS(s.Netns)
	if err != nil {
		return nil, fmt.Errorf("open netns %s: %w", s.Netns, err)
	}
	defer netns.Close()
	if _, err := datapath.AddEndpoint(dp, netns, ep, datapath.AddOptions{Log: log, Replaces: replaces}, nil); err != nil {
		return nil, fmt.Errorf("register %s in %s: %w", s.IfName, s.Netns, err)
	}
	return ep, nil
}

// Renamed is an endpoint as renamed, and the name it had.
type Renamed struct {
	datapath.Endpoint
	From string
}

// maxName is the longest name the registry keeps (a C string).
const maxName = 127

// Result is what a Sync changed.
type Result struct {
	Added, Removed []datapath.Endpoint
	// Renamed are endpoints whose name alone changed (their container
	// became known): renamed in place, programs and counters kept.
	Renamed []Renamed
	// Skipped are slaves someone else registered (a CNI ADD): never twice.
	Skipped int
}

// Sync makes the adopted endpoints in the registry the slaves found: it
// registers the new ones, registers again one whose addresses, MAC or
// interface changed, and removes those no longer found (gone, or their
// parent no longer listed). A new slave with no address waits: there is
// nothing to reach it at yet; one adopted already that lost every address
// stays registered, with none. name names an endpoint (nil: Name); one
// whose name alone changed (its container became known) is renamed in
// place (datapath.Rename).
//
// before is the registry's adopted endpoints taken before the scan that
// found the slaves (Snap; nil: all that the registry holds are older than
// the scan). One registered or changed since (by the OCI hook, while the
// scan ran) is newer than what the scan saw of it: left as it is, for the
// next scan, never removed or registered again from a stale view.
func Sync(dp *loader.Objects, before Snapshot, found []Slave, name func(*Slave) string, log *slog.Logger) (Result, error) {
	res, adopted, keep, err := add(dp, found, addOptions{before: before, name: name, log: log})
	errs := []error{err}
	for key, ep := range adopted {
		if keep[key] {
			continue
		}
		if err := remove(dp, ep.ID); err != nil {
			errs = append(errs, fmt.Errorf("unregister %s %s: %w", ep.PodName, ep.IfName, err))
			continue
		}
		res.Removed = append(res.Removed, ep)
	}
	return res, errors.Join(errs...)
}

// Adopt is Sync's first half alone: it registers the slaves found (new or
// changed) and removes nothing, for a caller that saw one namespace, not
// all of them (the OCI hook). An adoption whose interface, MAC and
// addresses match is kept whatever its name: containers sharing one
// namespace (a Podman pod, --network container:X) each run the hook, and
// renaming it would detach and attach its programs under a running
// container; the scan's name stays.
func Adopt(dp *loader.Objects, found []Slave, name func(*Slave) string, log *slog.Logger) (Result, error) {
	res, _, _, err := add(dp, found, addOptions{name: name, log: log, anyName: true})
	return res, err
}

// Snapshot is the adopted endpoints in the registry at one moment, by
// container id and ifname.
type Snapshot map[string]datapath.Endpoint

// Snap takes the registry's adopted endpoints: call it before a scan, and
// pass it to the Sync of that scan's slaves.
func Snap(dp *loader.Objects) (Snapshot, error) {
	eps, err := datapath.Endpoints(&dp.Maps)
	if err != nil {
		return nil, err
	}
	snap := Snapshot{}
	for _, ep := range eps {
		if ep.Network == AdoptedNetwork {
			snap[ep.ContainerID+"/"+ep.IfName] = ep
		}
	}
	return snap, nil
}

type addOptions struct {
	before  Snapshot
	name    func(*Slave) string
	log     *slog.Logger
	anyName bool // a name change alone is no change
}

// add registers the slaves found that are new or changed, and returns the
// adopted endpoints the registry held and which of them (by container id
// and ifname) are to stay: found by the scan, or newer than it.
func add(dp *loader.Objects, found []Slave, o addOptions) (res Result, adopted map[string]datapath.Endpoint, keep map[string]bool, _ error) {
	a, err := newAdder(dp, o)
	if err != nil {
		return res, nil, nil, err
	}
	for i := range found {
		a.slave(&found[i])
	}
	return a.res, a.adopted, a.keep, errors.Join(a.errs...)
}

// ownKey is what another registration (a CNI ADD) owns on its parent: a
// macvlan slave's MAC, or an ipvlan slave's address, since every ipvlan
// slave has its parent's MAC (ipvlan tells them apart by address).
type ownKey struct {
	parent int
	key    string
}

// adder is one pass of add, over the registry as it was when it began.
type adder struct {
	dp      *loader.Objects
	o       addOptions
	owned   map[ownKey]bool
	adopted map[string]datapath.Endpoint // ours, by container id and ifname
	byIndex map[string]string            // adopted's keys by container id and ifindex
	keep    map[string]bool              // adopted's keys that stay
	res     Result
	errs    []error
}

func newAdder(dp *loader.Objects, o addOptions) (*adder, error) {
	if o.name == nil {
		o.name = Name
	}
	eps, err := datapath.Endpoints(&dp.Maps)
	if err != nil {
		return nil, err
	}
	a := &adder{dp: dp, o: o, owned: map[ownKey]bool{}, adopted: map[string]datapath.Endpoint{}, byIndex: map[string]string{}, keep: map[string]bool{}}
	for _, ep := range eps {
		if ep.Network == AdoptedNetwork {
			a.adopted[ep.ContainerID+"/"+ep.IfName] = ep
			continue
		}
		if ep.Mode == loader.ModeMacvlan {
			a.owned[ownKey{ep.ParentIfindex, ep.MAC.String()}] = true
			continue
		}
		for _, p := range ep.Addrs {
			a.owned[ownKey{ep.ParentIfindex, p.Addr().String()}] = true
		}
	}
	for key, ep := range a.adopted {
		if old, ok := o.before[key]; o.before != nil && (!ok || old.ID != ep.ID || !sameSlave(old, ep.Ifindex, ep.MAC, ep.Addrs) || old.PodName != ep.PodName) {
			a.keep[key] = true // registered or changed after the scan began
		}
		// An adopted interface renamed in its namespace is the same
		// interface under another registry name: found by its index,
		// replaced in place.
		a.byIndex[ep.ContainerID+"#"+strconv.Itoa(ep.Ifindex)] = key
	}
	return a, nil
}

func (a *adder) ownedBy(s *Slave) bool {
	if s.Mode == loader.ModeMacvlan {
		return a.owned[ownKey{s.ParentIfindex, s.MAC.String()}]
	}
	return slices.ContainsFunc(s.Addrs, func(p netip.Prefix) bool { return a.owned[ownKey{s.ParentIfindex, p.Addr().String()}] })
}

// slave adopts s, or keeps, renames or replaces its registration.
func (a *adder) slave(s *Slave) {
	key := ContainerID(s) + "/" + s.IfName
	prev := key // the key of its registration, if it has one
	if _, ok := a.adopted[key]; !ok {
		prev = a.byIndex[ContainerID(s)+"#"+strconv.Itoa(s.Ifindex)]
	}
	_, had := a.adopted[prev]
	// A new slave with no address waits: there is nothing to reach it at
	// yet. One adopted already whose addresses all went is registered
	// again with none, so that its guard drops every frame with an IP
	// source: released, it would be unguarded, and a container with
	// CAP_NET_ADMIN could flush its addresses and then forge any source at
	// its neighbours.
	if len(s.Addrs) == 0 && !had {
		return
	}
	if a.ownedBy(s) {
		a.res.Skipped++
		return
	}
	n := a.o.name(s)
	if len(n) > maxName {
		n = n[:maxName] // as the registry keeps it, or it would never compare equal
	}
	var replaces uint32
	if ep, ok := a.adopted[key]; ok {
		if a.unchanged(key, ep, s, n) {
			return
		}
		// Its interface, MAC, addresses or path changed: registered
		// afresh below (AddEndpoint replaces the registration of the same
		// attachment, its filters swapped in place).
	} else if had {
		if a.keep[prev] {
			return // changed after the scan began: the next scan sees it
		}
		replaces = a.adopted[prev].ID
	}
	a.register(s, key, prev, had, n, replaces)
}

// unchanged says whether ep, s's registration under key, stays: as it is,
// or renamed in place when only s's name changed.
func (a *adder) unchanged(key string, ep datapath.Endpoint, s *Slave, n string) bool {
	same := sameSlave(ep, s.Ifindex, s.MAC, s.Addrs) && samePath(ep.Netns, s)
	if a.keep[key] || same && (a.o.anyName || ep.PodName == n) {
		a.keep[key] = true
		return true
	}
	if !same {
		return false
	}
	a.keep[key] = true
	if err := rename(a.dp, ep.ID, n); err != nil {
		a.errs = append(a.errs, fmt.Errorf("rename %s %s to %s: %w", ep.PodName, ep.IfName, n, err))
		return true
	}
	r := Renamed{Endpoint: ep, From: ep.PodName}
	r.PodName = n
	a.res.Renamed = append(a.res.Renamed, r)
	return true
}

// register registers s as n under key, replacing the registration under
// prev (had) with id replaces, if any.
func (a *adder) register(s *Slave, key, prev string, had bool, n string, replaces uint32) {
	ep, err := register(a.dp, s, AdoptedNetwork, n, a.o.log, replaces)
	if err != nil {
		a.errs = append(a.errs, err)
		// A change refused (an address another endpoint holds, which a
		// container can claim at will): the old registration, and the
		// guard on its interface, stay until one is accepted. Removing it
		// would leave the container unguarded. A slave with none is
		// quarantined: its frames are dropped, not let through unvetted.
		switch {
		case had:
			a.keep[prev] = true
		case errors.Is(err, datapath.ErrAddrInUse):
			if qerr := quarantine(a.dp, s); qerr != nil {
				a.errs = append(a.errs, fmt.Errorf("quarantine %s in %s: %w", s.IfName, s.Netns, qerr))
			}
		}
		return
	}
	a.keep[key] = true
	if had {
		a.keep[prev] = true // replaced, not to be removed
	}
	a.res.Added = append(a.res.Added, *ep)
}

// sameSlave is whether ep registers the slave with ifindex, mac and addrs.
func sameSlave(ep datapath.Endpoint, ifindex int, mac net.HardwareAddr, addrs []netip.Prefix) bool {
	return ep.Ifindex == ifindex && ep.MAC.String() == mac.String() && slices.Equal(ep.Addrs, addrs)
}

// samePath says whether path, an adopted endpoint's recorded netns, still
// leads to s's namespace: the recorded path may differ from the one this
// scan found (the OCI hook records the container's /proc/<pid>/ns/net),
// and only one that no longer leads there (that process ended) needs the
// registration written again.
func samePath(path string, s *Slave) bool {
	if path == s.Netns {
		return true
	}
	id, err := attach.NetnsID(path)
	return err == nil && id == s.NetnsID
}

// quarantine puts s's interface in quarantine (attach.QuarantineEndpoint)
// unless, by the time the lock is held, a registration covers it: a CNI
// ADD may have registered it since its adoption was refused.
func quarantine(dp *loader.Objects, s *Slave) error {
	unlock, err := dp.Lock()
	if err != nil {
		return err
	}
	defer unlock()
	eps, err := datapath.Endpoints(&dp.Maps)
	if err != nil {
		return err
	}
	for _, ep := range eps {
		if ep.Ifindex == s.Ifindex && samePath(ep.Netns, s) {
			return nil
		}
	}
	return attach.QuarantineEndpoint(dp.EndpointTarget(0, s.Netns, s.Ifindex))
}

func rename(dp *loader.Objects, id uint32, name string) error {
	unlock, err := dp.Lock()
	if err != nil {
		return err
	}
	defer unlock()
	return datapath.Rename(&dp.Maps, id, name)
}

func remove(dp *loader.Objects, id uint32) error {
	unlock, err := dp.Lock()
	if err != nil {
		return err
	}
	defer unlock()
	return datapath.RemoveEndpoint(dp, id)
}
