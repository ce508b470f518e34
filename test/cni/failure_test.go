package cni_test

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/vishvananda/netlink"

	"github.com/underpass-cni/underpass/internal/attach"
	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
)

// Every ADD error path: the right code and a message that says what to
// fix, then nothing left behind (after the runtime's DEL, for chains, as
// libcni does not undo earlier plugins of a failed ADD).
func TestAddFailures(t *testing.T) {
	h := newHarness(t, harnessOpts{})
	u := h.env.Uplinks[0]
	const ver = "1.1.0"
	with := func(base map[string]any, kv ...any) map[string]any {
		out := map[string]any{}
		for k, v := range base {
			out[k] = v
		}
		for i := 0; i < len(kv); i += 2 {
			out[kv[i].(string)] = kv[i+1]
		}
		return out
	}
	// ipamOne hands out exactly addr.
	ipamOne := func(addr netip.Addr) map[string]any {
		return map[string]any{"type": "host-local", "dataDir": h.dataDir, "ranges": []any{[]any{map[string]any{
			"subnet": u.Subnet4.String(), "rangeStart": addr.String(), "rangeEnd": addr.String(), "gateway": u.Gateway4.String(),
		}}}}
	}
	svcRange := map[string]any{"type": "host-local", "dataDir": h.dataDir, "ranges": []any{[]any{map[string]any{"subnet": "10.96.7.0/24"}}}}
	fakeEndpoint := func(t *testing.T, cid, netnsPath string, parent int, addr netip.Addr) {
		t.Helper()
		_, err := datapath.Register(&h.dp.Maps, datapath.Endpoint{
			ContainerID: cid, IfName: "eth0", Netns: netnsPath, ParentIfindex: parent, Mode: loader.ModeMacvlan,
			MAC: net.HardwareAddr{2, 0, 0, 0, 0xfa, 0xce}, Addrs: []netip.Prefix{netip.PrefixFrom(addr, 24)},
			PodName: "squatter", PodNamespace: "default",
		})
		must(t, err)
	}

	main := func() []map[string]any { return []map[string]any{h.mainConf(true)} }
	for i, tc := range []struct {
		name      string
		plugins   func() []map[string]any
		prep      func(t *testing.T, p *pod) (undo func())
		failpoint string // fails the step of ADD after it, see internal/cni/failpoint_on.go
		inPod     bool   // the runtime runs the plugin inside the pod's netns
		code      uint
		msg       []string
	}{
		{
			name:    "missing master",
			plugins: func() []map[string]any { return []map[string]any{with(h.mainConf(false), "master", "eth9")} },
			code:    types.ErrInvalidNetworkConfig,
			msg:     []string{`master "eth9" not found: set master to an existing NIC`},
		},
		{
			name:    "unknown mode",
			plugins: func() []map[string]any { return []map[string]any{with(h.mainConf(false), "mode", "bridge")} },
			code:    types.ErrInvalidNetworkConfig,
			msg:     []string{`unknown mode "bridge": use macvlan or ipvlan`},
		},
		{
			name:    "unknown macvlanMode",
			plugins: func() []map[string]any { return []map[string]any{with(h.mainConf(false), "macvlanMode", "l2")} },
			code:    types.ErrInvalidNetworkConfig,
			msg:     []string{`unknown macvlanMode "l2"`, "bridge, vepa or private"},
		},
		{
			// The host would have no path to the pod on that NIC: nothing
			// underpass promises could hold.
			name:    "macvlanMode passthru",
			plugins: func() []map[string]any { return []map[string]any{with(h.mainConf(false), "macvlanMode", "passthru")} },
			code:    types.ErrInvalidNetworkConfig,
			msg:     []string{"macvlanMode passthru: underpass cannot honour passthru", "use bridge, vepa or private"},
		},
		{
			name: "chained after a passthru macvlan",
			plugins: func() []map[string]any {
				return []map[string]any{{"type": "macvlan", "master": "eth0", "mode": "passthru", "ipam": h.hostLocal(false)}, {"type": "underpass", "bpffs": h.bpffs}}
			},
			code: types.ErrInvalidNetworkConfig,
			msg:  []string{`interface "eth0" in the container is a passthru macvlan slave`},
		},
		{
			name:    "ipvlanMode with macvlan",
			plugins: func() []map[string]any { return []map[string]any{with(h.mainConf(false), "ipvlanMode", "l3")} },
			code:    types.ErrInvalidNetworkConfig,
			msg:     []string{"set mode to ipvlan or remove ipvlanMode"},
		},
		{
			name:    "mtu above the master's",
			plugins: func() []map[string]any { return []map[string]any{with(h.mainConf(false), "mtu", 9000)} },
			code:    types.ErrInvalidNetworkConfig,
			msg:     []string{"mtu 9000 is larger than master eth0's MTU 1500"},
		},
		{
			name:    "mtu out of range",
			plugins: func() []map[string]any { return []map[string]any{with(h.mainConf(false), "mtu", 20)} },
			code:    types.ErrInvalidNetworkConfig,
			msg:     []string{"mtu 20 is out of range"},
		},
		{
			name:    "relative bpffs",
			plugins: func() []map[string]any { return []map[string]any{with(h.mainConf(false), "bpffs", "underpass")} },
			code:    types.ErrInvalidNetworkConfig,
			msg:     []string{`bpffs "underpass" is not an absolute path`},
		},
		{
			name:    "ipam subnet overlaps a service CIDR",
			plugins: func() []map[string]any { return []map[string]any{with(h.mainConf(false), "ipam", svcRange)} },
			code:    types.ErrInvalidNetworkConfig,
			msg:     []string{"ipam subnet 10.96.7.0/24 overlaps service CIDR 10.96.0.0/16"},
		},
		{
			// What only the user can fix comes first: a restarted agent
			// would not make this ADD work.
			name: "missing master while the datapath is not loaded",
			plugins: func() []map[string]any {
				return []map[string]any{with(h.mainConf(false), "master", "eth9", "bpffs", h.bpffs+"_gone")}
			},
			code: types.ErrInvalidNetworkConfig,
			msg:  []string{`master "eth9" not found: set master to an existing NIC`},
		},
		{
			// skel refuses this only after the verb: host-local's ADD had
			// allocated, its skel then failed it, and the rollback skipped
			// the release of an ADD that "failed" (the lease stayed, ADD
			// after ADD).
			name:  "plugin run inside CNI_NETNS",
			inPod: true,
			plugins: func() []map[string]any {
				return []map[string]any{with(h.mainConf(false), "bpffs", h.bpffs+"_gone")}
			},
			code: types.ErrInvalidNetNS,
			msg:  []string{"the plugin runs inside CNI_NETNS", "must run it from the host network namespace"},
		},
		{
			name: "datapath not loaded",
			plugins: func() []map[string]any {
				return []map[string]any{with(h.mainConf(false), "bpffs", h.bpffs+"_gone")}
			},
			code: types.ErrTryAgainLater,
			msg:  []string{"underpass datapath not loaded in " + h.bpffs + "_gone: start underpassd"},
		},
		{
			name:    "endpoint programs missing from ep_progs",
			plugins: main,
			prep: func(t *testing.T, p *pod) func() {
				// What a half-removed datapath looks like: pods attached
				// now would run unchecked and uncounted.
				must(t, h.dp.Maps.EpProgs.Delete(uint32(loader.EpProgEgress)))
				return func() { must(t, h.dp.Maps.EpProgs.Put(uint32(loader.EpProgEgress), h.dp.Programs.EndpointEgress)) }
			},
			code: types.ErrTryAgainLater,
			msg:  []string{"underpass datapath in " + h.bpffs + " is incomplete (endpoint programs missing from ep_progs: slot 1 is empty): restart underpassd"},
		},
		{
			name: "IPAM exhausted",
			plugins: func() []map[string]any {
				return []map[string]any{with(h.mainConf(false), "ipam", ipamOne(u.IP4(160).Addr()))}
			},
			prep: func(t *testing.T, p *pod) func() {
				// Another container holds the only address.
				lease := filepath.Join(h.dataDir, "up-fail", u.IP4(160).Addr().String())
				must(t, os.MkdirAll(filepath.Dir(lease), 0o755))
				must(t, os.WriteFile(lease, []byte("someone-else\r\neth0"), 0o644))
				return func() { os.Remove(lease) }
			},
			code: types.ErrInternal,
			msg:  []string{"ipam host-local", "no IP addresses available"},
		},
		{
			name: "address registered to a live pod",
			plugins: func() []map[string]any {
				return []map[string]any{with(h.mainConf(false), "ipam", ipamOne(u.IP4(150).Addr()))}
			},
			prep: func(t *testing.T, p *pod) func() {
				// Its netns exists: a real duplicate, not a lost DEL. It is on
				// the pod's own parent (endpoints are keyed per parent: on
				// another parent the address would be another network's), so
				// the failed ADD leaves the parent to it; the undo removes
				// both, as the squatter's own DEL would.
				fakeEndpoint(t, "live-squatter", h.env.Node.Path, u.Index, u.IP4(150).Addr())
				return func() {
					id, _, _ := datapath.Find(&h.dp.Maps, "live-squatter", "eth0")
					must(t, datapath.Unregister(&h.dp.Maps, id))
					must(t, datapath.DeleteParent(&h.dp.Maps, u.Index))
					must(t, h.env.Node.Do(func() error { return attach.DetachEgress(h.dp.EgressTarget(attach.RoleParent, u.Index)) }))
				}
			},
			code: types.ErrInternal,
			msg:  []string{"address " + u.IP4(150).Addr().String() + " is in use by container live-squatter", "pod default/squatter"},
		},
		// Failpoints: a step fails after everything before it is in place
		// (the slave; IPAM; the parent and the registration; the programs).
		{name: "failure after the link", failpoint: "add-link", plugins: main, code: types.ErrInternal, msg: []string{"failpoint add-link"}},
		{name: "failure after IPAM", failpoint: "add-ipam", plugins: main, code: types.ErrInternal, msg: []string{"failpoint add-ipam"}},
		{name: "failure after registration", failpoint: "add-register", plugins: main, code: types.ErrInternal, msg: []string{"failpoint add-register"}},
		{name: "failure after attach", failpoint: "add-attach", plugins: main, code: types.ErrInternal, msg: []string{"failpoint add-attach"}},
		{
			name:    "parent program cannot be pinned",
			plugins: func() []map[string]any { return []map[string]any{h.mainConf(true)} },
			prep: func(t *testing.T, p *pod) func() {
				// A map pinned where the links directory goes: attaching
				// the parent fails after IPAM and the link are in place.
				links := filepath.Join(h.bpffs, "links")
				must(t, os.Remove(links))
				m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: 1})
				must(t, err)
				must(t, m.Pin(links))
				return func() {
					must(t, m.Unpin())
					m.Close()
					must(t, os.Mkdir(links, 0o700))
				}
			},
			code: types.ErrInternal,
			msg:  []string{"attach the hairpin program to parent eth0"},
		},
		{
			name:    "container already has the interface",
			plugins: func() []map[string]any { return []map[string]any{h.mainConf(false)} },
			prep: func(t *testing.T, p *pod) func() {
				veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "eth0"}, PeerName: "peer0"}
				must(t, p.ns.Netlink().LinkAdd(veth))
				// DEL removes CNI_IFNAME whoever made it, as the
				// reference plugins do; remove it here if it is still there.
				return func() {
					if l, err := p.ns.Netlink().LinkByName("eth0"); err == nil {
						must(t, p.ns.Netlink().LinkDel(l))
					}
				}
			},
			code: types.ErrInvalidNetworkConfig,
			msg:  []string{`the container already has an interface "eth0"`},
		},
		{
			name: "chained after a veth plugin",
			plugins: func() []map[string]any {
				return []map[string]any{{"type": "ptp", "ipam": h.hostLocal(false)}, {"type": "underpass", "bpffs": h.bpffs}}
			},
			code: types.ErrInternal,
			msg:  []string{`interface "eth0" in the container is a veth, not a macvlan or ipvlan slave`},
		},
		{
			name: "chained with a pod subnet in a service CIDR",
			plugins: func() []map[string]any {
				return []map[string]any{{"type": "macvlan", "master": "eth0", "ipam": svcRange}, {"type": "underpass", "bpffs": h.bpffs}}
			},
			code: types.ErrInvalidNetworkConfig,
			msg:  []string{"pod subnet 10.96.7.", "overlaps service CIDR 10.96.0.0/16"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := h.newPod(fmt.Sprintf("f%d", i))
			undo := func() {}
			if tc.prep != nil {
				undo = sync.OnceFunc(tc.prep(t, p))
				defer undo() // also when the test fails half-way
			}
			l := h.conflist("up-fail", ver, tc.plugins()...)
			if tc.failpoint != "" {
				h.failpoints(t, tc.failpoint+"=error")
			}
			var err error
			if tc.inPod {
				err = p.ns.Do(func() error {
					_, err := h.cni.AddNetworkList(context.Background(), l, p.rt())
					return err
				})
			} else {
				_, err = h.tryAdd(l, p)
			}
			wantCNIError(t, err, tc.code, tc.msg...)
			t.Logf("ADD failed as it should: %v", err)
			undo()
			chained := len(tc.plugins()) > 1
			if !chained {
				// The failed ADD rolled itself back.
				h.assertNoLeak(t, nil, p.ns)
			}
			// What a runtime does after a failed ADD (for a chain, it is
			// what removes the previous plugins' work); it must succeed.
			if err := h.tryDel(l, p); err != nil {
				t.Fatalf("DEL after the failed ADD: %v", err)
			}
			h.assertNoLeak(t, nil, p.ns)
		})
	}
}

