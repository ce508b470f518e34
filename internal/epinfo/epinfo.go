// Package epinfo decodes an endpoint's pinned metadata into the names that
// metrics, logs and the CLI show, so the three always agree on what an
// endpoint is called.
package epinfo

import (
	"net"
	"net/netip"
	"strconv"
	"time"

	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
)

// shortID is how much of a container id names an endpoint: the length
// docker, crictl and kubectl show, unique in practice for sha256 ids.
const shortID = 12

// Info is an endpoint as people see it.
type Info struct {
	ID            uint32         `json:"id"`
	Name          string         `json:"endpoint"`
	ContainerID   string         `json:"containerID"`
	Interface     string         `json:"interface"`
	Pod           string         `json:"pod"`
	Namespace     string         `json:"namespace"`
	Parent        string         `json:"parent"`
	ParentIfindex int            `json:"parentIfindex"`
	Ifindex       int            `json:"ifindex"`
	Mode          string         `json:"mode"`
	MAC           string         `json:"mac"`
	Addrs         []netip.Prefix `json:"addrs"`
	Netns         string         `json:"netns"`
	Created       time.Time      `json:"created"`
}

// Decode turns the endpoints map value into an Info.
func Decode(ep *loader.Endpoint) Info {
	cid := datapath.GoString(ep.ContainerId[:])
	ifname := datapath.GoString(ep.Ifname[:])
	return Info{
		ID:            ep.Id,
		Name:          Name(ep.Id, cid, ifname),
		ContainerID:   cid,
		Interface:     ifname,
		Pod:           datapath.GoString(ep.PodName[:]),
		Namespace:     datapath.GoString(ep.PodNamespace[:]),
		Parent:        datapath.GoString(ep.Parent[:]),
		ParentIfindex: int(ep.ParentIfindex),
		Ifindex:       int(ep.Ifindex),
		Mode:          loader.Mode(ep.Mode).String(),
		MAC:           net.HardwareAddr(ep.Mac[:]).String(),
		Addrs:         datapath.EndpointAddrs(ep),
		Netns:         datapath.GoString(ep.Netns[:]),
		Created:       time.Unix(int64(ep.CreatedUnix), 0).UTC(),
	}
}

// Name is the endpoint label: "<short container id>/<ifname>". It is
// stable for the life of the attachment (the same pair the CNI runtime uses
// to address it), readable next to `crictl ps`, and one value per endpoint,
// so the label's cardinality is the number of endpoints. Without a container
// id (never from the plugin) the numeric id stands in.
func Name(id uint32, containerID, ifname string) string {
	if containerID == "" {
		return strconv.FormatUint(uint64(id), 10)
	}
	if len(containerID) > shortID {
		containerID = containerID[:shortID]
	}
	return containerID + "/" + ifname
}

// PodRef is "namespace/pod", or "" when the endpoint has no pod (a plain
// CNI invocation without Kubernetes args).
func (i Info) PodRef() string {
	switch {
	case i.Pod == "":
		return ""
	case i.Namespace == "":
		return i.Pod
	}
	return i.Namespace + "/" + i.Pod
}
