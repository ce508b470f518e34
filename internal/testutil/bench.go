package testutil

import (
	"testing"

	"github.com/cilium/ebpf"
)

// MeasureProg returns the mean ns per run of prog on frame over rounds of
// the kernel's own test-run loop (BPF_PROG_TEST_RUN, 100000 runs a round).
// check, unless nil, is given the program's return code of every round.
func MeasureProg(b *testing.B, prog *ebpf.Program, frame []byte, rounds int, check func(ret uint32)) float64 {
	b.Helper()
	const repeat = 100000
	var total float64
	for range rounds {
		ret, d, err := prog.Benchmark(frame, repeat, nil)
		if err != nil {
			b.Fatal(err)
		}
		if check != nil {
			check(ret)
		}
		total += float64(d.Nanoseconds())
	}
	return total / float64(rounds)
}

// ReportPerPacket reports raw, a mean MeasureProg found, as "raw-ns/pkt",
// and raw less overhead (the harness's own cost, measured alone) as
// "ns/pkt"; ns/op, which counts the whole loop, is zeroed.
func ReportPerPacket(b *testing.B, raw, overhead float64) {
	b.ReportMetric(raw, "raw-ns/pkt")
	b.ReportMetric(raw-overhead, "ns/pkt")
	b.ReportMetric(0, "ns/op")
}
