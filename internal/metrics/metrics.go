// Package metrics exports the datapath's counters to Prometheus.
//
// The collector reads the pinned per-CPU maps when Prometheus scrapes and
// keeps nothing between scrapes: there is no polling loop to fall behind or
// burn CPU on an idle node, every scrape sees the kernel's current values,
// and an endpoint deleted from the maps simply stops being reported.
package metrics

import (
	"log/slog"
	"strconv"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
)

// Label names, fixed by the contract (docs/architecture.md). Every per-endpoint series carries
// endpointLabels; their values change only when the endpoint does.
var endpointLabels = []string{"endpoint", "pod", "namespace", "interface", "parent"}

func withLabel(extra ...string) []string {
	return append(append([]string{}, endpointLabels...), extra...)
}

// svcResults label underpass_service_translation_*: one per loader.SvcStat.
var svcResults = map[loader.SvcStat]string{
	loader.SvcStatTranslated: "translated", loader.SvcStatReversed: "reversed", loader.SvcStatNewFlows: "new_flow",
	loader.SvcStatNoSlot: "no_slot", loader.SvcStatStale: "stale", loader.SvcStatUntranslatable: "untranslatable",
}

// Options tune a Collector; the zero value exports everything.
type Options struct {
	// SkipGauges leaves out underpass_endpoints and underpass_live_services,
	// for a registry that has them already (underpassd registers its own).
	SkipGauges bool
	// Log receives collection errors (they are counted either way).
	Log *slog.Logger
}

// Collector is a prometheus.Collector over a datapath's maps.
type Collector struct {
	maps *loader.Maps
	opts Options

	packets, bytes             *prometheus.Desc
	wirePackets, wireBytes     *prometheus.Desc
	redirects, redirectBytes   *prometheus.Desc
	epDrops, stale, conflicts  *prometheus.Desc
	drops, dropBytes           *prometheus.Desc
	endpoints, liveSvcs, errsD *prometheus.Desc
	svcXlate, svcXlateBytes    *prometheus.Desc
	svc                        serviceDescs

	failures atomic.Uint64
}

// New returns a collector reading maps at every scrape. The maps must stay
// open as long as the collector is registered.
func New(maps *loader.Maps, opts Options) *Collector {
	if opts.Log == nil {
		opts.Log = slog.Default()
	}
	d := prometheus.NewDesc
	return &Collector{
		maps: maps,
		opts: opts,
		packets: d("underpass_endpoint_packets_total",
			"Packets seen by the endpoint's own programs: rx delivered to it, tx sent by it.", withLabel("direction"), nil),
		bytes: d("underpass_endpoint_bytes_total",
			"Bytes seen by the endpoint's own programs: rx delivered to it, tx sent by it.", withLabel("direction"), nil),
		wirePackets: d("underpass_endpoint_wire_packets_total",
			"Unicast frames from the wire for the endpoint, counted by XDP on the parent.", endpointLabels, nil),
		wireBytes: d("underpass_endpoint_wire_bytes_total",
			"Bytes of unicast frames from the wire for the endpoint, counted by XDP on the parent.", endpointLabels, nil),
		redirects: d("underpass_host_redirects_total",
			"Packets hairpinned on the parent between the host and the endpoint.", withLabel("direction"), nil),
		redirectBytes: d("underpass_host_redirect_bytes_total",
			"Bytes hairpinned on the parent between the host and the endpoint.", withLabel("direction"), nil),
		epDrops: d("underpass_endpoint_drops_total",
			"Packets of the endpoint dropped by the datapath, by reason.", withLabel("reason"), nil),
		stale: d("underpass_stale_service_packets_total",
			"Packets the endpoint sent to a service IP that no longer exists: dropped, or rejected (answered with RST / port unreachable).", withLabel("action"), nil),
		conflicts: d("underpass_ip_conflicts_total",
			"ARP/ND frames from the wire claiming the endpoint's IP with another MAC.", endpointLabels, nil),
		drops: d("underpass_drops_total",
			"Packets dropped by the datapath on this node, by reason (all endpoints and the host).", []string{"reason"}, nil),
		dropBytes: d("underpass_drop_bytes_total",
			"Bytes dropped by the datapath on this node, by reason.", []string{"reason"}, nil),
		endpoints: d("underpass_endpoints",
			"Endpoints registered in the datapath.", nil, nil),
		liveSvcs: d("underpass_live_services",
			"Service IPs live in the datapath.", nil, nil),
		svcXlate: d("underpass_service_translation_packets_total",
			"services.mode ebpf: packets by what the pods' programs did: translated to a backend, reversed (a reply given the VIP back), new_flow (a backend chosen), no_slot (left to the host mid-update), stale (a Service without backends), untranslatable (SCTP to another port, left to the host).", []string{"result"}, nil),
		svcXlateBytes: d("underpass_service_translation_bytes_total",
			"services.mode ebpf: bytes by what the pods' programs did (see underpass_service_translation_packets_total).", []string{"result"}, nil),
		svc: newServiceDescs(),
		errsD: d("underpass_collection_errors_total",
			"Map reads that failed while collecting metrics; the scrape goes on without them.", nil, nil),
	}
}

