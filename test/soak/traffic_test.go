package soak_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/underpass-cni/underpass/test/netenv"
)

// tryPing is netenv.Ping for background goroutines: a ping that cannot run
// at all (netenv.Ping calls Fatalf) comes back as an error instead of
// ending the caller.
func tryPing(t *testing.T, from *netenv.NS, dst netip.Addr, count int) (netenv.PingResult, error) {
	var fatal string
	res := make(chan netenv.PingResult, 1)
	done := make(chan struct{})
	go func() {
		defer close(done)
		res <- netenv.Ping(&bgTB{TB: t, rec: func(s string) { fatal = s }}, from, dst, count)
	}()
	<-done
	select {
	case r := <-res:
		return r, nil
	default:
		return netenv.PingResult{Dst: dst}, errors.New(fatal)
	}
}

// bgTB records a Fatalf and ends the goroutine it runs on (tryPing's own).
type bgTB struct {
	testing.TB
	rec func(string)
}

func (b *bgTB) Helper() {}

func (b *bgTB) Fatalf(format string, args ...any) {
	b.rec(fmt.Sprintf(format, args...))
	runtime.Goexit()
}

func (b *bgTB) Fatal(args ...any) {
	b.rec(fmt.Sprint(args...))
	runtime.Goexit()
}

// problems collects what went wrong on background goroutines, with a cap
// on how many are kept verbatim.
type problems struct {
	mu    sync.Mutex
	n     int
	items []string
}

func (p *problems) add(format string, args ...any) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.n++
	if len(p.items) < 50 {
		p.items = append(p.items, fmt.Sprintf(format, args...))
	}
}

func (p *problems) report(t *testing.T, what string) {
	t.Helper()
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, s := range p.items {
		t.Errorf("%s: %s", what, s)
	}
	if p.n > len(p.items) {
		t.Errorf("%s: … and %d more", what, p.n-len(p.items))
	}
}

// pingFlow pings dst from a netns in bursts until stopped.
type pingFlow struct {
	name       string
	from       *netenv.NS
	dst        netip.Addr
	sent, lost atomic.Int64
}

func (f *pingFlow) run(t *testing.T, stop <-chan struct{}, probs *problems) {
	for {
		select {
		case <-stop:
			return
		default:
		}
		start := time.Now()
		r, err := tryPing(t, f.from, f.dst, 10)
		if err != nil {
			probs.add("%s: %v", f.name, err)
			time.Sleep(100 * time.Millisecond)
			continue
		}
		f.sent.Add(int64(r.Sent))
		if lost := r.Lost(); lost > 0 {
			f.lost.Add(int64(lost))
			probs.add("%s: %d of %d lost in the burst started %s (%v)", f.name, lost, r.Sent, start.Format("15:04:05.000"), r)
		}
	}
}

// tcpFlow keeps one TCP connection from a netns to an echo server and
// exchanges small messages on it until stopped; an error reconnects. The
// deadline is generous: on a loaded 2-CPU machine the test process itself
// can be off the CPU for seconds, and a deadline that passes while it is
// fails the read whatever the network did. A real loss shows up as
// retransmissions (reported) and, if it lasts, as an error.
type tcpFlow struct {
	name             string
	from             *netenv.NS
	dst              netip.AddrPort
	roundTrips, errs atomic.Int64
	retrans          atomic.Int64 // segments retransmitted (TCP_INFO), all connections
	maxRTT           atomic.Int64 // slowest round trip, ns
}

const tcpDeadline = 10 * time.Second

func (f *tcpFlow) run(stop <-chan struct{}, probs *problems) {
	var c net.Conn
	closeConn := func() {
		f.retrans.Add(int64(totalRetrans(c)))
		c.Close()
		c = nil
	}
	defer func() {
		if c != nil {
			closeConn()
		}
	}()
	msg := make([]byte, 64)
	got := make([]byte, 64)
	for seq := uint64(0); ; seq++ {
		select {
		case <-stop:
			return
		default:
		}
		if c == nil {
			var err error
			if c, err = netenv.DialTCPConn(f.from, f.dst, tcpDeadline); err != nil {
				f.errs.Add(1)
				probs.add("%s: %s: %v", f.name, time.Now().Format("15:04:05.000"), err)
				time.Sleep(100 * time.Millisecond)
				continue
			}
		}
		binary.BigEndian.PutUint64(msg, seq)
		start := time.Now()
		_ = c.SetDeadline(start.Add(tcpDeadline))
		_, err := c.Write(msg)
		if err == nil {
			_, err = io.ReadFull(c, got)
		}
		if err == nil && !bytes.Equal(got, msg) {
			err = fmt.Errorf("echo of message %d came back as %x", seq, got[:8])
		}
		if err != nil {
			f.errs.Add(1)
			probs.add("%s: %s: round trip %d: %v", f.name, start.Format("15:04:05.000"), seq, err)
			closeConn()
			continue
		}
		if rtt := int64(time.Since(start)); rtt > f.maxRTT.Load() {
			f.maxRTT.Store(rtt)
		}
		f.roundTrips.Add(1)
		time.Sleep(5 * time.Millisecond)
	}
}

// totalRetrans reads tcpi_total_retrans of a TCP connection.
func totalRetrans(c net.Conn) uint32 {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return 0
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return 0
	}
	var n uint32
	_ = rc.Control(func(fd uintptr) {
		if info, err := unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO); err == nil {
			n = info.Total_retrans
		}
	})
	return n
}
