//go:build linux

package kit

import (
	"github.com/underpass-cni/underpass/test/netenv"

	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"syscall"
	"time"
)

// PingResult is what Ping saw.
type PingResult struct {
	Sent, Received int
	RTT            time.Duration // of the first reply
}

func (r PingResult) String() string {
	s := fmt.Sprintf("%d/%d replies", r.Received, r.Sent)
	if r.Received > 0 {
		s += fmt.Sprintf(", rtt %s", Round(r.RTT))
	}
	return s
}

// Round keeps a measured duration to three or so significant digits, for
// the demos' lines.
func Round(d time.Duration) time.Duration {
	switch {
	case d < time.Millisecond:
		return d.Round(time.Microsecond)
	case d < time.Second:
		return d.Round(10 * time.Microsecond)
	}
	return d.Round(time.Millisecond)
}

// Ping sends count ICMP echo requests to dst (IPv4) from inside n, 20 ms
// apart, and waits up to wait after the last one for the replies. It uses a
// raw socket (the demo runs as root), so it needs no ping(8) on the machine.
func Ping(n *netenv.NS, dst netip.Addr, count int, wait time.Duration) (PingResult, error) {
	var res PingResult
	var conn net.PacketConn
	if err := n.Do(func() error {
		var err error
		conn, err = net.ListenPacket("ip4:icmp", "0.0.0.0")
		return err
	}); err != nil {
		return res, fmt.Errorf("icmp socket in %s: %w", n.Name, err)
	}
	defer conn.Close()

	var idb [2]byte
	_, _ = rand.Read(idb[:])
	id := binary.BigEndian.Uint16(idb[:])
	var mu sync.Mutex // sentAt is written by the sender, read by the receiver
	sentAt := make([]time.Time, count)
	got := make([]bool, count)
	to := &net.IPAddr{IP: dst.AsSlice()}

	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 1500)
		for {
			k, from, err := conn.ReadFrom(buf)
			if err != nil {
				return // deadline or closed
			}
			// The kernel strips the IPv4 header of ip4:icmp sockets.
			m := buf[:k]
			if len(m) < 8 || m[0] != 0 /* echo reply */ || binary.BigEndian.Uint16(m[4:]) != id {
				continue
			}
			if a, ok := from.(*net.IPAddr); !ok || !a.IP.Equal(to.IP) {
				continue
			}
			seq := int(binary.BigEndian.Uint16(m[6:]))
			mu.Lock()
			if seq < count && !got[seq] {
				got[seq] = true
				res.Received++
				if res.Received == 1 {
					res.RTT = time.Since(sentAt[seq])
				}
			}
			all := res.Received == count
			mu.Unlock()
			if all {
				return
			}
		}
	}()
	for seq := range count {
		msg := echoRequest(id, uint16(seq))
		mu.Lock()
		sentAt[seq] = time.Now()
		mu.Unlock()
		if _, err := conn.WriteTo(msg, to); err != nil {
			// Unreachable and the like: counted as lost.
			res.Sent++
			continue
		}
		res.Sent++
		if seq < count-1 {
			time.Sleep(20 * time.Millisecond)
		}
	}
	_ = conn.SetReadDeadline(time.Now().Add(wait))
	<-done
	return res, nil
}

func echoRequest(id, seq uint16) []byte {
	m := make([]byte, 8+32)
	m[0] = 8 // echo request
	binary.BigEndian.PutUint16(m[4:], id)
	binary.BigEndian.PutUint16(m[6:], seq)
	copy(m[8:], "underpass demo ping payload 0123")
	binary.BigEndian.PutUint16(m[2:], checksum(m))
	return m
}

func checksum(b []byte) uint16 {
	var sum uint32
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(b[i])<<8 | uint32(b[i+1])
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	return ^uint16(sum)
}

// DialResult is the outcome of one TCP connect.
type DialResult struct {
	Took     time.Duration
	Greeting string // the first line the server sent, when connected
	Err      error  // nil: connected
}

// Refused reports a connect that failed with ECONNREFUSED (a RST).
func (r DialResult) Refused() bool { return isRefused(r.Err) }

// TimedOut reports a connect that got no answer within the timeout.
func (r DialResult) TimedOut() bool {
	var ne net.Error
	return errors.As(r.Err, &ne) && ne.Timeout()
}

// Dial connects to addr over TCP from inside n, with timeout, and reads the
// server's first line.
func Dial(n *netenv.NS, addr netip.AddrPort, timeout time.Duration) DialResult {
	var res DialResult
	var c net.Conn
	err := n.Do(func() error {
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		start := time.Now()
		var err error
		c, err = (&net.Dialer{}).DialContext(ctx, "tcp4", addr.String())
		res.Took = time.Since(start)
		return err
	})
	if err != nil {
		res.Err = err
		return res
	}
	defer c.Close()
	_ = c.SetReadDeadline(time.Now().Add(timeout))
	buf := make([]byte, 256)
	k, err := io.ReadAtLeast(c, buf, 1)
	if err != nil {
		res.Err = fmt.Errorf("connected, but read: %w", err)
		return res
	}
	line := string(buf[:k])
	for i, ch := range line {
		if ch == '\n' {
			line = line[:i]
			break
		}
	}
	res.Greeting = line
	return res
}

// Serve accepts TCP connections on addr inside n and greets each with
// greeting (one line). Each accepted connection's local address goes to
// onAccept, if set. Close the listener to stop.
func Serve(n *netenv.NS, addr string, greeting string, onAccept func(local netip.AddrPort)) (net.Listener, error) {
	var ln net.Listener
	if err := n.Do(func() error {
		var err error
		ln, err = net.Listen("tcp4", addr)
		return err
	}); err != nil {
		return nil, fmt.Errorf("listen on %s in %s: %w", addr, n.Name, err)
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			if onAccept != nil {
				if ap, err := netip.ParseAddrPort(c.LocalAddr().String()); err == nil {
					onAccept(ap)
				}
			}
			_ = c.SetWriteDeadline(time.Now().Add(time.Second))
			_, _ = io.WriteString(c, greeting+"\n")
			c.Close()
		}
	}()
	return ln, nil
}

func isRefused(err error) bool { return errors.Is(err, syscall.ECONNREFUSED) }
