package netenv

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// MarkerPort is the UDP port of barrier marker frames: IPv4 broadcasts from
// 0.0.0.0 (the unspecified source a pod may send from, as DHCP does) to the
// discard port, which nothing else in the lab sends and no stack answers.
// Not a frame of its own EtherType: underpass drops what it cannot vet from
// a pod, and a marker must take the path real traffic takes.
const MarkerPort = 9

var markerMagic = []byte("underpass-netenv-barrier")

// Counter counts frames seen on one interface (both directions: frames the
// interface receives and frames it sends) that a matcher accepts. It reads
// through an AF_PACKET socket, so it sees frames as the interface does,
// before any bridge or stack processing, and needs no tcpdump. Note that
// AF_PACKET gets VLAN-tagged frames with the tag stripped when the device
// (veth does) accelerates VLAN tags, so matchers must accept both forms.
type Counter struct {
	ifname string
	file   *os.File
	match  func([]byte) bool
	count  atomic.Uint64
	done   chan struct{}

	mu      sync.Mutex
	markers map[string]chan struct{} // barrier tokens still awaited
}

// StartCounter starts counting frames on ifname inside ns for which match
// returns true (nil counts every frame). Marker frames of Barrier are never
// counted. The counter stops when the test ends.
func StartCounter(tb testing.TB, ns *NS, ifname string, match func(frame []byte) bool) *Counter {
	tb.Helper()
	var fd int
	err := ns.Do(func() error {
		ifi, err := net.InterfaceByName(ifname)
		if err != nil {
			return fmt.Errorf("find %s: %w", ifname, err)
		}
		// Protocol 0 at socket() receives nothing; frames start flowing only
		// at bind, which filters on the interface. Otherwise frames of every
		// interface could slip in before the bind.
		fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("packet socket: %w", err)
		}
		sa := &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifi.Index}
		if err := unix.Bind(fd, sa); err != nil {
			unix.Close(fd)
			return fmt.Errorf("bind packet socket to %s: %w", ifname, err)
		}
		return nil
	})
	if err != nil {
		tb.Fatalf("netenv: counter on %s/%s: %v", ns.Name, ifname, err)
	}
	c := &Counter{
		ifname: ifname,
		// A non-blocking fd becomes pollable: Read parks in the Go netpoller
		// and Close wakes it, so stopping needs no timeout loop.
		file:    os.NewFile(uintptr(fd), "packet:"+ifname),
		match:   match,
		done:    make(chan struct{}),
		markers: map[string]chan struct{}{},
	}
	go c.run()
	tb.Cleanup(c.stop)
	return c
}

// Count returns the number of matching frames seen so far. Call Barrier first
// for an exact number.
func (c *Counter) Count() uint64 { return c.count.Load() }

func (c *Counter) run() {
	defer close(c.done)
	buf := make([]byte, 1<<16+64) // room for a GSO super-frame
	for {
		n, err := c.file.Read(buf)
		if err != nil {
			if errors.Is(err, os.ErrClosed) {
				return
			}
			continue // ENETDOWN and the like while links change: keep reading
		}
		frame := buf[:n]
		if tok, ok := parseMarker(frame); ok {
			c.mu.Lock()
			if ch, ok := c.markers[tok]; ok {
				close(ch)
				delete(c.markers, tok)
			}
			c.mu.Unlock()
			continue
		}
		if c.match == nil || c.match(frame) {
			c.count.Add(1)
		}
	}
}

func (c *Counter) stop() {
	c.file.Close()
	<-c.done
}

// Barrier makes Count exact: it sends a marker frame from ifname in ns and
// waits until this counter has read it. The packet socket queues frames in
// arrival order, so once the marker is read every frame that reached the
// counted interface before it has been counted. Send the marker from the side
// the counted traffic came from, after that traffic is over (a ping that
// returned, a dial that failed), so its frames are already ahead of the
// marker on the same path.
func (c *Counter) Barrier(tb testing.TB, ns *NS, ifname string) {
	tb.Helper()
	Barrier(tb, ns, ifname, c)
}

// Barrier is Counter.Barrier for several counters with a single broadcast
// marker frame.
func Barrier(tb testing.TB, ns *NS, ifname string, counters ...*Counter) {
	tb.Helper()
	tokb := make([]byte, 16)
	if _, err := rand.Read(tokb); err != nil {
		tb.Fatalf("netenv: barrier token: %v", err)
	}
	tok := string(tokb)
	waits := make([]chan struct{}, len(counters))
	for i, c := range counters {
		waits[i] = make(chan struct{})
		c.mu.Lock()
		c.markers[tok] = waits[i]
		c.mu.Unlock()
	}
	if err := InjectMarker(ns, ifname, tokb); err != nil {
		tb.Fatalf("netenv: barrier: %v", err)
	}
	timeout := time.After(5 * time.Second)
	for i, w := range waits {
		select {
		case <-w:
		case <-timeout:
			tb.Fatalf("netenv: barrier marker sent from %s/%s never reached the counter on %s: does that path lead there?",
				ns.Name, ifname, counters[i].ifname)
		}
	}
}

