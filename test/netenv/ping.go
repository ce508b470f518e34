package netenv

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Ping timing, as `ping -c N -i 0.01 -W 1`.
const (
	pingInterval = 10 * time.Millisecond
	pingWait     = time.Second // for replies after the last request
)

// PingResult says how many echo requests went out and how many came back.
type PingResult struct {
	Dst      netip.Addr
	Sent     int
	Received int   // distinct replies (duplicates are not counted)
	LastErr  error // last send/receive error (unreachable and the like), for messages
}

// Lost is the number of requests without a reply.
func (r PingResult) Lost() int { return r.Sent - r.Received }

func (r PingResult) String() string {
	s := fmt.Sprintf("ping %s: %d sent, %d received", r.Dst, r.Sent, r.Received)
	if r.LastErr != nil {
		s += fmt.Sprintf(" (last error: %v)", r.LastErr)
	}
	return s
}

// Ping sends count ICMP (IPv4) or ICMPv6 echo requests to dst from inside
// ns, one every 10 ms, and waits up to 1 s after the last one for replies:
// the behaviour of `ping -c count -i 0.01 -W 1`. It is implemented on a raw
// socket rather than by running ping(8), so it works wherever the test binary
// does (iputils is not installed everywhere, the VM initramfs has only
// busybox) and reports replies exactly. Loss is a result, not a failure; only
// a ping that cannot run at all fails the test.
func Ping(tb testing.TB, from *NS, dst netip.Addr, count int) PingResult {
	tb.Helper()
	r, err := ping(from, dst, count)
	if err != nil {
		tb.Fatalf("netenv: ping %s from %s: %v", dst, from.Name, err)
	}
	return r
}

// MustPing pings and fails the test unless every request got a reply.
func MustPing(tb testing.TB, from *NS, dst netip.Addr, count int) {
	tb.Helper()
	if r := Ping(tb, from, dst, count); r.Lost() != 0 {
		tb.Fatalf("from %s: %v", from.Name, r)
	}
}

func ping(from *NS, dst netip.Addr, count int) (PingResult, error) {
	dst = dst.Unmap()
	res := PingResult{Dst: dst}
	var token [8]byte
	var idb [2]byte
	if _, err := rand.Read(token[:]); err != nil {
		return res, err
	}
	if _, err := rand.Read(idb[:]); err != nil {
		return res, err
	}
	id := binary.BigEndian.Uint16(idb[:])

	err := from.Do(func() error {
		var fd int
		var err error
		var sa unix.Sockaddr
		if dst.Is4() {
			fd, err = unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_ICMP)
			sa = &unix.SockaddrInet4{Addr: dst.As4()}
		} else {
			fd, err = unix.Socket(unix.AF_INET6, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_ICMPV6)
			sa = &unix.SockaddrInet6{Addr: dst.As16(), ZoneId: zoneID(dst)}
		}
		if err != nil {
			return fmt.Errorf("raw socket: %w", err)
		}
		defer unix.Close(fd)
		// Connected: the kernel delivers only packets from dst to this socket.
		if err := unix.Connect(fd, sa); err != nil {
			return fmt.Errorf("connect: %w", err)
		}

		got := make([]bool, count)
		buf := make([]byte, 1500)
		// recvUntil reads replies until t or until all are in.
		recvUntil := func(t time.Time) {
			for res.Received < count {
				ms := int(time.Until(t).Milliseconds())
				if ms <= 0 {
					return
				}
				n, err := unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}, ms)
				if errors.Is(err, unix.EINTR) {
					continue
				}
				if err != nil || n == 0 {
					return
				}
				m, _, err := unix.Recvfrom(fd, buf, unix.MSG_DONTWAIT)
				if err != nil {
					// ICMP errors for a connected raw socket surface here.
					res.LastErr = err
					continue
				}
				if seq, ok := parseEchoReply(buf[:m], dst.Is4(), id, token[:]); ok && int(seq) < count && !got[seq] {
					got[seq] = true
					res.Received++
				}
			}
		}

		start := time.Now()
		for seq := range count {
			req := echoRequest(dst.Is4(), id, uint16(seq), token[:])
			res.Sent++
			if _, err := unix.Write(fd, req); err != nil {
				res.LastErr = err // no route and the like: a lost request
			}
			recvUntil(start.Add(time.Duration(seq+1) * pingInterval))
		}
		recvUntil(time.Now().Add(pingWait))
		return nil
	})
	return res, err
}

// zoneID resolves a link-local zone (numeric or an interface name); it runs
// inside the netns, so names resolve there.
func zoneID(a netip.Addr) uint32 {
	if a.Zone() == "" {
		return 0
	}
	if id, err := strconv.ParseUint(a.Zone(), 10, 32); err == nil {
		return uint32(id)
	}
	if ifi, err := net.InterfaceByName(a.Zone()); err == nil {
		return uint32(ifi.Index)
	}
	return 0
}

// echoRequest builds an ICMP echo request; the kernel fills in the ICMPv6
// checksum itself, the IPv4 one is computed here.
func echoRequest(v4 bool, id, seq uint16, payload []byte) []byte {
	typ := byte(128) // ICMPv6 echo request
	if v4 {
		typ = 8
	}
	b := []byte{typ, 0, 0, 0}
	b = binary.BigEndian.AppendUint16(b, id)
	b = binary.BigEndian.AppendUint16(b, seq)
	b = append(b, payload...)
	if v4 {
		binary.BigEndian.PutUint16(b[2:4], checksum(b))
	}
	return b
}

// parseEchoReply checks that p is our echo reply and returns its sequence
// number. IPv4 raw sockets return the IP header too, IPv6 ones do not.
func parseEchoReply(p []byte, v4 bool, id uint16, token []byte) (uint16, bool) {
	want := byte(129) // ICMPv6 echo reply
	if v4 {
		if len(p) < 20 {
			return 0, false
		}
		ihl := int(p[0]&0x0f) * 4
		if len(p) < ihl {
			return 0, false
		}
		p = p[ihl:]
		want = 0
	}
	if len(p) < 8+len(token) || p[0] != want || p[1] != 0 {
		return 0, false
	}
	if binary.BigEndian.Uint16(p[4:6]) != id || !bytes.Equal(p[8:8+len(token)], token) {
		return 0, false
	}
	return binary.BigEndian.Uint16(p[6:8]), true
}

func checksum(b []byte) uint16 {
	var sum uint32
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	return ^uint16(sum)
}
