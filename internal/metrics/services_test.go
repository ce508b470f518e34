package metrics_test

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
	"github.com/underpass-cni/underpass/internal/metrics"
)

// The per-Service series: one per Service port, the IPv4 and IPv6
// frontends of a dual-stack Service summed, the CPUs summed; a frontend
// without a Service name is labelled with its VIP; a Service removed from
// the tables leaves no series behind.
func TestServiceSeries(t *testing.T) {
	r := newRig(t)
	m := &r.dp.Maps
	be4 := netip.MustParseAddrPort("192.0.2.10:8080")
	be6 := netip.MustParseAddrPort("[2001:db8::10]:8080")
	web4 := datapath.Frontend{VIP: netip.MustParseAddr("10.96.0.10"), Port: 80, Proto: datapath.ProtoTCP,
		Backends: []netip.AddrPort{be4}, Service: "default/web", PortName: "http"}
	web6 := web4
	web6.VIP, web6.Backends = netip.MustParseAddr("fd00:96::10"), []netip.AddrPort{be6}
	static := datapath.Frontend{VIP: netip.MustParseAddr("10.96.0.53"), Port: 53, Proto: datapath.ProtoUDP,
		Backends: []netip.AddrPort{netip.MustParseAddrPort("192.0.2.11:53")}}
	table, err := datapath.OpenFrontendTable(m)
	must(t, err)
	must(t, table.Sync([]datapath.Frontend{web4, web6, static}))

	// What the programs would have counted, spread over the CPUs.
	bump := func(f datapath.Frontend, c loader.SvcCounters) {
		t.Helper()
		var s loader.Svc
		k := loader.SvcKey{Addr: f.VIP.As16(), Port: f.Port<<8 | f.Port>>8, L4proto: f.Proto}
		must(t, m.SvcFrontends.Lookup(&k, &s))
		per := make([]loader.SvcCounters, ebpf.MustPossibleCPU())
		per[len(per)-1] = c
		must(t, m.SvcCounters.Update(s.Id, per, ebpf.UpdateExist)) // the table created it
	}
	bump(web4, loader.SvcCounters{ToBackend: loader.Counter{Packets: 10, Bytes: 1000}, FromBackend: loader.Counter{Packets: 8, Bytes: 4000}, Flows: 2})
	bump(web6, loader.SvcCounters{ToBackend: loader.Counter{Packets: 5, Bytes: 600}, Flows: 1, Failures: 3})
	bump(static, loader.SvcCounters{ToBackend: loader.Counter{Packets: 1, Bytes: 70}, Flows: 1})

	c := metrics.New(m, metrics.Options{})
	got := gatherValues(t, c)
	for series, want := range map[string]float64{
		`underpass_service_packets_total{direction="to_backend",port="http",service="default/web"}`:   15,
		`underpass_service_packets_total{direction="from_backend",port="http",service="default/web"}`: 8,
		`underpass_service_bytes_total{direction="to_backend",port="http",service="default/web"}`:     1600,
		`underpass_service_bytes_total{direction="from_backend",port="http",service="default/web"}`:   4000,
		`underpass_service_flows_total{port="http",service="default/web"}`:                            3,
		`underpass_service_backend_failures_total{port="http",service="default/web"}`:                 3,
		`underpass_service_flows_total{port="53",service="10.96.0.53"}`:                               1,
		`underpass_service_flow_table_entries{table="svc_ct"}`:                                        0,
		`underpass_service_flow_table_capacity{table="svc_ct"}`:                                       float64(m.SvcCt.MaxEntries()),
		`underpass_service_flow_table_capacity{table="svc_affinity"}`:                                 float64(m.SvcAffinity.MaxEntries()),
	} {
		if v, ok := got[series]; !ok || v != want {
			t.Errorf("%s = %v (present %v), want %v", series, v, ok, want)
		}
	}

	// Gone from the tables: gone from the scrape, counters and names too.
	must(t, table.Sync([]datapath.Frontend{static}))
	for s := range gatherValues(t, c) {
		if strings.Contains(s, "default/web") {
			t.Errorf("%s still exported after the Service went", s)
		}
	}
	var id uint32
	var per []loader.SvcCounters
	var name loader.SvcName
	for mp, v := range map[*ebpf.Map]any{m.SvcCounters: &per, m.SvcNames: &name} {
		n := 0
		for it := mp.Iterate(); it.Next(&id, v); {
			n++
		}
		if n != 1 {
			t.Errorf("%s holds %d entries for 1 frontend", mp, n)
		}
	}
}

// A full flow table shows in the gauge: entries counted in batches.
func TestFlowTableEntries(t *testing.T) {
	r := newRig(t)
	m := &r.dp.Maps
	const n = 5000 // more than one batch
	for i := range n {
		k := loader.CtKey{ClientPort: uint16(i), L4proto: datapath.ProtoTCP}
		must(t, m.SvcCt.Update(&k, &loader.Ct{BackendId: 1}, ebpf.UpdateAny))
	}
	got := gatherValues(t, metrics.New(m, metrics.Options{}))
	if v := got[`underpass_service_flow_table_entries{table="svc_ct"}`]; v != n {
		t.Fatalf("svc_ct entries %v, want %d", v, n)
	}
}

// gatherValues is every series c exports, as `name{labels}` -> value.
func gatherValues(t *testing.T, c prometheus.Collector) map[string]float64 {
	t.Helper()
	reg := prometheus.NewPedanticRegistry()
	must(t, reg.Register(c))
	fams, err := reg.Gather()
	must(t, err)
	out := map[string]float64{}
	for _, f := range fams {
		for _, mt := range f.GetMetric() {
			var labels []string
			for _, l := range mt.GetLabel() {
				labels = append(labels, l.GetName()+"="+`"`+l.GetValue()+`"`)
			}
			name := f.GetName()
			if len(labels) > 0 {
				name += "{" + strings.Join(labels, ",") + "}"
			}
			v := mt.GetCounter().GetValue() + mt.GetGauge().GetValue()
			out[name] = v
		}
	}
	return out
}
