package ctl_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/underpass-cni/underpass/internal/ctl"
	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
	"github.com/underpass-cni/underpass/internal/testutil"
)

const parentIfindex = 1 // lo: present everywhere, never attached to here

var must = testutil.Must

type rig struct {
	dp       *loader.Objects
	idA, idB uint32
}

func newRig(t *testing.T) *rig {
	t.Helper()
	dp := testutil.LoadDatapath(t)
	m := &dp.Maps
	must(t, datapath.SetConfig(m, datapath.Config{ServicesSynced: true, HostReachable: true, StaleReject: true}, 7))
	must(t, datapath.PutParent(m, parentIfindex, net.HardwareAddr{2, 0, 0, 0, 0, 1}, loader.ModeMacvlan))
	r := &rig{dp: dp}
	var err error
	r.idA, err = datapath.Register(m, datapath.Endpoint{
		ContainerID: "aaaa0123456789abcdef", IfName: "eth0", ParentIfindex: parentIfindex, ParentName: "lo",
		Mode: loader.ModeMacvlan, MAC: net.HardwareAddr{2, 0xaa, 0, 0, 0, 1},
		Addrs:   []netip.Prefix{netip.MustParsePrefix("192.0.2.10/24"), netip.MustParsePrefix("2001:db8::10/64")},
		PodName: "web-0", PodNamespace: "shop",
	})
	must(t, err)
	r.idB, err = datapath.Register(m, datapath.Endpoint{
		ContainerID: "bbbb0123456789abcdef", IfName: "net1", ParentIfindex: parentIfindex, ParentName: "lo",
		Mode: loader.ModeMacvlan, MAC: net.HardwareAddr{2, 0xbb, 0, 0, 0, 1},
		Addrs:   []netip.Prefix{netip.MustParsePrefix("192.0.2.11/24")},
		PodName: "db-0", PodNamespace: "shop",
	})
	must(t, err)
	must(t, datapath.SyncServiceCIDRs(m, []netip.Prefix{netip.MustParsePrefix("10.96.0.0/16")}))
	hosts := datapath.HostSet{}
	hosts.Add(netip.MustParsePrefix("192.0.2.2/32"), loader.HostLocal)
	hosts.Add(netip.MustParsePrefix("169.254.20.10/32"), loader.HostSteer)
	must(t, datapath.SyncHostCIDRs(m, hosts))
	_, _, err = datapath.SyncLiveServices(m, map[netip.Addr]bool{
		netip.MustParseAddr("10.96.0.1"): true, netip.MustParseAddr("10.96.0.10"): true})
	must(t, err)

	var s loader.EndpointStats
	s.Rx = loader.Counter{Packets: 10, Bytes: 2048}
	s.HostToEp = loader.Counter{Packets: 4, Bytes: 400}
	s.StaleDropped = 3
	s.Drops[loader.DropStaleService] = 3
	s.IpConflicts = 1
	r.setStats(t, r.idA, s)
	return r
}

func (r *rig) setStats(t *testing.T, id uint32, s loader.EndpointStats) {
	t.Helper()
	per := make([]loader.EndpointStats, ebpf.MustPossibleCPU())
	per[0] = s
	must(t, r.dp.Maps.EpStats.Update(id, per, ebpf.UpdateExist))
}

func (r *rig) ctl(t *testing.T, args ...string) string {
	t.Helper()
	var out, errOut bytes.Buffer
	err := ctl.Run(context.Background(), append([]string{"--bpffs", r.dp.Dir}, args...), ctl.Env{Stdout: &out, Stderr: &errOut})
	if err != nil {
		t.Fatalf("underpassctl %s: %v (stderr %q)", strings.Join(args, " "), err, errOut.String())
	}
	return out.String()
}

func decode[T any](t *testing.T, s string) T {
	t.Helper()
	var v T
	dec := json.NewDecoder(strings.NewReader(s))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&v); err != nil {
		t.Fatalf("output is not the documented JSON: %v\n%s", err, s)
	}
	return v
}

// wantIn checks that out, what the command what printed, has each of wants.
func wantIn(t *testing.T, what, out string, wants ...string) {
	t.Helper()
	for _, want := range wants {
		if !strings.Contains(out, want) {
			t.Errorf("%s lacks %q:\n%s", what, want, out)
		}
	}
}