// InjectMarker sends one broadcast marker frame (EtherType MarkerEtherType,
// payload magic + token) out of ifname in ns. Counters drop it silently, and
// every stack in the lab ignores the unknown EtherType.
func InjectMarker(ns *NS, ifname string, token []byte) error {
	return ns.Do(func() error {
		ifi, err := net.InterfaceByName(ifname)
		if err != nil {
			return fmt.Errorf("find %s: %w", ifname, err)
		}
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("packet socket: %w", err)
		}
		defer unix.Close(fd)

		bcast := []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}
		payload := append(append(append([]byte{}, markerMagic...), byte(len(token))), token...)
		udpLen := 8 + len(payload)
		ip := []byte{0x45, 0, 0, 0, 0, 0, 0x40, 0, 1, 17, 0, 0, 0, 0, 0, 0, 255, 255, 255, 255}
		binary.BigEndian.PutUint16(ip[2:], uint16(20+udpLen))
		binary.BigEndian.PutUint16(ip[10:], ipv4Checksum(ip))
		frame := make([]byte, 0, 64)
		frame = append(frame, bcast...)
		frame = append(frame, ifi.HardwareAddr...)
		frame = binary.BigEndian.AppendUint16(frame, 0x0800)
		frame = append(frame, ip...)
		frame = binary.BigEndian.AppendUint16(frame, MarkerPort)
		frame = binary.BigEndian.AppendUint16(frame, MarkerPort)
		frame = binary.BigEndian.AppendUint16(frame, uint16(udpLen))
		frame = binary.BigEndian.AppendUint16(frame, 0) // no UDP checksum
		frame = append(frame, payload...)
		for len(frame) < 60 { // pad to the Ethernet minimum
			frame = append(frame, 0)
		}
		sa := &unix.SockaddrLinklayer{Protocol: htons(0x0800), Ifindex: ifi.Index, Halen: 6}
		copy(sa.Addr[:], bcast)
		if err := unix.Sendto(fd, frame, 0, sa); err != nil {
			return fmt.Errorf("send marker on %s: %w", ifname, err)
		}
		return nil
	})
}

func ipv4Checksum(h []byte) uint16 {
	var sum uint32
	for i := 0; i+1 < len(h); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(h[i:]))
	}
	for sum > 0xffff {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}

func parseMarker(frame []byte) (string, bool) {
	const udpOff = 14 + 20
	if len(frame) < udpOff+8 || binary.BigEndian.Uint16(frame[12:14]) != 0x0800 || frame[14] != 0x45 ||
		frame[23] != 17 || binary.BigEndian.Uint16(frame[udpOff+2:]) != MarkerPort {
		return "", false
	}
	p, ok := bytes.CutPrefix(frame[udpOff+8:], markerMagic)
	if !ok || len(p) < 1 || len(p) < 1+int(p[0]) {
		return "", false
	}
	return string(p[1 : 1+int(p[0])]), true
}

// MatchSrcMAC matches frames whose source MAC is mac.
func MatchSrcMAC(mac net.HardwareAddr) func([]byte) bool {
	mac = append(net.HardwareAddr(nil), mac...)
	return func(frame []byte) bool {
		return len(frame) >= 14 && bytes.Equal(frame[6:12], mac)
	}
}

// MatchDstIP matches IPv4 and IPv6 frames (optionally with one VLAN tag) whose
// destination address is addr.
func MatchDstIP(addr netip.Addr) func([]byte) bool {
	addr = addr.Unmap()
	return func(frame []byte) bool {
		p, ok := parseIP(frame)
		return ok && p.dst == addr
	}
}

// MatchSrcIP matches IP packets from addr.
func MatchSrcIP(addr netip.Addr) func([]byte) bool {
	addr = addr.Unmap()
	return func(frame []byte) bool {
		p, ok := parseIP(frame)
		return ok && p.src == addr
	}
}

// ipPacket is the little of a frame the matchers look at.
type ipPacket struct {
	src, dst netip.Addr
	proto    uint8  // IPv4 protocol or IPv6 next header (extension headers are not walked)
	l4       []byte // what follows the fixed IP header
}

func parseIP(frame []byte) (ipPacket, bool) {
	if len(frame) < 14 {
		return ipPacket{}, false
	}
	etype, off := binary.BigEndian.Uint16(frame[12:14]), 14
	if etype == unix.ETH_P_8021Q || etype == unix.ETH_P_8021AD {
		if len(frame) < 18 {
			return ipPacket{}, false
		}
		etype, off = binary.BigEndian.Uint16(frame[16:18]), 18
	}
	b := frame[off:]
	switch etype {
	case unix.ETH_P_IP:
		if len(b) < 20 || b[0]>>4 != 4 {
			return ipPacket{}, false
		}
		ihl := int(b[0]&0x0f) * 4
		if ihl < 20 || len(b) < ihl {
			return ipPacket{}, false
		}
		return ipPacket{
			src:   netip.AddrFrom4([4]byte(b[12:16])),
			dst:   netip.AddrFrom4([4]byte(b[16:20])),
			proto: b[9],
			l4:    b[ihl:],
		}, true
	case unix.ETH_P_IPV6:
		if len(b) < 40 || b[0]>>4 != 6 {
			return ipPacket{}, false
		}
		return ipPacket{
			src:   netip.AddrFrom16([16]byte(b[8:24])),
			dst:   netip.AddrFrom16([16]byte(b[24:40])),
			proto: b[6],
			l4:    b[40:],
		}, true
	}
	return ipPacket{}, false
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }
