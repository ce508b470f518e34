// Package observability_test checks what operators see of the datapath:
// the Prometheus collector against real traffic in network namespaces, a
// real Prometheus evaluating the dashboard's and the alert rules' queries,
// IP-conflict events, bpftool's view of the pinned maps and underpassctl.
package observability_test

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/underpass-cni/underpass/internal/attach"
	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
	"github.com/underpass-cni/underpass/internal/metrics"
	"github.com/underpass-cni/underpass/internal/testutil"
	"github.com/underpass-cni/underpass/test/netenv"
)

const namespace = "obs"

var must = testutil.Must

// lab is a node with the datapath loaded and attached the way underpassd
// does it: parent egress (tcx) and parent XDP (generic, as veth parents in
// CI may lack native XDP), node addresses, a service CIDR and a live VIP.
type lab struct {
	env *netenv.Env
	dp  *loader.Objects
	up  *netenv.Uplink
	xdp attach.XDPMode
}

func newLab(t *testing.T) *lab {
	t.Helper()
	env := netenv.New(t, netenv.Options{})
	dp, err := loader.Load(filepath.Join(testutil.MountBPFFS(t), "underpass"), loader.Options{})
	must(t, err)
	t.Cleanup(func() { dp.Close() })
	l := &lab{env: env, dp: dp, up: env.Uplinks[0]}
	m := &dp.Maps
	must(t, datapath.SetConfig(m, datapath.Config{ServicesSynced: true, HostReachable: true}, 1))
	must(t, datapath.PutParent(m, l.up.Index, l.up.MAC, loader.ModeMacvlan))
	must(t, env.Node.Do(func() error {
		if _, err := attach.Egress(dp.EgressTarget(attach.RoleParent, l.up.Index)); err != nil {
			return err
		}
		l.xdp, err = attach.XDP(dp.XDPTarget(l.up.Index, attach.XDPGeneric))
		return err
	}))
	// Links are pinned: detach them with the lab (the pins go with the
	// bpffs dir, the links with the interfaces, but be explicit).
	t.Cleanup(func() {
		_ = env.Node.Do(func() error {
			_ = attach.DetachXDP(dp.XDPTarget(l.up.Index, ""))
			return attach.DetachEgress(dp.EgressTarget(attach.RoleParent, l.up.Index))
		})
	})
	hosts := datapath.HostSet{}
	hosts.Add(netip.PrefixFrom(l.up.Node4.Addr(), 32), loader.HostLocal)
	hosts.Add(netip.PrefixFrom(l.up.Node6.Addr(), 128), loader.HostLocal)
	must(t, datapath.SyncHostCIDRs(m, hosts))
	must(t, datapath.SyncServiceCIDRs(m, []netip.Prefix{netenv.SvcCIDR4}))
	_, _, err = datapath.SyncLiveServices(m, map[netip.Addr]bool{netenv.LiveVIP4: true})
	must(t, err)
	return l
}

// pod is a macvlan container registered and with its endpoint programs
// attached, as the CNI plugin leaves it.
type pod struct {
	*netenv.Container
	name string
	id   uint32
}

// pod adds an IPv4-only container. IPv6 is off on its interface so that no
// router solicitation or MLD report lands in the middle of an exact count.
func (l *lab) pod(t *testing.T, name string, host int) *pod {
	t.Helper()
	c := l.env.AddMacvlanContainer(name, l.up.IP4(host), netip.Prefix{})
	must(t, c.Do(func() error {
		return os.WriteFile("/proc/sys/net/ipv6/conf/eth0/disable_ipv6", []byte("1"), 0o644)
	}))
	id, err := datapath.Register(&l.dp.Maps, datapath.Endpoint{
		ContainerID: fmt.Sprintf("%x", []byte("obs-"+name+"-container-id")), IfName: c.IfName, Netns: c.Path,
		ParentIfindex: c.ParentIndex, ParentName: c.Parent, Ifindex: c.Index, Mode: loader.ModeMacvlan, MAC: c.MAC,
		Addrs: []netip.Prefix{c.IP4}, PodName: name, PodNamespace: namespace,
	})
	must(t, err)
	must(t, attach.Endpoint(l.dp.EndpointTarget(id, c.Path, c.Index)))
	t.Cleanup(func() { _ = attach.DetachEndpoint(attach.EndpointOptions{ID: id, Ifindex: c.Index, Netns: c.Path}) })
	return &pod{Container: c, name: name, id: id}
}

// series is one scrape: "name{k=v,...}" (labels sorted) -> value.
type series map[string]float64

func scrape(t *testing.T, cs ...prometheus.Collector) series {
	t.Helper()
	reg := prometheus.NewPedanticRegistry()
	for _, c := range cs {
		must(t, reg.Register(c))
	}
	fams, err := reg.Gather()
	must(t, err)
	out := series{}
	for _, f := range fams {
		for _, m := range f.GetMetric() {
			var ls []string
			for _, l := range m.GetLabel() {
				ls = append(ls, l.GetName()+"="+l.GetValue())
			}
			sort.Strings(ls)
			v := m.GetCounter().GetValue()
			if m.GetGauge() != nil {
				v = m.GetGauge().GetValue()
			}
			out[f.GetName()+"{"+strings.Join(ls, ",")+"}"] = v
		}
	}
	return out
}

// get finds the one series of name whose labels include want ("k=v").
func (s series) get(t *testing.T, name string, want ...string) float64 {
	t.Helper()
	var found []string
	for k := range s {
		n, labels, _ := strings.Cut(k, "{")
		if n != name {
			continue
		}
		labels = strings.TrimSuffix(labels, "}")
		have := map[string]bool{}
		for _, l := range strings.Split(labels, ",") {
			have[l] = true
		}
		ok := true
		for _, w := range want {
			ok = ok && have[w]
		}
		if ok {
			found = append(found, k)
		}
	}
	if len(found) != 1 {
		t.Fatalf("%d series %s%v: %v", len(found), name, want, found)
	}
	return s[found[0]]
}

func (l *lab) collector() *metrics.Collector {
	return metrics.New(&l.dp.Maps, metrics.Options{})
}

// eventually polls cond until it holds or 5s pass.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	eventuallyWithin(t, 5*time.Second, what, cond)
}

// ifName resolves an ifindex of the node's netns (the agent runs there).
func (l *lab) ifName(ifindex int) string {
	name := ""
	_ = l.env.Node.Do(func() error {
		if ifi, err := net.InterfaceByIndex(ifindex); err == nil {
			name = ifi.Name
		}
		return nil
	})
	return name
}

var eventuallyWithin = testutil.WaitFor
