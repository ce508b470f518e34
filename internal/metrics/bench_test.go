package metrics_test

import (
	"fmt"
	"net"
	"net/http/httptest"
	"net/netip"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
	"github.com/underpass-cni/underpass/internal/metrics"
)

// BenchmarkCollect1000 times one scrape of a node with 1,000 endpoints
// (every series built, as promhttp does). The goal is well under 100 ms;
// it is reported, not asserted, because CI machines vary.
func BenchmarkCollect1000(b *testing.B) {
	reg := nodeOf(b, 1000)
	b.ResetTimer()
	start := time.Now()
	var series int
	for range b.N {
		fams, err := reg.Gather()
		must(b, err)
		series = 0
		for _, f := range fams {
			series += len(f.GetMetric())
		}
	}
	per := time.Since(start) / time.Duration(b.N)
	b.ReportMetric(float64(per.Microseconds())/1000, "ms/scrape")
	b.ReportMetric(float64(series), "series")
	b.Logf("1002 endpoints: %d series in %s per scrape (goal < 100ms)", series, per)
}

// BenchmarkScrapeHTTP1000 is BenchmarkCollect1000 plus what promhttp adds
// (text encoding, gzip off): the time Prometheus waits for underpassd.
func BenchmarkScrapeHTTP1000(b *testing.B) {
	reg := nodeOf(b, 1000)
	h := promhttp.HandlerFor(reg, promhttp.HandlerOpts{DisableCompression: true})
	b.ResetTimer()
	start := time.Now()
	var size int
	for range b.N {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
		if rec.Code != 200 {
			b.Fatalf("status %d", rec.Code)
		}
		size = rec.Body.Len()
	}
	per := time.Since(start) / time.Duration(b.N)
	b.ReportMetric(float64(per.Microseconds())/1000, "ms/scrape")
	b.ReportMetric(float64(size)/1024, "KiB/scrape")
}

// nodeOf is the rig with n more endpoints (addresses from 10.20.0.1 on),
// as n pods of one node, and a registry with its collector.
func nodeOf(b *testing.B, n int) *prometheus.Registry {
	b.Helper()
	m := &newRig(b).dp.Maps
	a := netip.MustParseAddr("10.20.0.0")
	for i := range n {
		a = a.Next()
		_, err := datapath.Register(m, datapath.Endpoint{
			ContainerID: fmt.Sprintf("%064x", i), IfName: "eth0", ParentIfindex: parentIfindex, ParentName: "lo",
			Mode: loader.ModeMacvlan, MAC: net.HardwareAddr{2, 1, 0, 0, byte(i >> 8), byte(i)},
			Addrs: []netip.Prefix{netip.PrefixFrom(a, 16)}, PodName: fmt.Sprintf("pod-%d", i), PodNamespace: "bench",
		})
		must(b, err)
	}
	reg := prometheus.NewRegistry()
	must(b, reg.Register(metrics.New(m, metrics.Options{})))
	return reg
}