func TestStatus(t *testing.T) {
	r := newRig(t)
	out := r.ctl(t, "status")
	wantIn(t, "status", out, "loaded, pinned in "+r.dp.Dir, "host reachability on, stale services reject, generation 7",
		"2 registered", "2 live service IPs, 1 service CIDRs, 2 host CIDRs", "lo", "macvlan",
		"endpoint programs:  shared programs in ep_progs")
	st := decode[ctl.Status](t, r.ctl(t, "status", "-o", "json"))
	if !st.Loaded || st.BPFFS != r.dp.Dir || st.Endpoints.Registered != 2 || st.LiveServices != 2 ||
		st.Config.StaleAction != "reject" || st.Config.Generation != 7 {
		t.Errorf("status: %+v", st)
	}
	if len(st.Parents) != 1 || st.Parents[0].Name != "lo" || st.Parents[0].Egress != "none" || st.Parents[0].XDP != "off" ||
		st.Parents[0].Endpoints != 2 {
		t.Errorf("parents: %+v", st.Parents)
	}
	if !st.Kernel.TCX || !st.Kernel.RingBuf || !st.Kernel.XDP || st.Kernel.Release == "" {
		t.Errorf("kernel features on a 6.18 kernel: %+v", st.Kernel)
	}
	if st.Endpoints.Attach["none"] != 2 {
		t.Errorf("endpoint attachments: %+v", st.Endpoints.Attach)
	}
	if st.EndpointPrograms != "ok" {
		t.Errorf("endpoint programs: %q, want ok", st.EndpointPrograms)
	}

	// An emptied slot is what status must make plain: pods run unchecked.
	must(t, r.dp.Maps.EpProgs.Delete(uint32(loader.EpProgIngress)))
	out = r.ctl(t, "status")
	if want := "endpoint programs missing from ep_progs: slot 0 is empty: pods run unchecked and uncounted, restart underpassd"; !strings.Contains(out, want) {
		t.Errorf("status with an empty ep_progs slot lacks %q:\n%s", want, out)
	}
	must(t, r.dp.RestoreEndpointPrograms())
}

func TestEndpoints(t *testing.T) {
	r := newRig(t)
	out := r.ctl(t, "endpoints")
	wantIn(t, "endpoints", out, "aaaa01234567/eth0", "shop/web-0", "192.0.2.10/24,2001:db8::10/64", "bbbb01234567/net1", "shop/db-0")
	eps := decode[[]ctl.EndpointView](t, r.ctl(t, "-o", "json", "endpoints"))
	if len(eps) != 2 || eps[0].PodName != "db-0" || eps[1].PodName != "web-0" || eps[1].ID != r.idA ||
		len(eps[1].Addrs) != 2 || eps[1].MAC != "02:aa:00:00:00:01" || eps[1].Attach != "none" || eps[1].ParentName != "lo" {
		t.Errorf("endpoints: %+v", eps)
	}
}

