package observability_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"log/slog"
	"net"
	"net/netip"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/underpass-cni/underpass/internal/attach"
	"github.com/underpass-cni/underpass/internal/ctl"
	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/events"
	"github.com/underpass-cni/underpass/test/netenv"
)

// pingFrame is the size of the frames netenv.Ping sends and gets back, as
// tc counts them (skb->len, Ethernet header included): 14 Ethernet + 20
// IPv4 + 8 ICMP + 8 payload.
const pingFrame = 14 + 20 + 8 + 8

// TestTrafficCounters: host -> pod pings of known size show up exactly in
// the host redirect counters of that pod (both directions) and in its own
// rx/tx counters; the other pod's series do not move.
func TestTrafficCounters(t *testing.T) {
	l := newLab(t)
	a := l.pod(t, "a", 10)
	b := l.pod(t, "b", 11)
	c := l.collector()
	labA := []string{"pod=a", "namespace=" + namespace, "interface=eth0", "parent=eth0"}

	// Warm up: neighbours resolved, so the counted window holds only pings.
	netenv.MustPing(t, l.env.Node, a.IP4.Addr(), 1)
	before := scrape(t, c)
	const n = 20
	netenv.MustPing(t, l.env.Node, a.IP4.Addr(), n)
	after := scrape(t, c)

	delta := func(name string, labels ...string) float64 {
		t.Helper()
		return after.get(t, name, labels...) - before.get(t, name, labels...)
	}
	for _, tc := range []struct {
		name   string
		labels []string
		want   float64
	}{
		{"underpass_host_redirects_total", []string{"direction=host_to_endpoint"}, n},
		{"underpass_host_redirects_total", []string{"direction=endpoint_to_host"}, n},
		{"underpass_host_redirect_bytes_total", []string{"direction=host_to_endpoint"}, n * pingFrame},
		{"underpass_host_redirect_bytes_total", []string{"direction=endpoint_to_host"}, n * pingFrame},
		{"underpass_endpoint_packets_total", []string{"direction=rx"}, n},
		{"underpass_endpoint_packets_total", []string{"direction=tx"}, n},
		{"underpass_endpoint_bytes_total", []string{"direction=rx"}, n * pingFrame},
		{"underpass_endpoint_bytes_total", []string{"direction=tx"}, n * pingFrame},
	} {
		if got := delta(tc.name, append(tc.labels, labA...)...); got != tc.want {
			t.Errorf("%s%v of pod a moved by %v, want %v", tc.name, tc.labels, got, tc.want)
		}
	}
	if got := delta("underpass_host_redirects_total", "pod=b", "direction=host_to_endpoint"); got != 0 {
		t.Errorf("pod b's host redirects moved by %v", got)
	}
	if got := after.get(t, "underpass_endpoints"); got != 2 {
		t.Errorf("underpass_endpoints = %v", got)
	}

	// Wire traffic (XDP) is counted for the pod it is addressed to.
	w := l.env.AddWireHost("w", l.up.IP4(50), netip.Prefix{})
	netenv.MustPing(t, w.NS, a.IP4.Addr(), 1)
	before = scrape(t, c)
	netenv.MustPing(t, w.NS, a.IP4.Addr(), n)
	after = scrape(t, c)
	if got := delta("underpass_endpoint_wire_packets_total", labA...); got != n {
		t.Errorf("wire packets of pod a moved by %v, want %d", got, n)
	}
	if got := delta("underpass_endpoint_wire_bytes_total", labA...); got != n*pingFrame {
		t.Errorf("wire bytes of pod a moved by %v, want %d", got, n*pingFrame)
	}

	// A deleted endpoint's series are gone at the next scrape.
	must(t, attach.DetachEndpoint(attach.EndpointOptions{ID: b.id, Ifindex: b.Index, Netns: b.Path}))
	must(t, datapath.Unregister(&l.dp.Maps, b.id))
	for k := range scrape(t, c) {
		if strings.Contains(k, "pod=b") {
			t.Errorf("deleted pod b still scraped: %s", k)
		}
	}
}