// An address IPAM hands out that the datapath still has for a pod whose
// netns is gone (its DEL was lost) goes to the new pod.
func TestStaleOwnerEvicted(t *testing.T) {
	h := newHarness(t, harnessOpts{})
	u := h.env.Uplinks[0]
	addr := u.IP4(150).Addr()
	_, err := datapath.Register(&h.dp.Maps, datapath.Endpoint{
		ContainerID: "dead", IfName: "eth0", Netns: "/var/run/netns/underpass-test-long-gone", ParentIfindex: u.Index,
		Mode: loader.ModeMacvlan, MAC: net.HardwareAddr{2, 0, 0, 0, 0xde, 0xad}, Addrs: []netip.Prefix{netip.PrefixFrom(addr, 24)},
	})
	must(t, err)
	conf := h.mainConf(false)
	conf["ipam"] = map[string]any{"type": "host-local", "dataDir": h.dataDir, "ranges": []any{[]any{map[string]any{
		"subnet": u.Subnet4.String(), "rangeStart": addr.String(), "rangeEnd": addr.String(), "gateway": u.Gateway4.String(),
	}}}}
	l := h.conflist("up-stale", "1.1.0", conf)
	p := h.addPod(l, "p")
	if p.ip4 != addr {
		t.Fatalf("got %s, want %s", p.ip4, addr)
	}
	if id, _, _ := datapath.Find(&h.dp.Maps, "dead", "eth0"); id != 0 {
		t.Fatalf("stale endpoint %d still registered", id)
	}
	h.checkRegistered(t, p)
	h.baselineParents()
	h.del(l, p)
	h.assertNoLeak(t, nil, p.ns)
}
