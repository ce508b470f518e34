package netenv

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"

	"golang.org/x/sys/unix"
)

// SendForgedUDP4 sends one UDP datagram from a raw socket (IP_HDRINCL) in
// ns with the IPv4 source src, which need not be ns's own, to dst: what a
// container with CAP_NET_RAW (Docker's default) can do to forge a source.
func SendForgedUDP4(ns *NS, src, dst netip.Addr) error {
	return ns.Do(func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_RAW)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		return unix.Sendto(fd, ForgedUDP4(src, dst), 0, &unix.SockaddrInet4{Addr: dst.As4()})
	})
}

// ForgedUDP4 is an IPv4 UDP datagram from src to dst (port 9, discard),
// header and all, for a raw IPPROTO_RAW socket.
func ForgedUDP4(src, dst netip.Addr) []byte {
	pkt := make([]byte, 28)
	pkt[0], pkt[8], pkt[9] = 0x45, 64, unix.IPPROTO_UDP
	binary.BigEndian.PutUint16(pkt[2:], uint16(len(pkt)))
	s4, d4 := src.As4(), dst.As4()
	copy(pkt[12:16], s4[:])
	copy(pkt[16:20], d4[:])
	binary.BigEndian.PutUint16(pkt[20:], 40000)
	binary.BigEndian.PutUint16(pkt[22:], 9)
	binary.BigEndian.PutUint16(pkt[24:], 8)
	return pkt
}

// ForgedFrame4 is ForgedUDP4 in an Ethernet frame from srcMAC to dstMAC,
// its IPv4 checksum set, for a packet socket: it needs no route, neighbour
// or address of the sender's.
func ForgedFrame4(srcMAC, dstMAC net.HardwareAddr, src, dst netip.Addr) []byte {
	ip := ForgedUDP4(src, dst)
	binary.BigEndian.PutUint16(ip[10:], ipv4Checksum(ip[:20]))
	frame := append(append(append([]byte{}, dstMAC...), srcMAC...), 0x08, 0x00)
	frame = append(frame, ip...)
	for len(frame) < 60 {
		frame = append(frame, 0)
	}
	return frame
}

// SendFrames sends frames (Ethernet, each to the MAC it starts with) in
// turn from a packet socket on ifindex in ns, for as long as more(sent)
// says so. A tc filter that drops a frame makes its send fail with
// ENOBUFS: those are counted in refused.
func SendFrames(ns *NS, ifindex int, frames [][]byte, more func(sent int) bool) (sent, refused int, err error) {
	err = ns.Do(func() error {
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("packet socket: %w", err)
		}
		defer unix.Close(fd)
		to := make([]*unix.SockaddrLinklayer, len(frames))
		for i, f := range frames {
			to[i] = &unix.SockaddrLinklayer{Ifindex: ifindex, Halen: 6}
			copy(to[i].Addr[:], f[:6])
		}
		for ; more(sent); sent++ {
			i := sent % len(frames)
			if errors.Is(unix.Sendto(fd, frames[i], 0, to[i]), unix.ENOBUFS) {
				refused++
			}
		}
		return nil
	})
	return sent, refused, err
}