// Describe implements prometheus.Collector.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.packets, c.bytes, c.wirePackets, c.wireBytes, c.redirects,
		c.redirectBytes, c.epDrops, c.stale, c.conflicts, c.drops, c.dropBytes, c.svcXlate, c.svcXlateBytes, c.errsD,
		c.svc.packets, c.svc.bytes, c.svc.flows, c.svc.failures, c.svc.entries, c.svc.capacity} {
		ch <- d
	}
	if !c.opts.SkipGauges {
		ch <- c.endpoints
		ch <- c.liveSvcs
	}
}

// Collect implements prometheus.Collector. A map that cannot be read is
// logged and counted, and the rest of the scrape still goes out: one bad
// read should not blank every dashboard.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	eps, err := datapath.Endpoints(c.maps)
	if err != nil {
		c.fail(err)
	}
	stats, err := datapath.AllEndpointStats(c.maps)
	if err != nil {
		c.fail(err)
	}
	seen := make(map[string]bool, len(eps))
	for id, ep := range eps {
		s, ok := stats[id]
		if !ok {
			// Registration writes the counters last and unregistration
			// deletes them first: an endpoint without counters is coming or
			// going, and a series of zeros would look like a counter reset.
			continue
		}
		c.collectEndpoint(ch, seen, &ep, &s)
	}

	if drops, err := datapath.Drops(c.maps); err != nil {
		c.fail(err)
	} else {
		for r, d := range drops {
			reason := loader.DropReason(r).String()
			ch <- prometheus.MustNewConstMetric(c.drops, prometheus.CounterValue, float64(d.Packets), reason)
			ch <- prometheus.MustNewConstMetric(c.dropBytes, prometheus.CounterValue, float64(d.Bytes), reason)
		}
	}

	if st, err := datapath.ServiceStats(c.maps); err != nil {
		c.fail(err)
	} else {
		for r, s := range st {
			result := svcResults[loader.SvcStat(r)]
			ch <- prometheus.MustNewConstMetric(c.svcXlate, prometheus.CounterValue, float64(s.Packets), result)
			ch <- prometheus.MustNewConstMetric(c.svcXlateBytes, prometheus.CounterValue, float64(s.Bytes), result)
		}
	}
	c.collectServices(ch)

	if !c.opts.SkipGauges {
		if eps != nil {
			ch <- prometheus.MustNewConstMetric(c.endpoints, prometheus.GaugeValue, float64(len(eps)))
		}
		if live, err := datapath.LiveServices(c.maps); err != nil {
			c.fail(err)
		} else {
			ch <- prometheus.MustNewConstMetric(c.liveSvcs, prometheus.GaugeValue, float64(len(live)))
		}
	}
	ch <- prometheus.MustNewConstMetric(c.errsD, prometheus.CounterValue, float64(c.failures.Load()))
}

func (c *Collector) collectEndpoint(ch chan<- prometheus.Metric, seen map[string]bool, ep *datapath.Endpoint, s *loader.EndpointStats) {
	name := ep.Name()
	// Two endpoints with one label set would fail the whole scrape; a
	// short container id shared by two live containers is all but
	// impossible, but the numeric id keeps them apart if it happens.
	key := name + "\x00" + ep.PodName + "\x00" + ep.PodNamespace + "\x00" + ep.IfName + "\x00" + ep.ParentName
	if seen[key] {
		name += "#" + strconv.FormatUint(uint64(ep.ID), 10)
	}
	seen[key] = true
	lv := []string{name, ep.PodName, ep.PodNamespace, ep.IfName, ep.ParentName}
	counter := func(d *prometheus.Desc, v uint64, extra ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), append(lv[:len(lv):len(lv)], extra...)...)
	}
	counter(c.packets, s.Rx.Packets, "rx")
	counter(c.packets, s.Tx.Packets, "tx")
	counter(c.bytes, s.Rx.Bytes, "rx")
	counter(c.bytes, s.Tx.Bytes, "tx")
	counter(c.wirePackets, s.WireRx.Packets)
	counter(c.wireBytes, s.WireRx.Bytes)
	counter(c.redirects, s.HostToEp.Packets, "host_to_endpoint")
	counter(c.redirects, s.EpToHost.Packets, "endpoint_to_host")
	counter(c.redirectBytes, s.HostToEp.Bytes, "host_to_endpoint")
	counter(c.redirectBytes, s.EpToHost.Bytes, "endpoint_to_host")
	for r, n := range s.Drops[:loader.DropMax] { // the rest: room for future reasons
		counter(c.epDrops, n, loader.DropReason(r).String())
	}
	counter(c.stale, s.StaleDropped, "dropped")
	counter(c.stale, s.StaleRejected, "rejected")
	counter(c.conflicts, s.IpConflicts)
}

func (c *Collector) fail(err error) {
	c.failures.Add(1)
	c.opts.Log.Error("collect datapath metrics", "error", err)
}
