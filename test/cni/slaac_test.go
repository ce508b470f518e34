package cni_test

import (
	"encoding/binary"
	"net"
	"net/netip"
	"os"
	"slices"
	"testing"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
	"github.com/underpass-cni/underpass/test/netenv"
)

// IPv6 on a router-advertised underlay: the wire's router sends a real RA,
// the pod's own kernel configures a SLAAC address (not from IPAM, which
// gives IPv4 only here) and runs DAD, the datapath learns the address from
// that DAD, and the pod talks from it. Before underpass learned addresses,
// every frame from it was dropped as spoofed_source.
func TestSLAACFromARealRouterAdvertisement(t *testing.T) {
	h, l := newMainHarness(t, "up-slaac", false)
	u := h.env.Uplinks[0]
	a := h.addFirstPod(l, "a")
	globalLearned := func() uint64 {
		s, err := datapath.GlobalStats(&h.dp.Maps)
		must(t, err)
		return s[loader.StatLearned].Packets
	}
	learnedBefore := globalLearned()

	// netenv turns DAD off in its namespaces (speed); a real pod's netns
	// has the kernel's default, DAD on, and that is what the datapath
	// learns from.
	must(t, a.ns.Do(func() error {
		return os.WriteFile("/proc/sys/net/ipv6/conf/eth0/accept_dad", []byte("1"), 0o644)
	}))
	sendRA(t, h.env.Wire, u)
	var slaac netip.Addr
	waitFor(t, "a SLAAC address on the pod, past DAD", func() bool {
		eth0, err := a.ns.Netlink().LinkByName("eth0")
		must(t, err)
		addrs, err := a.ns.Netlink().AddrList(eth0, netlink.FAMILY_V6)
		must(t, err)
		for _, ad := range addrs {
			ip, _ := netip.AddrFromSlice(ad.IP)
			if u.Subnet6.Contains(ip) && ad.Flags&unix.IFA_F_TENTATIVE == 0 {
				slaac = ip
				return true
			}
		}
		return false
	})
	t.Logf("pod configured %s itself (SLAAC)", slaac)
	_, ep := h.endpointOf(t, a)
	if learned := datapath.LearnedAddrs(&h.dp.Maps, ep); !slices.Contains(learned, slaac) {
		t.Fatalf("datapath learned %v, want %s among them", learned, slaac)
	}
	if d := globalLearned() - learnedBefore; d < 1 {
		t.Fatalf("learned counter moved by %d", d)
	}
	before := h.stats(t, a)
	netenv.MustPing(t, a.ns, u.Gateway6, 3)
	netenv.MustPing(t, h.env.Wire, slaac, 3)
	if d := h.stats(t, a).Drops[loader.DropSpoofedSource] - before.Drops[loader.DropSpoofedSource]; d != 0 {
		t.Fatalf("%d of the pod's own SLAAC frames dropped as spoofed", d)
	}
	h.del(l, a)
	h.assertNoLeak(t, nil, a.ns)
}

// sendRA sends one router advertisement for u's IPv6 subnet (on-link,
// autonomous) from the wire's router: its bridge, from its link-local
// address, to all nodes.
func sendRA(t *testing.T, wire *netenv.NS, u *netenv.Uplink) {
	t.Helper()
	br, err := wire.Netlink().LinkByName(u.Bridge)
	must(t, err)
	addrs, err := wire.Netlink().AddrList(br, netlink.FAMILY_V6)
	must(t, err)
	var ll net.IP
	for _, ad := range addrs {
		if ad.IP.IsLinkLocalUnicast() {
			ll = ad.IP
		}
	}
	if ll == nil {
		t.Fatalf("%s has no link-local address", u.Bridge)
	}
	prefix := make([]byte, 30)
	prefix[0] = byte(u.Subnet6.Bits())
	prefix[1] = 0xc0 // on-link, autonomous
	binary.BigEndian.PutUint32(prefix[2:], 86400)
	binary.BigEndian.PutUint32(prefix[6:], 14400)
	p16 := u.Subnet6.Addr().As16()
	copy(prefix[14:], p16[:])
	eth := &layers.Ethernet{SrcMAC: u.GatewayMAC, DstMAC: net.HardwareAddr{0x33, 0x33, 0, 0, 0, 1}, EthernetType: layers.EthernetTypeIPv6}
	ip6 := &layers.IPv6{Version: 6, HopLimit: 255, NextHeader: layers.IPProtocolICMPv6, SrcIP: ll, DstIP: net.ParseIP("ff02::1")}
	icmp := &layers.ICMPv6{TypeCode: layers.CreateICMPv6TypeCode(layers.ICMPv6TypeRouterAdvertisement, 0)}
	must(t, icmp.SetNetworkLayerForChecksum(ip6))
	ra := &layers.ICMPv6RouterAdvertisement{HopLimit: 64, RouterLifetime: 1800, Options: layers.ICMPv6Options{
		{Type: layers.ICMPv6OptSourceAddress, Data: u.GatewayMAC},
		{Type: layers.ICMPv6OptPrefixInfo, Data: prefix},
	}}
	buf := gopacket.NewSerializeBuffer()
	must(t, gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}, eth, ip6, icmp, ra))
	must(t, sendRaw(wire, br.Attrs().Index, buf.Bytes(), false))
}

