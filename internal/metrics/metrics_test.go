package metrics_test

import (
	"bytes"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
	"github.com/underpass-cni/underpass/internal/metrics"
	itest "github.com/underpass-cni/underpass/internal/testutil"
)

const (
	// The program tests use loopback as the parent: BPF_PROG_TEST_RUN needs
	// a real device, and lo exists everywhere.
	parentIfindex = 1
	cidA          = "0123456789abcdef0123456789abcdef"
	cidB          = "fedcba9876543210fedcba9876543210"
)

type rig struct {
	dp       *loader.Objects
	idA, idB uint32
}

func newRig(tb testing.TB) *rig {
	tb.Helper()
	dp := itest.LoadDatapath(tb)
	m := &dp.Maps
	must(tb, datapath.SetConfig(m, datapath.Config{ServicesSynced: true, HostReachable: true}, 1))
	must(tb, datapath.PutParent(m, parentIfindex, itest.MACParent, loader.ModeMacvlan))
	r := &rig{dp: dp}
	r.idA = register(tb, m, cidA, "a", itest.IPA, itest.MACA)
	r.idB = register(tb, m, cidB, "b", itest.IPB, itest.MACB)
	return r
}

func register(tb testing.TB, m *loader.Maps, cid, pod string, ip netip.Addr, mac net.HardwareAddr) uint32 {
	tb.Helper()
	id, err := datapath.Register(m, datapath.Endpoint{
		ContainerID: cid, IfName: "eth0", ParentIfindex: parentIfindex, ParentName: "lo",
		Mode: loader.ModeMacvlan, MAC: mac, Addrs: []netip.Prefix{netip.PrefixFrom(ip, 24)},
		PodName: pod, PodNamespace: "default",
	})
	must(tb, err)
	return id
}

var must = itest.Must

// spread writes counters for id as if two CPUs had counted half each (one,
// when the machine has one): the collector must add them up.
func spread(tb testing.TB, m *loader.Maps, id uint32, total loader.EndpointStats) {
	tb.Helper()
	per := make([]loader.EndpointStats, ebpf.MustPossibleCPU())
	per[0] = total
	if len(per) > 1 {
		half := halve(&per[0])
		per[len(per)-1] = half
	}
	must(tb, m.EpStats.Update(id, per, ebpf.UpdateExist))
}

// halve moves half of every counter of s into the returned value.
func halve(s *loader.EndpointStats) loader.EndpointStats {
	var h loader.EndpointStats
	mv := func(dst, src *uint64) { *dst = *src / 2; *src -= *dst }
	for _, p := range []struct{ d, s *loader.Counter }{{&h.Rx, &s.Rx}, {&h.Tx, &s.Tx}, {&h.HostToEp, &s.HostToEp},
		{&h.EpToHost, &s.EpToHost}, {&h.WireRx, &s.WireRx}} {
		mv(&p.d.Packets, &p.s.Packets)
		mv(&p.d.Bytes, &p.s.Bytes)
	}
	mv(&h.StaleDropped, &s.StaleDropped)
	mv(&h.StaleRejected, &s.StaleRejected)
	for i := range h.Drops {
		mv(&h.Drops[i], &s.Drops[i])
	}
	mv(&h.IpConflicts, &s.IpConflicts)
	return h
}

// The labels of endpoints A and B's series.
var (
	labelsA = []string{`endpoint="0123456789ab/eth0"`, `interface="eth0"`, `namespace="default"`, `parent="lo"`, `pod="a"`}
	labelsB = []string{`endpoint="fedcba987654/eth0"`, `interface="eth0"`, `namespace="default"`, `parent="lo"`, `pod="b"`}
)

// The values of the labels that split a family, in the order the
// collector exposes them.
var (
	rxTx         = []string{"rx", "tx"}
	hairpin      = []string{"endpoint_to_host", "host_to_endpoint"}
	staleActions = []string{"dropped", "rejected"}
	dropReasons  = []string{"host_unreachable", "reject_failed", "routed_via_node", "service_translation_failed", "service_tuple_in_use", "spoofed_source", "stale_service", "unvetted_frame"}
)