// TestStaleServiceNamesClient: a pod sending to a deleted ClusterIP shows
// up by name in underpass_stale_service_packets_total, dropped and (in
// reject mode) rejected, and in the drops by reason.
func TestStaleServiceNamesClient(t *testing.T) {
	l := newLab(t)
	client := l.pod(t, "client", 10)
	bystander := l.pod(t, "bystander", 11)
	c := l.collector()
	// Resolve the gateway first: the stale packets then go straight out.
	netenv.MustPing(t, client.NS, l.up.Gateway4, 1)
	before := scrape(t, c)

	const n = 5
	if r := netenv.Ping(t, client.NS, netenv.StaleVIP4, n); r.Received != 0 {
		t.Fatalf("ping to a stale VIP got answers: %v", r)
	}
	must(t, datapath.SetConfig(&l.dp.Maps, datapath.Config{ServicesSynced: true, HostReachable: true, StaleReject: true}, 2))
	start := time.Now()
	err := netenv.DialTCP(client.NS, netip.AddrPortFrom(netenv.StaleVIP4, 443), 3*time.Second)
	if err == nil || !strings.Contains(err.Error(), "refused") {
		t.Fatalf("dial to a stale VIP in reject mode: %v, want connection refused", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("reject took %s: the client should fail fast", d)
	}
	after := scrape(t, c)

	who := []string{"pod=client", "namespace=" + namespace}
	for _, tc := range []struct {
		name  string
		label string
		want  float64
	}{
		{"underpass_stale_service_packets_total", "action=dropped", n},
		{"underpass_stale_service_packets_total", "action=rejected", 1},
		{"underpass_endpoint_drops_total", "reason=stale_service", n},
		{"underpass_drops_total", "reason=stale_service", n},
	} {
		labels := append([]string{tc.label}, who...)
		if tc.name == "underpass_drops_total" {
			labels = []string{tc.label}
		}
		if got := after.get(t, tc.name, labels...) - before.get(t, tc.name, labels...); got != tc.want {
			t.Errorf("%s{%s} moved by %v, want %v", tc.name, strings.Join(labels, ","), got, tc.want)
		}
	}
	if got := after.get(t, "underpass_stale_service_packets_total", "pod="+bystander.name, "action=dropped"); got != 0 {
		t.Errorf("stale packets blamed on %s: %v", bystander.name, got)
	}
}

// TestIPConflict: a host on the wire announces a pod's IP with a
// gratuitous ARP. XDP on the parent counts exactly one conflict for that
// pod, and the event reader logs a line naming the pod and the MAC.
func TestIPConflict(t *testing.T) {
	l := newLab(t)
	victim := l.pod(t, "victim", 10)
	intruder := l.env.AddWireHost("intruder", l.up.IP4(60), netip.Prefix{})
	c := l.collector()

	recs := make(chan slog.Record, 16)
	rd, err := events.New(&l.dp.Maps, events.Options{Log: slog.New(recordHandler(recs)), IfName: l.ifName})
	must(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- rd.Run(ctx) }()
	defer func() {
		cancel()
		must(t, <-done)
	}()

	labels := []string{"pod=victim", "namespace=" + namespace}
	before := scrape(t, c).get(t, "underpass_ip_conflicts_total", labels...)
	sendGratuitousARP(t, intruder, victim.IP4.Addr())
	eventually(t, "the conflict counter", func() bool {
		return scrape(t, c).get(t, "underpass_ip_conflicts_total", labels...) > before
	})
	time.Sleep(200 * time.Millisecond) // nothing else may follow
	if got := scrape(t, c).get(t, "underpass_ip_conflicts_total", labels...) - before; got != 1 {
		t.Fatalf("underpass_ip_conflicts_total moved by %v, want exactly 1", got)
	}

	select {
	case rec := <-recs:
		attrs := map[string]string{}
		rec.Attrs(func(a slog.Attr) bool { attrs[a.Key] = a.Value.String(); return true })
		if attrs["pod"] != "victim" || attrs["namespace"] != namespace || attrs["mac"] != intruder.MAC.String() ||
			attrs["ip"] != victim.IP4.Addr().String() || attrs["parent"] != "eth0" || !strings.HasSuffix(attrs["endpoint"], "/eth0") {
			t.Fatalf("log line %q %v does not name the pod, the IP and the MAC %s", rec.Message, attrs, intruder.MAC)
		}
		if rec.Level != slog.LevelWarn {
			t.Errorf("conflict logged at %s", rec.Level)
		}
	case <-time.After(3 * time.Second):
		t.Fatal("no conflict logged")
	}
}

type recordHandler chan slog.Record

func (recordHandler) Enabled(context.Context, slog.Level) bool        { return true }
func (h recordHandler) Handle(_ context.Context, r slog.Record) error { h <- r.Clone(); return nil }
func (h recordHandler) WithAttrs([]slog.Attr) slog.Handler            { return h }
func (h recordHandler) WithGroup(string) slog.Handler                 { return h }

// sendGratuitousARP broadcasts "ip is at <from's MAC>" out of from's eth0
// through a raw packet socket, as a misconfigured host would.
func sendGratuitousARP(t *testing.T, from *netenv.Container, ip netip.Addr) {
	t.Helper()
	bcast := net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}
	frame := make([]byte, 0, 60)
	frame = append(frame, bcast...)
	frame = append(frame, from.MAC...)
	frame = binary.BigEndian.AppendUint16(frame, unix.ETH_P_ARP)
	frame = binary.BigEndian.AppendUint16(frame, 1) // Ethernet
	frame = binary.BigEndian.AppendUint16(frame, unix.ETH_P_IP)
	frame = append(frame, 6, 4)
	frame = binary.BigEndian.AppendUint16(frame, 1) // request
	frame = append(frame, from.MAC...)
	frame = append(frame, ip.AsSlice()...)
	frame = append(frame, 0, 0, 0, 0, 0, 0)
	frame = append(frame, ip.AsSlice()...)
	for len(frame) < 60 {
		frame = append(frame, 0)
	}
	must(t, from.Do(func() error {
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		sa := &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ARP), Ifindex: from.Index, Halen: 6}
		copy(sa.Addr[:], bcast)
		return unix.Sendto(fd, frame, 0, sa)
	}))
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// TestBpftoolPrettyPrints: the pinned maps carry BTF, so bpftool shows
// field names, not hex.
func TestBpftoolPrettyPrints(t *testing.T) {
	bpftool, err := exec.LookPath("bpftool")
	if err != nil {
		t.Fatal("bpftool not installed: make deps (apt-get install bpftool)")
	}
	l := newLab(t)
	l.pod(t, "named", 10)
	out, err := exec.Command(bpftool, "-j", "map", "dump", "pinned", filepath.Join(l.dp.Dir, "endpoints")).CombinedOutput()
	if err != nil {
		t.Fatalf("bpftool: %v\n%s", err, out)
	}
	// With BTF, bpftool -j adds "formatted": the value by field name.
	var dump []struct {
		Formatted struct {
			Value struct {
				PodName      string `json:"pod_name"`
				PodNamespace string `json:"pod_namespace"`
				Ifname       string `json:"ifname"`
			} `json:"value"`
		} `json:"formatted"`
	}
	if err := json.Unmarshal(out, &dump); err != nil {
		t.Fatalf("bpftool -j output: %v\n%s", err, out)
	}
	if len(dump) != 1 || !bytes.Contains(out, []byte(`"pod_name"`)) {
		t.Fatalf("no BTF field names in the dump:\n%s", out)
	}
	if v := dump[0].Formatted.Value; v.PodName != "named" || v.PodNamespace != namespace || v.Ifname != "eth0" {
		t.Fatalf("formatted value: %+v", v)
	}
	// Per-CPU counters too: every CPU's value by field name.
	out, err = exec.Command(bpftool, "-j", "map", "dump", "pinned", filepath.Join(l.dp.Dir, "ep_stats")).CombinedOutput()
	if err != nil || !bytes.Contains(out, []byte(`"host_to_ep"`)) {
		t.Fatalf("ep_stats dump: %v\n%s", err, out)
	}
}

