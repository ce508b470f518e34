package cni_test

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/underpass-cni/underpass/internal/loader"
	"github.com/underpass-cni/underpass/test/netenv"
)

// tap counts every frame on one interface by direction, bytes included,
// through an AF_PACKET socket: the independent witness for the endpoint
// counters. Frames the interface sends are seen after tc egress (so a
// frame the endpoint program drops is not seen, as it is not counted as
// tx), frames it receives before tc ingress (the endpoint program counts
// every one of them as rx). Both see the whole frame, Ethernet header
// included, which is what skb->len is at tc.
type tap struct {
	fd   int
	stop atomic.Bool
	wg   sync.WaitGroup

	mu                    sync.Mutex
	rx, tx                loader.Counter
	echoReqOut, echoRepIn int // ICMP/ICMPv6 echo requests sent, replies received
}

type tapCounts struct {
	rx, tx                loader.Counter
	echoReqOut, echoRepIn int
}

func startTap(t *testing.T, n *netenv.NS, ifname string) *tap {
	t.Helper()
	tp := &tap{}
	err := n.Do(func() error {
		ifi, err := net.InterfaceByName(ifname)
		if err != nil {
			return err
		}
		// Protocol 0 receives nothing until bind, which also filters on the
		// interface: no frame of another interface slips in.
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifi.Index}); err != nil {
			unix.Close(fd)
			return err
		}
		// A bounded wait lets the reader notice stop.
		tv := unix.Timeval{Usec: 50000}
		if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
			unix.Close(fd)
			return err
		}
		tp.fd = fd
		return nil
	})
	if err != nil {
		t.Fatalf("tap on %s/%s: %v", n.Name, ifname, err)
	}
	tp.wg.Add(1)
	go tp.run()
	t.Cleanup(func() {
		tp.stop.Store(true)
		tp.wg.Wait()
		unix.Close(tp.fd)
	})
	return tp
}

func (tp *tap) run() {
	defer tp.wg.Done()
	buf := make([]byte, 1<<16+64)
	for !tp.stop.Load() {
		// MSG_TRUNC: the real length, even of a frame larger than buf.
		n, from, err := unix.Recvfrom(tp.fd, buf, unix.MSG_TRUNC)
		if err != nil {
			if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
				continue
			}
			continue // ENETDOWN while links change
		}
		sll, ok := from.(*unix.SockaddrLinklayer)
		if !ok {
			continue
		}
		frame := buf[:min(n, len(buf))]
		tp.mu.Lock()
		if sll.Pkttype == unix.PACKET_OUTGOING {
			tp.tx.Packets++
			tp.tx.Bytes += uint64(n)
			if isEcho(frame, true) {
				tp.echoReqOut++
			}
		} else {
			tp.rx.Packets++
			tp.rx.Bytes += uint64(n)
			if isEcho(frame, false) {
				tp.echoRepIn++
			}
		}
		tp.mu.Unlock()
	}
}

func (tp *tap) counts() tapCounts {
	tp.mu.Lock()
	defer tp.mu.Unlock()
	return tapCounts{rx: tp.rx, tx: tp.tx, echoReqOut: tp.echoReqOut, echoRepIn: tp.echoRepIn}
}

// isEcho reports an ICMP(v6) echo request (req) or reply.
func isEcho(f []byte, req bool) bool {
	if len(f) < 14 {
		return false
	}
	switch binary.BigEndian.Uint16(f[12:14]) {
	case unix.ETH_P_IP:
		b := f[14:]
		if len(b) < 20 || b[9] != unix.IPPROTO_ICMP {
			return false
		}
		ihl := int(b[0]&0xf) * 4
		if len(b) < ihl+1 {
			return false
		}
		return (req && b[ihl] == 8) || (!req && b[ihl] == 0)
	case unix.ETH_P_IPV6:
		b := f[14:]
		if len(b) < 41 || b[6] != unix.IPPROTO_ICMPV6 {
			return false
		}
		return (req && b[40] == 128) || (!req && b[40] == 129)
	}
	return false
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// snapshot reads the tap and the endpoint's counters at a quiet moment:
// the counters read the same before and after, and the tap the same around
// a pause long enough for any frame the program counted to reach the
// socket. Then both saw exactly the same frames.
func (h *harness) snapshot(t *testing.T, p *pod, tp *tap) (tapCounts, loader.EndpointStats) {
	t.Helper()
	for range 100 {
		s1 := h.stats(t, p)
		a := tp.counts()
		time.Sleep(40 * time.Millisecond)
		b := tp.counts()
		s2 := h.stats(t, p)
		if a == b && s1.Rx == s2.Rx && s1.Tx == s2.Tx {
			return a, s1
		}
	}
	t.Fatalf("pod %s never went quiet for 40 ms", p.name)
	return tapCounts{}, loader.EndpointStats{}
}

func sub(a, b loader.Counter) loader.Counter {
	return loader.Counter{Packets: a.Packets - b.Packets, Bytes: a.Bytes - b.Bytes}
}

// exactCounters runs traffic and checks that the endpoint's rx/tx counters
// moved by exactly what the tap saw on its interface, and that the tap saw
// every echo request go out and every reply come in (wantEchoes each).
func (h *harness) exactCounters(t *testing.T, p *pod, wantEchoes int, traffic func()) {
	t.Helper()
	tp := startTap(t, p.ns, p.ifname)
	tap0, ep0 := h.snapshot(t, p, tp)
	traffic()
	tap1, ep1 := h.snapshot(t, p, tp)

	dRx, dTx := sub(ep1.Rx, ep0.Rx), sub(ep1.Tx, ep0.Tx)
	tRx, tTx := sub(tap1.rx, tap0.rx), sub(tap1.tx, tap0.tx)
	echoes := tap1.echoReqOut - tap0.echoReqOut
	replies := tap1.echoRepIn - tap0.echoRepIn
	t.Logf("pod %s: endpoint counters rx %s tx %s; interface carried rx %s tx %s, %d echo requests out, %d replies in",
		p.name, fc(dRx), fc(dTx), fc(tRx), fc(tTx), echoes, replies)
	if dRx != tRx || dTx != tTx {
		t.Errorf("endpoint counters moved rx %s tx %s, the interface carried rx %s tx %s", fc(dRx), fc(dTx), fc(tRx), fc(tTx))
	}
	if echoes != wantEchoes || replies != wantEchoes {
		t.Errorf("interface saw %d echo requests and %d replies, want %d of each", echoes, replies, wantEchoes)
	}
	if dTx.Packets < uint64(wantEchoes) || dRx.Packets < uint64(wantEchoes) {
		t.Errorf("counters moved less than the echoes: rx %d tx %d < %d", dRx.Packets, dTx.Packets, wantEchoes)
	}
}

func fc(c loader.Counter) string { return fmt.Sprintf("%d pkts/%d B", c.Packets, c.Bytes) }