// help is the HELP text of each family the tests expect.
var help = map[string]string{
	"underpass_endpoint_packets_total":      "Packets seen by the endpoint's own programs: rx delivered to it, tx sent by it.",
	"underpass_endpoint_bytes_total":        "Bytes seen by the endpoint's own programs: rx delivered to it, tx sent by it.",
	"underpass_endpoint_wire_packets_total": "Unicast frames from the wire for the endpoint, counted by XDP on the parent.",
	"underpass_host_redirects_total":        "Packets hairpinned on the parent between the host and the endpoint.",
	"underpass_host_redirect_bytes_total":   "Bytes hairpinned on the parent between the host and the endpoint.",
	"underpass_stale_service_packets_total": "Packets the endpoint sent to a service IP that no longer exists: dropped, or rejected (answered with RST / port unreachable).",
	"underpass_endpoint_drops_total":        "Packets of the endpoint dropped by the datapath, by reason.",
	"underpass_ip_conflicts_total":          "ARP/ND frames from the wire claiming the endpoint's IP with another MAC.",
	"underpass_endpoints":                   "Endpoints registered in the datapath.",
	"underpass_live_services":               "Service IPs live in the datapath.",
	"underpass_collection_errors_total":     "Map reads that failed while collecting metrics; the scrape goes on without them.",
	"underpass_drops_total":                 "Packets dropped by the datapath on this node, by reason (all endpoints and the host).",
	"underpass_drop_bytes_total":            "Bytes dropped by the datapath on this node, by reason.",
}

// family is one metric family as the text exposition has it.
type family struct {
	name   string
	series []string // `name{labels} value`
}

// text is f in the exposition format: HELP, TYPE (a counter when the
// name ends in _total, else a gauge), then the series.
func (f family) text() string {
	typ := "gauge"
	if strings.HasSuffix(f.name, "_total") {
		typ = "counter"
	}
	return fmt.Sprintf("# HELP %s %s\n# TYPE %s %s\n%s\n", f.name, help[f.name], f.name, typ, strings.Join(f.series, "\n"))
}

// series are name's series with the labels base: one with values[0] when
// key is "", else one per value of key (keyVals), with values in order.
// The labels come sorted by name, as in the exposition.
func series(name string, base []string, key string, keyVals []string, values []int) []string {
	if key == "" {
		keyVals = []string{""}
	}
	var out []string
	for i, kv := range keyVals {
		labels := slices.Clone(base)
		if key != "" {
			labels = append(labels, fmt.Sprintf("%s=%q", key, kv))
		}
		slices.Sort(labels)
		s := name
		if len(labels) > 0 {
			s += "{" + strings.Join(labels, ",") + "}"
		}
		out = append(out, fmt.Sprintf("%s %d", s, values[i]))
	}
	return out
}

// endpointFamily is a per-endpoint family: endpoint A's series with
// values a, then B's with b (see series).
func endpointFamily(name, key string, keyVals []string, a, b []int) family {
	return family{name, append(series(name, labelsA, key, keyVals, a), series(name, labelsB, key, keyVals, b)...)}
}

// nodeFamily is a family of the node as a whole (see series).
func nodeFamily(name, key string, keyVals []string, values ...int) family {
	return family{name, series(name, nil, key, keyVals, values)}
}

// compare checks that c exposes exactly fams for the families named in it.
func compare(t *testing.T, c prometheus.Collector, fams ...family) {
	t.Helper()
	var want strings.Builder
	var names []string
	for _, f := range fams {
		want.WriteString(f.text())
		names = append(names, f.name)
	}
	must(t, testutil.CollectAndCompare(c, strings.NewReader("\n"+want.String()), names...))
}

