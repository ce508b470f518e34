package ctl

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"golang.org/x/term"

	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
)

// StatsReport is the output of `underpassctl stats`; with --watch, one
// per interval, with rates.
type StatsReport struct {
	Time      time.Time              `json:"time"`
	Endpoints []EndpointStats        `json:"endpoints"`
	Drops     map[string]CounterView `json:"drops"` // node-wide, by reason
	// Interval is the time the rates are over (watch only, from the
	// second report on).
	Interval float64 `json:"intervalSeconds,omitempty"`
}

// EndpointStats are one endpoint's counters, summed over CPUs.
type EndpointStats struct {
	Endpoint       string            `json:"endpoint"`
	ID             uint32            `json:"id"`
	Pod            string            `json:"pod"`
	Namespace      string            `json:"namespace"`
	Interface      string            `json:"interface"`
	Parent         string            `json:"parent"`
	Rx             CounterView       `json:"rx"`
	Tx             CounterView       `json:"tx"`
	HostToEndpoint CounterView       `json:"hostToEndpoint"`
	EndpointToHost CounterView       `json:"endpointToHost"`
	WireRx         CounterView       `json:"wireRx"`
	StaleDropped   uint64            `json:"staleDropped"`
	StaleRejected  uint64            `json:"staleRejected"`
	Drops          map[string]uint64 `json:"drops"`
	IPConflicts    uint64            `json:"ipConflicts"`
	Rates          *Rates            `json:"rates,omitempty"`

	ep datapath.Endpoint
}

// Rates are per-second rates over the last watch interval.
type Rates struct {
	RxPackets, RxBytes, TxPackets, TxBytes float64
	HostToEndpoint, EndpointToHost, WireRx float64
	Stale, Drops                           float64
}

type statsFlagValues struct {
	watch    bool
	interval time.Duration
}

func (f *statsFlagValues) register(fs *flag.FlagSet) {
	fs.BoolVar(&f.watch, "watch", false, "refresh every interval with rates until interrupted")
	fs.DurationVar(&f.interval, "interval", time.Second, "refresh `interval` of --watch")
}

func runStats(ctx context.Context, env Env, o *options, dp *loader.Objects, f *statsFlagValues) error {
	if !f.watch {
		r, err := sampleStats(dp)
		if err != nil {
			return err
		}
		if o.output == "json" {
			return writeJSON(env.Stdout, r)
		}
		return printStats(env.Stdout, r, false)
	}
	if f.interval < 10*time.Millisecond {
		return fmt.Errorf("%w: --interval %s is too short", ErrUsage, f.interval)
	}
	return watch(ctx, env, o, dp, f.interval)
}

// watch samples every interval until ctx is done (Ctrl-C).
func watch(ctx context.Context, env Env, o *options, dp *loader.Objects, interval time.Duration) error {
	clear := isTerminal(env.Stdout) && o.output == "table"
	tick := time.NewTicker(interval)
	defer tick.Stop()
	var prev *StatsReport
	for {
		cur, err := sampleStats(dp)
		if err != nil {
			return err
		}
		if prev != nil {
			addRates(prev, cur)
		}
		if o.output == "json" {
			// One object per line: easy to pipe into jq --seq or a log.
			if err := json.NewEncoder(env.Stdout).Encode(cur); err != nil {
				return err
			}
		} else {
			var buf bytes.Buffer
			if clear {
				buf.WriteString("\x1b[H\x1b[2J")
			} else if prev != nil {
				buf.WriteString("\n")
			}
			fmt.Fprintf(&buf, "underpass stats every %s at %s (Ctrl-C to exit)\n\n", interval, cur.Time.Format(time.TimeOnly))
			if err := printStats(&buf, cur, true); err != nil {
				return err
			}
			// One write per frame, so the terminal never shows half a table.
			if _, err := env.Stdout.Write(buf.Bytes()); err != nil {
				return err
			}
		}
		prev = cur
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
	}
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	return ok && term.IsTerminal(int(f.Fd()))
}

func sampleStats(dp *loader.Objects) (*StatsReport, error) {
	m := &dp.Maps
	eps, err := datapath.Endpoints(m)
	if err != nil {
		return nil, err
	}
	stats, err := datapath.AllEndpointStats(m)
	if err != nil {
		return nil, err
	}
	drops, err := datapath.Drops(m)
	if err != nil {
		return nil, err
	}
	r := &StatsReport{Time: time.Now(), Endpoints: []EndpointStats{}, Drops: map[string]CounterView{}}
	for i, d := range drops {
		r.Drops[loader.DropReason(i).String()] = cv(d)
	}
	for id, ep := range eps {
		s, ok := stats[id]
		if !ok {
			continue // registering or going away
		}
		e := EndpointStats{
			Endpoint: ep.Name(), ID: id, Pod: ep.PodName, Namespace: ep.PodNamespace, Interface: ep.IfName, Parent: ep.ParentName,
			Rx: cv(s.Rx), Tx: cv(s.Tx), HostToEndpoint: cv(s.HostToEp),
			EndpointToHost: cv(s.EpToHost), WireRx: cv(s.WireRx),
			StaleDropped: s.StaleDropped, StaleRejected: s.StaleRejected, IPConflicts: s.IpConflicts,
			Drops: map[string]uint64{}, ep: ep,
		}
		for reason, n := range s.Drops[:loader.DropMax] {
			e.Drops[loader.DropReason(reason).String()] = n
		}
		r.Endpoints = append(r.Endpoints, e)
	}
	slices.SortFunc(r.Endpoints, func(a, b EndpointStats) int { return compareEndpoints(&a.ep, &b.ep) })
	return r, nil
}

