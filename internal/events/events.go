// Package events logs what the datapath reports through its ring buffer:
// today, IP conflicts (a host on the wire claiming an endpoint's address).
// A counter says that something happened; the log line says who: which pod,
// which address, which MAC to go and find on the network.
package events

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"
	"golang.org/x/sys/unix"

	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
)

// DefaultRepeatInterval bounds how often one conflict (same endpoint, same
// address, same MAC) is logged: a misconfigured host sends gratuitous ARPs
// every few seconds, forever, and must not drown the log.
const DefaultRepeatInterval = time.Minute

// Options tune a Reader.
type Options struct {
	Log *slog.Logger
	// RepeatInterval: a conflict seen again within it is counted, not
	// logged; the next line says how many were suppressed. Zero means
	// DefaultRepeatInterval, negative logs every event.
	RepeatInterval time.Duration
	// IfName resolves the parent's ifindex for the log (default: the
	// caller's netns, which is the agent's).
	IfName func(ifindex int) string
}

// Reader reads the events ring buffer of a datapath.
type Reader struct {
	rd        *ringbuf.Reader
	events    *ebpf.Map // the reader polls its fd: open until the reader closes
	endpoints *ebpf.Map
	opts      Options

	last map[conflictKey]*seen // only Run's goroutine touches it
}

type conflictKey struct {
	id   uint32
	addr netip.Addr
	mac  [6]byte
}

type seen struct {
	at         time.Time
	suppressed int
}

// New opens the ring buffer. It holds its own references to the maps, so
// the caller may close its loader.Objects while the reader runs.
func New(m *loader.Maps, opts Options) (*Reader, error) {
	if opts.Log == nil {
		opts.Log = slog.Default()
	}
	if opts.RepeatInterval == 0 {
		opts.RepeatInterval = DefaultRepeatInterval
	}
	if opts.IfName == nil {
		opts.IfName = ifName
	}
	evs, err := m.Events.Clone()
	if err != nil {
		return nil, fmt.Errorf("events: clone ring buffer: %w", err)
	}
	eps, err := m.Endpoints.Clone()
	if err != nil {
		evs.Close()
		return nil, fmt.Errorf("events: clone endpoints map: %w", err)
	}
	rd, err := ringbuf.NewReader(evs)
	if err != nil {
		evs.Close()
		eps.Close()
		return nil, fmt.Errorf("events: open ring buffer: %w", err)
	}
	return &Reader{rd: rd, events: evs, endpoints: eps, opts: opts, last: map[conflictKey]*seen{}}, nil
}

// Start opens the ring buffer and logs events in the background until ctx
// is done: the one call underpassd needs.
func Start(ctx context.Context, m *loader.Maps, opts Options) error {
	r, err := New(m, opts)
	if err != nil {
		return err
	}
	go func() {
		if err := r.Run(ctx); err != nil {
			r.opts.Log.Error("event reader stopped", "error", err)
		}
	}()
	return nil
}

// Run logs events until ctx is done, then releases the reader.
func (r *Reader) Run(ctx context.Context) error {
	defer r.endpoints.Close()
	defer r.events.Close()
	defer r.rd.Close()                                      // first: the reader goes before the map it polls
	stop := context.AfterFunc(ctx, func() { r.rd.Close() }) // wakes Read
	defer stop()
	var rec ringbuf.Record
	for {
		err := r.rd.ReadInto(&rec)
		if errors.Is(err, ringbuf.ErrClosed) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("events: read ring buffer: %w", err)
		}
		r.handle(rec.RawSample, time.Now())
	}
}

func (r *Reader) handle(raw []byte, now time.Time) {
	var ev loader.Event
	if _, err := binary.Decode(raw, binary.NativeEndian, &ev); err != nil {
		r.opts.Log.Warn("malformed datapath event", "bytes", len(raw), "error", err)
		return
	}
	switch loader.EventKind(ev.Kind) {
	case loader.EventIPConflict:
		r.conflict(&ev, now)
	default:
		// A newer datapath than this agent: say so once per kind would be
		// nicer, but kinds are added with the code that reads them.
		r.opts.Log.Debug("unknown datapath event", "kind", ev.Kind)
	}
}

func (r *Reader) conflict(ev *loader.Event, now time.Time) {
	addr := netip.AddrFrom16(ev.Addr).Unmap()
	mac := net.HardwareAddr(ev.Mac[:])
	k := conflictKey{id: ev.EpId, addr: addr, mac: ev.Mac}

	s := r.last[k]
	if s != nil && r.opts.RepeatInterval > 0 && now.Sub(s.at) < r.opts.RepeatInterval {
		s.suppressed++
		return
	}
	suppressed := 0
	if s != nil {
		suppressed = s.suppressed
	}
	r.last[k] = &seen{at: now}
	r.forget(now)

	proto := "arp"
	if ev.Proto == unix.ETH_P_IPV6 {
		proto = "nd"
	}
	attrs := []any{
		"ip", addr.String(),
		"mac", mac.String(),
		"endpoint_id", ev.EpId,
		"parent", r.opts.IfName(int(ev.Ifindex)),
		"via", proto,
	}
	var raw loader.Endpoint
	if err := r.endpoints.Lookup(ev.EpId, &raw); err == nil {
		ep := datapath.Decode(&raw)
		attrs = append(attrs, "endpoint", ep.Name(), "pod", ep.PodName, "namespace", ep.PodNamespace,
			"container_id", ep.ContainerID, "endpoint_mac", ep.MAC.String())
	} else {
		attrs = append(attrs, "endpoint", "(deleted since)")
	}
	if suppressed > 0 {
		attrs = append(attrs, "repeated", suppressed)
	}
	r.opts.Log.Warn("IP conflict: a host on the wire claims an endpoint's address", attrs...)
}

// forget drops conflicts not seen for a while, so the map stays small on a
// long-running agent.
func (r *Reader) forget(now time.Time) {
	if len(r.last) < 1024 {
		return
	}
	for k, s := range r.last {
		if now.Sub(s.at) > r.opts.RepeatInterval {
			delete(r.last, k)
		}
	}
}

func ifName(ifindex int) string {
	if ifi, err := net.InterfaceByIndex(ifindex); err == nil {
		return ifi.Name
	}
	return fmt.Sprintf("ifindex %d", ifindex)
}
