package netenv

import (
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// ListenTCP starts a TCP echo server on addr inside ns (port 0 picks a free
// port: read it from the listener's Addr); see ServeTCP.
func ListenTCP(tb testing.TB, ns *NS, addr netip.AddrPort) net.Listener {
	tb.Helper()
	return ServeTCP(tb, ns, addr, func(c net.Conn) {
		io.Copy(c, c) //nolint:errcheck // the peer decides when the echo ends
	})
}

// ServeTCP starts a TCP server on addr inside ns that runs handle on every
// connection, each in its own goroutine, and then closes it. The socket is
// created inside the namespace and stays there, while the accept loop runs
// on any thread. The listener and its connections are closed when the test
// ends, and ServeTCP waits for the handlers to return.
func ServeTCP(tb testing.TB, ns *NS, addr netip.AddrPort, handle func(net.Conn)) net.Listener {
	tb.Helper()
	var ln net.Listener
	err := ns.Do(func() error {
		var err error
		ln, err = net.Listen("tcp", addr.String())
		return err
	})
	if err != nil {
		tb.Fatalf("netenv: listen on %s in %s: %v", addr, ns.Name, err)
	}

	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		conns = map[net.Conn]struct{}{}
	)
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return // closed
			}
			mu.Lock()
			conns[c] = struct{}{}
			mu.Unlock()
			wg.Go(func() {
				handle(c)
				c.Close()
				mu.Lock()
				delete(conns, c)
				mu.Unlock()
			})
		}
	})
	tb.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return ln
}

// DialTCPConn connects to addr from inside ns. Errors keep their syscall
// cause, so errors.Is(err, syscall.ECONNREFUSED) tells a reset from a
// timeout.
func DialTCPConn(ns *NS, addr netip.AddrPort, timeout time.Duration) (net.Conn, error) {
	c, err := dialIn(ns, &net.Dialer{Timeout: timeout}, addr)
	if err != nil {
		return nil, fmt.Errorf("dial %s from %s: %w", addr, ns.Name, err)
	}
	return c, nil
}

// dialIn dials addr with d from inside ns.
func dialIn(ns *NS, d *net.Dialer, addr netip.AddrPort) (net.Conn, error) {
	var c net.Conn
	err := ns.Do(func() error {
		var err error
		c, err = d.Dial("tcp", addr.String())
		return err
	})
	return c, err
}

// DialTCPFrom is DialTCPConn from a source port of the caller's choice
// (the address is the route's), with SO_REUSEADDR: a client that takes a
// port again for a new connection, as a busy one's ports come round.
func DialTCPFrom(ns *NS, port uint16, addr netip.AddrPort, timeout time.Duration) (net.Conn, error) {
	d := net.Dialer{Timeout: timeout, LocalAddr: &net.TCPAddr{Port: int(port)},
		Control: func(_, _ string, rc syscall.RawConn) error {
			var serr error
			if err := rc.Control(func(fd uintptr) {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEADDR, 1)
			}); err != nil {
				return err
			}
			return serr
		}}
	c, err := dialIn(ns, &d, addr)
	if err != nil {
		return nil, fmt.Errorf("dial %s from %s port %d: %w", addr, ns.Name, port, err)
	}
	return c, nil
}

// DialTCP connects to addr from inside ns, closes the connection and returns
// the dial error, if any.
func DialTCP(ns *NS, addr netip.AddrPort, timeout time.Duration) error {
	c, err := DialTCPConn(ns, addr, timeout)
	if err != nil {
		return err
	}
	return c.Close()
}

// Echo dials addr (a ListenTCP echo server) from inside ns, writes msg and
// reads it back: an error if the dial, the write or the read fails or takes
// longer than timeout (each), or the echo differs.
func Echo(ns *NS, addr netip.AddrPort, msg string, timeout time.Duration) error {
	c, err := DialTCPConn(ns, addr, timeout)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	if _, err := io.WriteString(c, msg); err != nil {
		return fmt.Errorf("echo via %s from %s: %w", addr, ns.Name, err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil || string(got) != msg {
		return fmt.Errorf("echo via %s from %s: %q, %v", addr, ns.Name, got, err)
	}
	return nil
}