// TestUnderpassctl runs the CLI against the lab's datapath from the node's
// netns, as an operator on the node would.
func TestUnderpassctl(t *testing.T) {
	l := newLab(t)
	p := l.pod(t, "web", 10)
	netenv.MustPing(t, l.env.Node, p.IP4.Addr(), 3)

	run := func(args ...string) string {
		t.Helper()
		var out, errOut bytes.Buffer
		must(t, l.env.Node.Do(func() error {
			return ctl.Run(context.Background(), append([]string{"--bpffs", l.dp.Dir}, args...), ctl.Env{Stdout: &out, Stderr: &errOut})
		}))
		return out.String()
	}

	var st ctl.Status
	must(t, json.Unmarshal([]byte(run("status", "-o", "json")), &st))
	if len(st.Parents) != 1 {
		t.Fatalf("parents: %+v", st.Parents)
	}
	par := st.Parents[0]
	if par.Name != "eth0" || par.Egress != "tcx" || par.XDP != string(l.xdp) || par.Endpoints != 1 {
		t.Errorf("parent: %+v (xdp attached %s)", par, l.xdp)
	}
	if st.Endpoints.Attach["tc"] != 1 || !st.Kernel.TCX || st.LiveServices != 1 || st.ServiceCIDRs != 1 {
		t.Errorf("status: %+v", st)
	}
	if st.Counters["host_to_endpoint"].Packets < 3 {
		t.Errorf("host->endpoint counter: %+v", st.Counters)
	}
	text := run("status")
	for _, want := range []string{"eth0", "tcx", string(l.xdp), "tc 1"} {
		if !strings.Contains(text, want) {
			t.Errorf("status lacks %q:\n%s", want, text)
		}
	}

	var eps []ctl.EndpointView
	must(t, json.Unmarshal([]byte(run("endpoints", "-o", "json")), &eps))
	if len(eps) != 1 || eps[0].PodName != "web" || eps[0].Attach != "tc" || eps[0].ParentName != "eth0" || eps[0].Netns != p.Path {
		t.Errorf("endpoints: %+v", eps)
	}

	var svc ctl.Services
	must(t, json.Unmarshal([]byte(run("services", "-o", "json")), &svc))
	if len(svc.Live) != 1 || svc.Live[0] != netenv.LiveVIP4 || len(svc.ServiceCIDRs) != 1 || svc.ServiceCIDRs[0] != netenv.SvcCIDR4 {
		t.Errorf("services: %+v", svc)
	}

	var rep ctl.StatsReport
	must(t, json.Unmarshal([]byte(run("stats", "-o", "json")), &rep))
	if len(rep.Endpoints) != 1 || rep.Endpoints[0].HostToEndpoint.Packets < 3 || rep.Endpoints[0].Rx.Packets < 3 {
		t.Errorf("stats: %+v", rep)
	}

	// Detached, and then another endpoint's programs on the interface:
	// the CLI reads the filters inside the pod's netns.
	must(t, attach.DetachEndpoint(attach.EndpointOptions{ID: p.id, Ifindex: p.Index, Netns: p.Path}))
	must(t, json.Unmarshal([]byte(run("endpoints", "-o", "json")), &eps))
	if len(eps) != 1 || eps[0].Attach != "none" {
		t.Errorf("detached endpoint shown as %+v", eps)
	}
	must(t, attach.Endpoint(l.dp.EndpointTarget(p.id+1, p.Path, p.Index)))
	must(t, json.Unmarshal([]byte(run("endpoints", "-o", "json")), &eps))
	if len(eps) != 1 || eps[0].Attach != "wrong-endpoint" {
		t.Errorf("endpoint with another's programs shown as %+v", eps)
	}
}