func TestServices(t *testing.T) {
	r := newRig(t)
	out := r.ctl(t, "services")
	wantIn(t, "services", out, "stale services: reject", "10.96.0.0/16", "10.96.0.1\n", "10.96.0.10\n", "169.254.20.10/32", "steered", "node address")
	s := decode[ctl.Services](t, r.ctl(t, "services", "-o", "json"))
	if len(s.Live) != 2 || s.Live[0].String() != "10.96.0.1" || len(s.ServiceCIDRs) != 1 || len(s.HostCIDRs) != 2 ||
		!s.HostCIDRs[1].Local || !s.HostCIDRs[0].Steer {
		t.Errorf("services: %+v", s)
	}
	if s.Mode != "host" || len(s.Frontends) != 0 {
		t.Errorf("services mode %q with %d frontends, want host and none", s.Mode, len(s.Frontends))
	}

	// services.mode: ebpf shows what the pods' programs translate.
	m := &r.dp.Maps
	cfg, _, err := datapath.GetConfig(m)
	must(t, err)
	cfg.ServicesEBPF = true
	must(t, datapath.SetConfig(m, cfg, 9))
	must(t, datapath.SyncFrontends(m, []datapath.Frontend{
		{VIP: netip.MustParseAddr("10.96.0.10"), Port: 53, Proto: datapath.ProtoUDP, Service: "kube-system/kube-dns", PortName: "dns",
			Backends: []netip.AddrPort{netip.MustParseAddrPort("10.1.0.5:5353"), netip.MustParseAddrPort("10.1.0.6:5353")}},
		{VIP: netip.MustParseAddr("10.96.0.1"), Port: 443, Proto: datapath.ProtoTCP, Affinity: time.Hour},
	}))
	out = r.ctl(t, "services")
	wantIn(t, "services (ebpf)", out, "services mode: ebpf", "frontends (2):", "10.96.0.1:443/tcp", "none (stale)", "affinity 1h0m0s",
		"10.96.0.10:53/udp", "10.1.0.5:5353,10.1.0.6:5353", "(kube-system/kube-dns dns)  flows 0, failures 0")
	s = decode[ctl.Services](t, r.ctl(t, "services", "-o", "json"))
	if s.Mode != "ebpf" || len(s.Frontends) != 2 || s.Frontends[1].Frontend != "10.96.0.10:53/udp" || len(s.Frontends[1].Backends) != 2 ||
		s.Frontends[1].Service != "kube-system/kube-dns" || s.Frontends[1].Port != "dns" {
		t.Errorf("services (ebpf): %+v", s)
	}
}

func TestStats(t *testing.T) {
	r := newRig(t)
	out := r.ctl(t, "stats")
	wantIn(t, "stats", out, "aaaa01234567/eth0", "shop/web-0", "2.0 KiB", "stale_service=3", "3/0")
	rep := decode[ctl.StatsReport](t, r.ctl(t, "stats", "-o", "json"))
	if len(rep.Endpoints) != 2 {
		t.Fatalf("stats: %+v", rep)
	}
	a := rep.Endpoints[1]
	if a.ID != r.idA || a.Rx.Packets != 10 || a.Rx.Bytes != 2048 || a.HostToEndpoint.Packets != 4 || a.StaleDropped != 3 ||
		a.Drops["stale_service"] != 3 || a.IPConflicts != 1 || a.Rates != nil {
		t.Errorf("stats of a: %+v", a)
	}
}

func TestStatsWatch(t *testing.T) {
	r := newRig(t)
	ctx, cancel := context.WithCancel(context.Background())
	pr, pw := io.Pipe()
	done := make(chan error, 1)
	go func() {
		done <- ctl.Run(ctx, []string{"--bpffs", r.dp.Dir, "stats", "--watch", "--interval", "100ms", "-o", "json"},
			ctl.Env{Stdout: pw, Stderr: pw})
		pw.Close()
	}()
	sc := bufio.NewScanner(pr)
	sc.Buffer(nil, 1<<20)
	var reports []ctl.StatsReport
	for len(reports) < 3 && sc.Scan() {
		reports = append(reports, decode[ctl.StatsReport](t, sc.Text()))
		if len(reports) == 1 {
			// Traffic between two samples: 50 packets of 100 bytes.
			var s loader.EndpointStats
			s.Rx = loader.Counter{Packets: 60, Bytes: 2048 + 5000}
			r.setStats(t, r.idA, s)
		}
	}
	cancel()
	go func() { // drain until Run returns
		for sc.Scan() {
		}
	}()
	select {
	case err := <-done:
		must(t, err)
	case <-time.After(3 * time.Second):
		t.Fatal("--watch did not stop when its context ended (Ctrl-C)")
	}
	if len(reports) < 3 {
		t.Fatalf("%d reports", len(reports))
	}
	if reports[0].Interval != 0 || reports[0].Endpoints[1].Rates != nil {
		t.Errorf("first report has rates: %+v", reports[0])
	}
	second := reports[1]
	rt := second.Endpoints[1].Rates
	if second.Interval <= 0 || rt == nil {
		t.Fatalf("second report has no rates: %+v", second)
	}
	if got, want := rt.RxPackets*second.Interval, 50.0; got < want-0.01 || got > want+0.01 {
		t.Errorf("rx rate %.1f/s over %.3fs = %.2f packets, want 50", rt.RxPackets, second.Interval, got)
	}
}

