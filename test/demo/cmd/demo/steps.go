//go:build linux

package main

import (
	"context"
	"fmt"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/underpass-cni/underpass/test/demo"
	"github.com/underpass-cni/underpass/test/demo/kit"
)

// connectivity: host <-> pod through the hairpin, pod <-> pod.
func (d *demoRun) connectivity(ctx context.Context) {
	a, b := d.pods[0], d.pods[1]
	d.Section("4. Host <-> pod, through the hairpin on eth0 (plain macvlan cannot do this)")
	d.ping(a.ns, a.name, nodeAddr, "the node")
	d.ping(d.node, "the node", a.ip, a.name)
	d.ping(b.ns, b.name, nodeAddr, "the node")
	if ctx.Err() != nil {
		return
	}
	d.Section("5. Pod <-> pod (macvlan bridge mode, untouched)")
	d.ping(a.ns, a.name, b.ip, b.name)
	d.ping(b.ns, b.name, a.ip, a.name)
}

func (d *demoRun) ping(from *demo.NS, fromName string, dst netip.Addr, dstName string) {
	r, err := kit.Ping(from, dst, 3, time.Second)
	if err != nil {
		d.Fail("ping %s -> %s (%s): %v", fromName, dstName, dst, err)
		return
	}
	d.Check(r.Received == r.Sent, "ping %s -> %s (%s): %s", fromName, dstName, dst, r)
}