func TestCollect(t *testing.T) {
	r := newRig(t)
	m := &r.dp.Maps
	var s loader.EndpointStats
	s.Rx = loader.Counter{Packets: 11, Bytes: 1100}
	s.Tx = loader.Counter{Packets: 12, Bytes: 1200}
	s.HostToEp = loader.Counter{Packets: 13, Bytes: 1300}
	s.EpToHost = loader.Counter{Packets: 14, Bytes: 1400}
	s.WireRx = loader.Counter{Packets: 15, Bytes: 1500}
	s.StaleDropped, s.StaleRejected = 16, 17
	s.Drops[loader.DropStaleService] = 16
	s.Drops[loader.DropSpoofedSource] = 3
	s.IpConflicts = 2
	spread(t, m, r.idA, s)
	must(t, datapath.AddLiveService(m, netip.MustParseAddr("10.96.0.10")))
	must(t, datapath.AddLiveService(m, netip.MustParseAddr("10.96.0.11")))

	c := metrics.New(m, metrics.Options{})
	compare(t, c,
		endpointFamily("underpass_endpoint_packets_total", "direction", rxTx, []int{11, 12}, []int{0, 0}),
		endpointFamily("underpass_endpoint_bytes_total", "direction", rxTx, []int{1100, 1200}, []int{0, 0}),
		endpointFamily("underpass_endpoint_wire_packets_total", "", nil, []int{15}, []int{0}),
		endpointFamily("underpass_host_redirects_total", "direction", hairpin, []int{14, 13}, []int{0, 0}),
		endpointFamily("underpass_host_redirect_bytes_total", "direction", hairpin, []int{1400, 1300}, []int{0, 0}),
		endpointFamily("underpass_stale_service_packets_total", "action", staleActions, []int{16, 17}, []int{0, 0}),
		endpointFamily("underpass_endpoint_drops_total", "reason", dropReasons, []int{0, 0, 0, 0, 0, 3, 16, 0}, []int{0, 0, 0, 0, 0, 0, 0, 0}),
		endpointFamily("underpass_ip_conflicts_total", "", nil, []int{2}, []int{0}),
		nodeFamily("underpass_endpoints", "", nil, 2),
		nodeFamily("underpass_live_services", "", nil, 2),
		nodeFamily("underpass_collection_errors_total", "", nil, 0))

	problems, err := testutil.CollectAndLint(c)
	must(t, err)
	for _, p := range problems {
		t.Errorf("lint: %s: %s", p.Metric, p.Text)
	}
}

// TestProgramCounts runs the real parent program and checks that what it
// counts comes out under the right labels, drops included.
func TestProgramCounts(t *testing.T) {
	r := newRig(t)
	m := &r.dp.Maps
	must(t, datapath.SyncServiceCIDRs(m, []netip.Prefix{netip.MustParsePrefix("10.96.0.0/16")}))
	toA := echo(t, itest.MACParent, itest.MACA, itest.IPHost, itest.IPA)
	for range 3 {
		run(t, r.dp.Programs.ParentEgress, toA)
	}
	stale := echo(t, itest.MACB, itest.MACParent, itest.IPB, netip.MustParseAddr("10.96.0.99"))
	run(t, r.dp.Programs.ParentEgress, stale)

	c := metrics.New(m, metrics.Options{})
	compare(t, c,
		endpointFamily("underpass_host_redirects_total", "direction", hairpin, []int{0, 3}, []int{0, 0}),
		endpointFamily("underpass_host_redirect_bytes_total", "direction", hairpin, []int{0, 3 * len(toA)}, []int{0, 0}),
		endpointFamily("underpass_stale_service_packets_total", "action", staleActions, []int{0, 0}, []int{1, 0}),
		nodeFamily("underpass_drops_total", "reason", dropReasons, 0, 0, 0, 0, 0, 0, 1, 0),
		nodeFamily("underpass_drop_bytes_total", "reason", dropReasons, 0, 0, 0, 0, 0, 0, len(stale), 0))
}

func TestDeletedEndpointDisappears(t *testing.T) {
	r := newRig(t)
	c := metrics.New(&r.dp.Maps, metrics.Options{})
	// 21 series per endpoint (8 of them drop reasons); 8+8 node drops, 6+6
	// service translation results, 3+3 flow table gauges, 2 gauges, 1 error
	// counter. No frontend: no per-Service series.
	const perEndpoint, node = 21, 8 + 8 + 6 + 6 + 3 + 3 + 3
	if n := testutil.CollectAndCount(c); n != 2*perEndpoint+node {
		t.Fatalf("%d series with two endpoints", n)
	}
	must(t, datapath.Unregister(&r.dp.Maps, r.idB))
	reg := prometheus.NewPedanticRegistry()
	must(t, reg.Register(c))
	fams, err := reg.Gather()
	must(t, err)
	for _, f := range fams {
		for _, mt := range f.GetMetric() {
			for _, l := range mt.GetLabel() {
				if l.GetName() == "pod" && l.GetValue() == "b" {
					t.Fatalf("%s still reports the deleted endpoint", f.GetName())
				}
			}
		}
	}
	if n := testutil.CollectAndCount(c); n != perEndpoint+node {
		t.Fatalf("%d series with one endpoint", n)
	}
	if v := testutil.ToFloat64(gauge(t, c, "underpass_endpoints")); v != 1 {
		t.Fatalf("underpass_endpoints = %v after a delete", v)
	}
}