func TestStatsWatchTable(t *testing.T) {
	r := newRig(t)
	ctx, cancel := context.WithTimeout(context.Background(), 250*time.Millisecond)
	defer cancel()
	var out bytes.Buffer
	must(t, ctl.Run(ctx, []string{"--bpffs", r.dp.Dir, "stats", "--watch", "--interval", "100ms"}, ctl.Env{Stdout: &out, Stderr: &out}))
	if n := strings.Count(out.String(), "underpass stats every 100ms"); n < 2 {
		t.Fatalf("%d frames:\n%s", n, out.String())
	}
	if !strings.Contains(out.String(), "RX pps") || strings.Contains(out.String(), "\x1b[") {
		t.Fatalf("frame (no terminal: no escape codes):\n%s", out.String())
	}
}

func TestNotLoaded(t *testing.T) {
	testutil.RequireRoot(t)
	dir := filepath.Join(testutil.MountBPFFS(t), "nothing-here")
	var out bytes.Buffer
	err := ctl.Run(context.Background(), []string{"--bpffs", dir, "status"}, ctl.Env{Stdout: &out, Stderr: &out})
	if err == nil || err.Error() != "datapath not loaded in "+dir+": start underpassd" {
		t.Fatalf("error %v", err)
	}
}

func TestUsage(t *testing.T) {
	for _, args := range [][]string{{}, {"nope"}, {"status", "-o", "yaml"}, {"status", "extra"}, {"--nope"}} {
		var out bytes.Buffer
		err := ctl.Run(context.Background(), args, ctl.Env{Stdout: &out, Stderr: &out})
		if !errors.Is(err, ctl.ErrUsage) {
			t.Errorf("%q: error %v, want a usage error", args, err)
		}
	}
	var out bytes.Buffer
	must(t, ctl.Run(context.Background(), []string{"help"}, ctl.Env{Stdout: &out, Stderr: &out}))
	if !strings.Contains(out.String(), "stats --watch") {
		t.Errorf("help: %s", out.String())
	}
}

// The OCI hook with what it leaves alone: it must never fail a container
// that is none of underpass's (the real hook under Podman: test/podman).
func TestOCIHookLeavesAlone(t *testing.T) {
	testutil.RequireRoot(t)
	tmp := t.TempDir()
	cfg := filepath.Join(tmp, "underpass.yaml")
	// lo is no macvlan parent, and this process's netns is the host's.
	must(t, os.WriteFile(cfg, []byte("bpffs: "+filepath.Join(tmp, "nothing-pinned")+"\nadopt: {parents: [lo]}\n"), 0o644))
	broken := filepath.Join(tmp, "broken.yaml")
	must(t, os.WriteFile(broken, []byte("adopt: {parents: [lo]\n"), 0o644))
	self := fmt.Sprintf(`{"ociVersion":"1.0.2","id":"c0ffee","status":"creating","pid":%d}`, os.Getpid())
	for _, c := range []struct {
		what, state, config string
		wantErr             string
	}{
		{"poststop (no pid)", `{"id":"c0ffee","status":"stopped"}`, cfg, ""},
		{"no agent config", self, filepath.Join(tmp, "absent.yaml"), ""},
		{"a container in the host's network", self, cfg, ""},
		{"a broken config, a container in the host's network", self, broken, ""},
		{"a broken config, a pid that is gone", `{"id":"c0ffee","status":"creating","pid":2147483646}`, broken, "broken.yaml"},
		{"not a state", "not json", cfg, "reading the container state on stdin"},
		{"a pid that is gone", `{"id":"c0ffee","status":"creating","pid":2147483646}`, cfg, "netns of pid 2147483646"},
	} {
		var out bytes.Buffer
		err := ctl.Run(context.Background(), []string{"oci-hook", "--config", c.config},
			ctl.Env{Stdin: strings.NewReader(c.state), Stdout: &out, Stderr: &out})
		switch {
		case c.wantErr == "" && err != nil:
			t.Errorf("%s: %v", c.what, err)
		case c.wantErr != "" && (err == nil || !strings.Contains(err.Error(), c.wantErr)):
			t.Errorf("%s: error %v, want one saying %q", c.what, err, c.wantErr)
		case out.Len() != 0:
			t.Errorf("%s: wrote %q", c.what, out.String())
		}
	}
}
