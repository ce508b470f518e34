package metrics

import (
	"strconv"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
)

// serviceDescs are the per-Service series of services.mode ebpf. Their
// labels are the Service ("namespace/name") and its port (name, or number):
// one series per Service port, whatever the number of clients, backends or
// address families, so the count stays that of the Services.
type serviceDescs struct {
	packets, bytes, flows, failures *prometheus.Desc
	entries, capacity               *prometheus.Desc
}

var serviceLabels = []string{"service", "port"}

func newServiceDescs() serviceDescs {
	d := prometheus.NewDesc
	return serviceDescs{
		packets: d("underpass_service_packets_total",
			"services.mode ebpf: packets of the Service port translated at the pods: to_backend (the clients' frames), from_backend (the replies given the VIP back).",
			append(serviceLabels, "direction"), nil),
		bytes: d("underpass_service_bytes_total",
			"services.mode ebpf: bytes of the Service port translated at the pods (see underpass_service_packets_total).",
			append(serviceLabels, "direction"), nil),
		flows: d("underpass_service_flows_total",
			"services.mode ebpf: flows to the Service port that picked a backend.", serviceLabels, nil),
		failures: d("underpass_service_backend_failures_total",
			"services.mode ebpf: frames to the Service port with no backend to give (no ready endpoint: stale; or a slot missing mid-update).", serviceLabels, nil),
		entries: d("underpass_service_flow_table_entries",
			"services.mode ebpf: entries in the programs' flow tables (svc_ct: flows, svc_rev: their reply direction, svc_affinity: ClientIP affinities). They are LRU maps: at capacity a new flow evicts the least recently used one.",
			[]string{"table"}, nil),
		capacity: d("underpass_service_flow_table_capacity",
			"services.mode ebpf: how many entries each flow table holds at most.", []string{"table"}, nil),
	}
}

// serviceSeries sums one Service port's frontends (an IPv4 and an IPv6 VIP).
type serviceSeries struct {
	to, from        loader.Counter
	flows, failures uint64
}

func (c *Collector) collectServices(ch chan<- prometheus.Metric) {
	counters, err := datapath.ServiceCounters(c.maps)
	if err != nil {
		c.fail(err)
	}
	series := map[[2]string]*serviceSeries{}
	for _, sc := range counters {
		k := [2]string{sc.Service, sc.PortName}
		if k[0] == "" { // a frontend without a Service (static, or from an older build)
			k[0] = sc.VIP.String()
		}
		if k[1] == "" {
			k[1] = strconv.Itoa(int(sc.Port))
		}
		s := series[k]
		if s == nil {
			s = &serviceSeries{}
			series[k] = s
		}
		s.to.Add(sc.ToBackend)
		s.from.Add(sc.FromBackend)
		s.flows += sc.Flows
		s.failures += sc.Failures
	}
	d := c.svc
	for k, s := range series {
		counter := func(desc *prometheus.Desc, v uint64, extra ...string) {
			ch <- prometheus.MustNewConstMetric(desc, prometheus.CounterValue, float64(v), append(k[:], extra...)...)
		}
		counter(d.packets, s.to.Packets, "to_backend")
		counter(d.packets, s.from.Packets, "from_backend")
		counter(d.bytes, s.to.Bytes, "to_backend")
		counter(d.bytes, s.from.Bytes, "from_backend")
		counter(d.flows, s.flows)
		counter(d.failures, s.failures)
	}

	usage, err := datapath.FlowTableUsage(c.maps)
	if err != nil {
		c.fail(err)
		return
	}
	for _, u := range usage {
		ch <- prometheus.MustNewConstMetric(d.entries, prometheus.GaugeValue, float64(u.Entries), u.Name)
		ch <- prometheus.MustNewConstMetric(d.capacity, prometheus.GaugeValue, float64(u.Capacity), u.Name)
	}
}
