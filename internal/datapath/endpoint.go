package datapath

import (
	"net"
	"net/netip"
	"strconv"
	"time"

	"github.com/underpass-cni/underpass/internal/loader"
)

// Endpoint is one attachment of a container interface to a parent: the one
// shape of an endpoint in underpass. Registering takes it; reading the
// registry gives it back decoded (Decode), with ID, Created and Learned
// filled. The raw map value (loader.Endpoint, C layout) is encoded and
// decoded in this file only.
//
// The JSON names are those of `underpassctl endpoints -o json`.
type Endpoint struct {
	ID           uint32 `json:"id"`
	ContainerID  string `json:"containerID"`
	IfName       string `json:"interface"` // inside the container
	PodName      string `json:"pod"`
	PodNamespace string `json:"namespace"`
	Network      string `json:"network"` // the CNI network name (GC and STATUS are per network)
	// ParentName labels metrics; ParentIfindex (host netns) is the key.
	ParentName    string `json:"parent"`
	ParentIfindex int    `json:"parentIfindex"`
	// ParentMAC is what registering writes into the parents map when the
	// parent is not registered yet; it is not stored with the endpoint.
	ParentMAC net.HardwareAddr `json:"-"`
	Ifindex   int              `json:"ifindex"` // the slave, inside the container netns
	Mode      loader.Mode      `json:"-"`
	MAC       net.HardwareAddr `json:"-"`
	Addrs     []netip.Prefix   `json:"addrs"`
	Netns     string           `json:"netns"`
	Created   time.Time        `json:"created"`
	// Learned are the addresses the endpoint's DAD claimed (SLAAC, privacy
	// addresses), as stored; LearnedAddrs keeps those still its own.
	Learned []netip.Addr `json:"-"`
}

// Decode turns an endpoints map value into an Endpoint.
func Decode(raw *loader.Endpoint) Endpoint {
	ep := Endpoint{
		ID:            raw.Id,
		ContainerID:   goString(raw.ContainerId[:]),
		IfName:        goString(raw.Ifname[:]),
		PodName:       goString(raw.PodName[:]),
		PodNamespace:  goString(raw.PodNamespace[:]),
		Network:       goString(raw.Network[:]),
		ParentName:    goString(raw.Parent[:]),
		ParentIfindex: int(raw.ParentIfindex),
		Ifindex:       int(raw.Ifindex),
		Mode:          loader.Mode(raw.Mode),
		MAC:           net.HardwareAddr(raw.Mac[:]),
		Netns:         goString(raw.Netns[:]),
		Created:       time.Unix(int64(raw.CreatedUnix), 0).UTC(),
	}
	for _, a := range raw.Addrs {
		if a.Family != 0 {
			ep.Addrs = append(ep.Addrs, netip.PrefixFrom(netip.AddrFrom16(a.Addr).Unmap(), int(a.Prefixlen)))
		}
	}
	for _, l := range raw.Learned {
		if l.LearnedNs != 0 {
			ep.Learned = append(ep.Learned, netip.AddrFrom16(l.Addr).Unmap())
		}
	}
	return ep
}

// encode is the endpoints map value of ep, with no id yet.
func (ep *Endpoint) encode() loader.Endpoint {
	raw := loader.Endpoint{
		ParentIfindex: uint32(ep.ParentIfindex),
		Ifindex:       uint32(ep.Ifindex),
		Mode:          uint8(ep.Mode),
		CreatedUnix:   uint64(time.Now().Unix()),
	}
	copy(raw.Mac[:], ep.MAC)
	for i, p := range ep.Addrs {
		p = unmapAddr(p)
		raw.Addrs[i] = loader.EndpointAddr{Addr: p.Addr().As16(), Prefixlen: uint8(p.Bits()), Family: family(p.Addr())}
	}
	cString(raw.ContainerId[:], ep.ContainerID)
	cString(raw.Ifname[:], ep.IfName)
	cString(raw.Parent[:], ep.ParentName)
	cString(raw.PodName[:], ep.PodName)
	cString(raw.PodNamespace[:], ep.PodNamespace)
	cString(raw.Netns[:], ep.Netns)
	cString(raw.Network[:], ep.Network)
	return raw
}

// Same says whether a and b are one registration: an id handed to another
// attachment, or the same attachment registered again, is not. What the
// programs change (learnt addresses) does not count.
func (ep *Endpoint) Same(b *Endpoint) bool {
	return ep.ID == b.ID && ep.ContainerID == b.ContainerID && ep.IfName == b.IfName &&
		ep.Netns == b.Netns && ep.Ifindex == b.Ifindex && ep.ParentIfindex == b.ParentIfindex &&
		ep.MAC.String() == b.MAC.String() && ep.Created.Equal(b.Created)
}

// shortID is how much of a container id names an endpoint: the length
// docker, crictl and kubectl show, unique in practice for sha256 ids.
const shortID = 12

// Name is the endpoint label of metrics, logs and the CLI: "<short container
// id>/<ifname>". It is stable for the life of the attachment (the same pair
// the CNI runtime uses to address it), readable next to `crictl ps`, and one
// value per endpoint, so the label's cardinality is the number of endpoints.
// Without a container id (never from the plugin) the numeric id stands in.
func (ep *Endpoint) Name() string {
	cid := ep.ContainerID
	if cid == "" {
		return strconv.FormatUint(uint64(ep.ID), 10)
	}
	if len(cid) > shortID {
		cid = cid[:shortID]
	}
	return cid + "/" + ep.IfName
}

// PodRef is "namespace/pod", or "" when the endpoint has no pod (a plain
// CNI invocation without Kubernetes args).
func (ep *Endpoint) PodRef() string {
	switch {
	case ep.PodName == "":
		return ""
	case ep.PodNamespace == "":
		return ep.PodName
	}
	return ep.PodNamespace + "/" + ep.PodName
}