// services: the live VIP reaches the node, the deleted VIP is dropped, then
// refused once the config says reject.
func (d *demoRun) services(ctx context.Context) {
	a := d.pods[0]
	live := netip.AddrPortFrom(liveVIP, svcPort)
	stale := netip.AddrPortFrom(staleVIP, svcPort)

	d.Section("6. Services: steered to the node by map; deleted ones stopped at the node")
	r := kit.Dial(a.ns, live, 3*time.Second)
	switch {
	case r.Err != nil:
		d.Fail("live service %s from %s: %v", live, a.name, r.Err)
	case strings.Contains(r.Greeting, "GATEWAY"):
		d.Fail("live service %s from %s leaked to the gateway: %q", live, a.name, r.Greeting)
	default:
		d.OK("live service %s from %s: %q (connected in %s)", live, a.name, r.Greeting, kit.Round(r.Took))
	}
	if ctx.Err() != nil {
		return
	}

	leaks := d.leaks.Load()
	r, dropped, counter := d.dialStale(a, stale, time.Second, "dropped")
	switch {
	case d.leaks.Load() != leaks || r.Err == nil:
		d.Fail("deleted service %s from %s: it reached the gateway (%q, %v)", stale, a.name, r.Greeting, r.Err)
	case !r.TimedOut():
		d.Fail("deleted service %s from %s: want a silent drop (timeout), got %v", stale, a.name, r.Err)
	case counter != "" && dropped < 1:
		d.Fail("deleted service %s from %s: timed out, but the drop counter did not move%s", stale, a.name, counter)
	default:
		d.OK("deleted service %s from %s: dropped at the node (connect timed out after %s, the gateway saw nothing%s)", stale, a.name, kit.Round(r.Took), counter)
	}
	if ctx.Err() != nil {
		return
	}

	// Reject mode: the client fails in milliseconds instead of retrying.
	reloads := d.metrics().sum("underpass_config_reloads_total", "result", "success")
	if err := kit.WriteConfig(configPath, agentConfig("reject")); err != nil {
		d.Fail("switch to staleServices.action reject: %v", err)
		return
	}
	begin := time.Now()
	reloaded := false
	for time.Since(begin) < 15*time.Second && ctx.Err() == nil {
		if d.metrics().sum("underpass_config_reloads_total", "result", "success") > reloads {
			reloaded = true
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if !d.Check(reloaded, "config changed to staleServices.action: reject; underpassd reloaded it live after %s", time.Since(begin).Round(10*time.Millisecond)) {
		return
	}
	r, _, counter = d.dialStale(a, stale, 3*time.Second, "rejected")
	switch {
	case d.leaks.Load() != leaks || r.Err == nil:
		d.Fail("deleted service %s from %s: it reached the gateway (%q, %v)", stale, a.name, r.Greeting, r.Err)
	case !r.Refused():
		d.Fail("deleted service %s from %s: want connection refused, got %v", stale, a.name, r.Err)
	default:
		d.OK("deleted service %s from %s: connection refused after %s (a RST from the datapath%s)", stale, a.name, kit.Round(r.Took), counter)
	}
}

// dialStale dials the deleted service stale from p and returns the result,
// how much underpass_stale_service_packets_total{action=action} moved
// meanwhile and that as text for the step's line ("" when the agent does
// not expose the series).
func (d *demoRun) dialStale(p *pod, stale netip.AddrPort, timeout time.Duration, action string) (r kit.DialResult, moved float64, counter string) {
	const series = "underpass_stale_service_packets_total"
	before := d.metrics()
	r = kit.Dial(p.ns, stale, timeout)
	after := d.metrics()
	moved = after.sum(series, "action", action) - before.sum(series, "action", action)
	if after.has(series) {
		counter = fmt.Sprintf(`, %s{action=%q} +%g`, series, action, moved)
	}
	return r, moved, counter
}

// inspect shows underpassctl stats and the metrics.
func (d *demoRun) inspect(ctx context.Context) {
	d.Section("7. underpassctl stats (run in the node netns)")
	ctl := filepath.Join(d.bin, "underpassctl")
	if _, err := os.Stat(ctl); err != nil {
		d.Fail("underpassctl not found in %s: run make build", d.bin)
	} else {
		args := []string{"--bpffs", demo.BPFFS, "stats"}
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		out, err := d.node.Command(cctx, ctl, args...).CombinedOutput()
		cancel()
		if d.Check(err == nil, "underpassctl %s", strings.Join(args, " ")) {
			d.Detail("%s", out)
		} else {
			d.Detail("%v\n%s", err, out)
		}
	}

	d.Section("8. Metrics")
	code, body, err := d.agent.Get("/metrics")
	switch {
	case err != nil:
		d.Fail("http://%s/metrics (inside the node netns): %v", demo.MetricsAddr, err)
		return
	case code != http.StatusOK:
		d.Fail("http://%s/metrics (inside the node netns) answers %d", demo.MetricsAddr, code)
		return
	}
	d.OK("http://%s/metrics (inside the node netns) answers 200", demo.MetricsAddr)
	// The non-zero underpass series: what the steps above did.
	var lines []string
	all := 0
	for l := range strings.SplitSeq(body, "\n") {
		if !strings.HasPrefix(l, "underpass_") {
			continue
		}
		all++
		if f := strings.Fields(l); len(f) > 0 && f[len(f)-1] != "0" {
			lines = append(lines, l)
		}
	}
	if len(lines) > 20 {
		lines = append(lines[:20], fmt.Sprintf("… %d more", len(lines)-20))
	}
	lines = append(lines, fmt.Sprintf("(%d underpass_* series in all; the zero ones are not shown)", all))
	d.Detail("%s", strings.Join(lines, "\n"))
	fmt.Fprintf(d.Out, "\n  Try it yourself (in another terminal, while the demo runs):\n")
	fmt.Fprintf(d.Out, "    sudo nsenter --net=%s curl -s http://%s/metrics | grep ^underpass_\n", d.node.Path, demo.MetricsAddr)
	fmt.Fprintf(d.Out, "    sudo nsenter --net=%s %s --bpffs %s endpoints\n", d.node.Path, ctl, demo.BPFFS)
	fmt.Fprintf(d.Out, "    sudo nsenter --net=%s ping -c1 %s        # pod-a -> node, through the hairpin\n", d.pods[0].ns.Path, nodeAddr)
	fmt.Fprintf(d.Out, "    sudo bpftool map dump pinned %s/<map>    # the pinned maps, with BTF\n", demo.BPFFS)
}