// gauge collects c and returns the single-series collector for name.
func gauge(t *testing.T, c prometheus.Collector, name string) prometheus.Collector {
	t.Helper()
	reg := prometheus.NewRegistry()
	must(t, reg.Register(c))
	fams, err := reg.Gather()
	must(t, err)
	for _, f := range fams {
		if f.GetName() == name && len(f.GetMetric()) == 1 {
			g := prometheus.NewGauge(prometheus.GaugeOpts{Name: name})
			g.Set(f.GetMetric()[0].GetGauge().GetValue())
			return g
		}
	}
	t.Fatalf("no single series %s", name)
	return nil
}

// TestSkipGauges registers next to the agent's own gauges of the same
// names: a duplicate would make the agent fail at start-up.
func TestSkipGauges(t *testing.T) {
	r := newRig(t)
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "underpass_endpoints", Help: "agent's"}, func() float64 { return 2 }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "underpass_live_services", Help: "agent's"}, func() float64 { return 0 }),
	)
	if err := reg.Register(metrics.New(&r.dp.Maps, metrics.Options{})); err == nil {
		t.Fatal("a collector with the gauges registered next to the agent's: the test proves nothing")
	}
	must(t, reg.Register(metrics.New(&r.dp.Maps, metrics.Options{SkipGauges: true})))
	if _, err := reg.Gather(); err != nil {
		t.Fatal(err)
	}
}

// TestCollectionErrors breaks one map: the error is counted and logged,
// and everything else is still reported.
func TestCollectionErrors(t *testing.T) {
	r := newRig(t)
	maps := r.dp.Maps
	broken, err := maps.Drops.Clone()
	must(t, err)
	must(t, broken.Close())
	maps.Drops = broken
	var logs bytes.Buffer
	c := metrics.New(&maps, metrics.Options{Log: slog.New(slog.NewTextHandler(&logs, nil))})
	compare(t, c, nodeFamily("underpass_collection_errors_total", "", nil, 1))
	if n := testutil.CollectAndCount(c, "underpass_host_redirects_total"); n != 4 {
		t.Fatalf("%d host redirect series with a broken drops map, want 4", n)
	}
	if !strings.Contains(logs.String(), "drop counters") {
		t.Fatalf("error not logged: %q", logs.String())
	}
}

// TestDuplicateLabels: two endpoints whose container ids share the short
// prefix, in the same pod: the scrape must not fail.
func TestDuplicateLabels(t *testing.T) {
	r := newRig(t)
	m := &r.dp.Maps
	for i, ip := range []string{"192.0.2.20", "192.0.2.21"} {
		_, err := datapath.Register(m, datapath.Endpoint{
			ContainerID: "aaaaaaaaaaaa-" + fmt.Sprint(i), IfName: "eth0", ParentIfindex: parentIfindex, ParentName: "lo",
			Mode: loader.ModeMacvlan, MAC: net.HardwareAddr{2, 0, 0, 0, 9, byte(i)},
			Addrs: []netip.Prefix{netip.MustParsePrefix(ip + "/24")}, PodName: "same", PodNamespace: "default",
		})
		must(t, err)
	}
	reg := prometheus.NewPedanticRegistry()
	must(t, reg.Register(metrics.New(m, metrics.Options{})))
	if _, err := reg.Gather(); err != nil {
		t.Fatal(err)
	}
}

func echo(tb testing.TB, smac, dmac net.HardwareAddr, src, dst netip.Addr) []byte {
	tb.Helper()
	return itest.Frame(tb,
		&layers.Ethernet{SrcMAC: smac, DstMAC: dmac, EthernetType: layers.EthernetTypeIPv4},
		&layers.IPv4{Version: 4, IHL: 5, TTL: 64, Protocol: layers.IPProtocolICMPv4, SrcIP: src.AsSlice(), DstIP: dst.AsSlice()},
		&layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(layers.ICMPv4TypeEchoRequest, 0), Id: 1, Seq: 1},
		gopacket.Payload("underpass-metrics-test-payload"))
}

// skbCtx is the prefix of struct __sk_buff up to ifindex.
type skbCtx struct {
	Len, PktType, Mark, QueueMapping, Protocol, VlanPresent, VlanTCI, VlanProto, Priority, IngressIfindex, Ifindex uint32
}

func run(tb testing.TB, prog *ebpf.Program, frame []byte) {
	tb.Helper()
	out := make([]byte, len(frame)+256)
	_, err := prog.Run(&ebpf.RunOptions{Data: frame, DataOut: out, Context: skbCtx{Ifindex: parentIfindex}, Repeat: 1})
	must(tb, err)
}