// A pod squats on the IPv6 address IPAM hands out next: its DAD for it
// (any pod can send one, from a raw socket) makes the datapath learn it as
// the pod's. The next pod is assigned that address and must get it: IPAM
// is the authority, a learnt address yields, and the squatter's traffic
// from it is dropped as spoofed. Until December 2026 the next pod's ADD
// failed with "address in use" (blaming IPAM), so one pod could keep
// others from starting.
func TestAssignedAddressWinsOverALearntOne(t *testing.T) {
	h, l := newMainHarness(t, "up-squat", true)
	u := h.env.Uplinks[0]
	a := h.addFirstPod(l, "a")
	next := a.ip6.Next() // host-local hands out addresses in order
	netenv.MustPing(t, a.ns, u.Gateway6, 1)
	must(t, a.ns.Do(func() error {
		return os.WriteFile("/proc/sys/net/ipv6/conf/eth0/accept_dad", []byte("1"), 0o644)
	}))
	eth0, err := a.ns.Netlink().LinkByName("eth0")
	must(t, err)
	must(t, a.ns.Netlink().AddrAdd(eth0, &netlink.Addr{IPNet: &net.IPNet{IP: next.AsSlice(), Mask: net.CIDRMask(128, 128)}}))
	waitFor(t, "the datapath to learn the squatted address from pod a's DAD", func() bool {
		_, epA := h.endpointOf(t, a)
		return slices.Contains(datapath.LearnedAddrs(&h.dp.Maps, epA), next)
	})
	waitFor(t, "pod a's squatted address past DAD", func() bool {
		addrs, err := a.ns.Netlink().AddrList(eth0, netlink.FAMILY_V6)
		must(t, err)
		return slices.ContainsFunc(addrs, func(ad netlink.Addr) bool {
			return ad.IP.Equal(next.AsSlice()) && ad.Flags&(unix.IFA_F_TENTATIVE|unix.IFA_F_DADFAILED) == 0
		})
	})

	b := h.newPod("b")
	if _, err := h.tryAdd(l, b); err != nil {
		t.Fatalf("ADD of the pod IPAM gave %s to: %v", next, err)
	}
	if b.ip6 != next {
		t.Fatalf("IPAM gave pod b %s, not the squatted %s: the test proves nothing", b.ip6, next)
	}
	idB, _ := h.endpointOf(t, b)
	var ref loader.EndpointRef
	k := datapath.EpIPKey(next, u.Index)
	must(t, h.dp.Maps.EpByIp.Lookup(&k, &ref))
	if ref.Id != idB || ref.Flags&uint32(loader.RefLearned) != 0 {
		t.Fatalf("ep_by_ip[%s] = %+v, want pod b's (%d), assigned", next, ref, idB)
	}
	netenv.MustPing(t, b.ns, u.Gateway6, 3)
	// Pod a still has the address and sends from it (to the gateway, whose
	// MAC it resolved before it squatted).
	before := h.stats(t, a)
	must(t, a.ns.Do(func() error {
		c, err := net.DialUDP("udp6", net.UDPAddrFromAddrPort(netip.AddrPortFrom(next, 0)), net.UDPAddrFromAddrPort(netip.AddrPortFrom(u.Gateway6, 9)))
		if err != nil {
			return err
		}
		defer c.Close()
		for range 3 {
			if _, err := c.Write([]byte("squat")); err != nil {
				return err
			}
		}
		return nil
	}))
	waitFor(t, "pod a's 3 datagrams from pod b's address dropped as spoofed_source", func() bool {
		return h.stats(t, a).Drops[loader.DropSpoofedSource]-before.Drops[loader.DropSpoofedSource] >= 3
	})
	h.del(l, a)
	netenv.MustPing(t, b.ns, u.Gateway6, 2) // a's DEL left b's address alone
	h.del(l, b)
	h.assertNoLeak(t, nil, a.ns, b.ns)
}
