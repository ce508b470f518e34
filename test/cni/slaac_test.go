package cni_test

import (
	"encoding/binary"
	"net"
	"net/netip"
	"os"
	"slices"
	"testing"
	"time"

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

// A pod squats on the IPv6 address IPAM hands out next: it configures it,
// so its DAD makes the datapath learn the address as the pod's (any pod
// could send that DAD from a raw socket). The next pod is assigned the
// address and must get it: IPAM is the authority and a learnt address
// yields. Pod b runs duplicate address detection as a real pod's kernel
// does, while the squatter defends the address (its kernel answers b's
// probe) and floods DAD probes of its own for it, either of which fails b's
// DAD if it gets through: both are dropped as spoofed at the squatter's
// egress. Until December 2026 b's ADD failed with "address in use" (blaming
// IPAM), and without the probe check it fails with "DAD failed".
func TestAssignedAddressWinsOverALearntOne(t *testing.T) {
	h, l := newMainHarness(t, "up-squat", true)
	u := h.env.Uplinks[0]
	a := h.addFirstPod(l, "a")
	next := a.ip6.Next()                    // host-local hands out addresses in order
	netenv.MustPing(t, a.ns, u.Gateway6, 1) // a resolves the gateway before it squats
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
	must(t, b.ns.Do(func() error { // a real pod's kernel runs DAD
		return os.WriteFile("/proc/sys/net/ipv6/conf/all/accept_dad", []byte("1"), 0o644)
	}))
	before := h.stats(t, a)
	stop := make(chan struct{})
	flood := make(chan int, 1)
	go func() {
		sent, _, _ := netenv.SendFrames(a.ns, eth0.Attrs().Index, [][]byte{dadProbe(t, a.mac, next)}, func(int) bool {
			select {
			case <-stop:
				return false
			default:
				time.Sleep(time.Millisecond)
				return true
			}
		})
		flood <- sent
	}()
	_, err = h.tryAdd(l, b)
	close(stop)
	probes := <-flood
	if err != nil {
		t.Fatalf("ADD of the pod IPAM gave %s to, while pod a sent %d DAD probes for it: %v", next, probes, err)
	}
	if b.ip6 != next {
		t.Fatalf("IPAM gave pod b %s, not the squatted %s: the test proves nothing", b.ip6, next)
	}
	dropped := h.stats(t, a).Drops[loader.DropSpoofedSource] - before.Drops[loader.DropSpoofedSource]
	t.Logf("pod a sent %d DAD probes for %s during b's ADD; %d of a's frames dropped as spoofed_source", probes, next, dropped)
	// The probes before b's registration are a's own DAD for an address
	// it held (learnt) then, and go; every one after is dropped.
	if probes == 0 || dropped == 0 {
		t.Fatalf("%d of pod a's %d DAD probes dropped as spoofed_source, want those after b's registration", dropped, probes)
	}
	idB, _ := h.endpointOf(t, b)
	var ref loader.EndpointRef
	k := datapath.EpIPKey(next, u.Index)
	must(t, h.dp.Maps.EpByIp.Lookup(&k, &ref))
	if ref.Id != idB || ref.Flags&uint32(loader.RefLearned) != 0 {
		t.Fatalf("ep_by_ip[%s] = %+v, want pod b's (%d), assigned", next, ref, idB)
	}
	netenv.MustPing(t, b.ns, u.Gateway6, 3)
	// Pod a still has the address and sends from it: dropped.
	before = h.stats(t, a)
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

// dadProbe is a duplicate address detection probe for target from mac: a
// neighbour solicitation from :: to target's solicited-node group.
func dadProbe(t *testing.T, mac net.HardwareAddr, target netip.Addr) []byte {
	t.Helper()
	t16 := target.As16()
	group := net.IP{0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, t16[13], t16[14], t16[15]}
	eth := &layers.Ethernet{SrcMAC: mac, DstMAC: net.HardwareAddr{0x33, 0x33, 0xff, t16[13], t16[14], t16[15]}, EthernetType: layers.EthernetTypeIPv6}
	ip6 := &layers.IPv6{Version: 6, HopLimit: 255, NextHeader: layers.IPProtocolICMPv6, SrcIP: net.IPv6unspecified, DstIP: group}
	icmp := &layers.ICMPv6{TypeCode: layers.CreateICMPv6TypeCode(layers.ICMPv6TypeNeighborSolicitation, 0)}
	must(t, icmp.SetNetworkLayerForChecksum(ip6))
	ns := &layers.ICMPv6NeighborSolicitation{TargetAddress: target.AsSlice()}
	buf := gopacket.NewSerializeBuffer()
	must(t, gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}, eth, ip6, icmp, ns))
	return buf.Bytes()
}