// addRates fills cur's rates from the previous sample. An endpoint that was
// not in prev (new) gets none; counters that went down (the endpoint was
// re-created under the same id) count from zero.
func addRates(prev, cur *StatsReport) {
	secs := cur.Time.Sub(prev.Time).Seconds()
	if secs <= 0 {
		return
	}
	cur.Interval = secs
	old := map[uint32]*EndpointStats{}
	for i := range prev.Endpoints {
		old[prev.Endpoints[i].ID] = &prev.Endpoints[i]
	}
	rate := func(now, before uint64) float64 {
		if now < before {
			before = 0
		}
		return float64(now-before) / secs
	}
	for i := range cur.Endpoints {
		c := &cur.Endpoints[i]
		p, ok := old[c.ID]
		if !ok {
			continue
		}
		c.Rates = &Rates{
			RxPackets: rate(c.Rx.Packets, p.Rx.Packets), RxBytes: rate(c.Rx.Bytes, p.Rx.Bytes),
			TxPackets: rate(c.Tx.Packets, p.Tx.Packets), TxBytes: rate(c.Tx.Bytes, p.Tx.Bytes),
			HostToEndpoint: rate(c.HostToEndpoint.Packets, p.HostToEndpoint.Packets),
			EndpointToHost: rate(c.EndpointToHost.Packets, p.EndpointToHost.Packets),
			WireRx:         rate(c.WireRx.Packets, p.WireRx.Packets),
			Stale:          rate(c.StaleDropped+c.StaleRejected, p.StaleDropped+p.StaleRejected),
			Drops:          rate(sumDrops(c.Drops), sumDrops(p.Drops)),
		}
	}
}

func sumDrops(d map[string]uint64) uint64 {
	var n uint64
	for _, v := range d {
		n += v
	}
	return n
}

func dropList(d map[string]uint64) string {
	var out []string
	for _, k := range sortedKeys(d) {
		if d[k] > 0 {
			out = append(out, fmt.Sprintf("%s=%d", k, d[k]))
		}
	}
	return joinOr(out, "-")
}

func printStats(out io.Writer, r *StatsReport, rates bool) error {
	if len(r.Endpoints) == 0 {
		fmt.Fprintln(out, "no endpoints registered")
	} else {
		w := tabwriter.NewWriter(out, 0, 4, 2, ' ', tabwriter.AlignRight)
		if rates {
			fmt.Fprintln(w, "ENDPOINT\tPOD\tRX pps\tRX B/s\tTX pps\tTX B/s\tHOST>EP pps\tEP>HOST pps\tWIRE pps\tSTALE pps\tDROP pps\tCONFLICTS\t")
		} else {
			fmt.Fprintln(w, "ENDPOINT\tPOD\tRX PKTS\tRX BYTES\tTX PKTS\tTX BYTES\tHOST>EP\tEP>HOST\tWIRE RX\tSTALE DROP/REJ\tDROPS\tCONFLICTS\t")
		}
		for _, e := range r.Endpoints {
			pod := orDash(e.ep.PodRef())
			if !rates {
				fmt.Fprintf(w, "%s\t%s\t%d\t%s\t%d\t%s\t%d\t%d\t%d\t%d/%d\t%s\t%d\t\n", e.Endpoint, pod,
					e.Rx.Packets, humanBytes(float64(e.Rx.Bytes)), e.Tx.Packets, humanBytes(float64(e.Tx.Bytes)),
					e.HostToEndpoint.Packets, e.EndpointToHost.Packets, e.WireRx.Packets,
					e.StaleDropped, e.StaleRejected, dropList(e.Drops), e.IPConflicts)
				continue
			}
			if e.Rates == nil {
				fmt.Fprintf(w, "%s\t%s\t-\t-\t-\t-\t-\t-\t-\t-\t-\t%d\t\n", e.Endpoint, pod, e.IPConflicts)
				continue
			}
			rt := e.Rates
			fmt.Fprintf(w, "%s\t%s\t%s\t%s/s\t%s\t%s/s\t%s\t%s\t%s\t%s\t%s\t%d\t\n", e.Endpoint, pod,
				humanCount(rt.RxPackets), humanBytes(rt.RxBytes), humanCount(rt.TxPackets), humanBytes(rt.TxBytes),
				humanCount(rt.HostToEndpoint), humanCount(rt.EndpointToHost), humanCount(rt.WireRx),
				humanCount(rt.Stale), humanCount(rt.Drops), e.IPConflicts)
		}
		if err := w.Flush(); err != nil {
			return err
		}
	}
	var node []string
	for _, k := range sortedKeys(r.Drops) {
		if r.Drops[k].Packets > 0 {
			node = append(node, fmt.Sprintf("%s=%d", k, r.Drops[k].Packets))
		}
	}
	if len(node) == 0 {
		node = []string{"none"}
	}
	_, err := fmt.Fprintf(out, "\nnode drops (all endpoints and the host): %s\n", strings.Join(node, " "))
	return err
}
