package netenv

import (
	"fmt"
	"net/netip"
	"os"
	"testing"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// ServiceNAT is a kube-proxy stand-in in a namespace: every packet to VIP
// is DNATed to Backend in prerouting and output, as kube-proxy's nftables
// or iptables mode does for a ClusterIP, and counted. A pod's traffic that
// reaches the backend went through the node's own stack (underpass's
// steering; ipvlan L3 slaves' traffic is routed there and meets output),
// not a route of the pod's. Programmed over netlink (no nft binary: the VM
// matrix has none); the table goes with the namespace.
type ServiceNAT struct {
	ns           *NS
	VIP, Backend netip.Addr
	table        *nftables.Table
	chains       []*nftables.Chain
}

// AddServiceNAT installs the DNAT of vip to backend (one family) in ns.
func AddServiceNAT(tb testing.TB, ns *NS, vip, backend netip.Addr) *ServiceNAT {
	tb.Helper()
	if vip.Is4() != backend.Is4() {
		tb.Fatalf("service NAT %s -> %s: one family, please", vip, backend)
	}
	fam, nfproto, daddrOff := nftables.TableFamilyIPv4, uint32(unix.NFPROTO_IPV4), uint32(16)
	if vip.Is6() {
		fam, nfproto, daddrOff = nftables.TableFamilyIPv6, unix.NFPROTO_IPV6, 24
	}
	s := &ServiceNAT{ns: ns, VIP: vip, Backend: backend}
	err := s.conn(func(c *nftables.Conn) error {
		s.table = c.AddTable(&nftables.Table{Name: "underpass_test_svc", Family: fam})
		for name, hook := range map[string]*nftables.ChainHook{"prerouting": nftables.ChainHookPrerouting, "output": nftables.ChainHookOutput} {
			ch := c.AddChain(&nftables.Chain{
				Name: name, Table: s.table, Type: nftables.ChainTypeNAT,
				Hooknum: hook, Priority: nftables.ChainPriorityNATDest,
			})
			s.chains = append(s.chains, ch)
			c.AddRule(&nftables.Rule{Table: s.table, Chain: ch, Exprs: []expr.Any{
				&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: daddrOff, Len: uint32(vip.BitLen() / 8)},
				&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: vip.AsSlice()},
				&expr.Counter{},
				&expr.Immediate{Register: 1, Data: backend.AsSlice()},
				&expr.NAT{Type: expr.NATTypeDestNAT, Family: nfproto, RegAddrMin: 1},
			}})
		}
		return c.Flush()
	})
	if err != nil {
		tb.Fatalf("service NAT %s -> %s in %s: %v", vip, backend, ns.Name, err)
	}
	return s
}

// conn runs fn with an nftables connection inside the namespace.
func (s *ServiceNAT) conn(fn func(*nftables.Conn) error) error {
	f, err := os.Open(s.ns.Path)
	if err != nil {
		return err
	}
	defer f.Close()
	c, err := nftables.New(nftables.WithNetNSFd(int(f.Fd())))
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	defer c.CloseLasting()
	return fn(c)
}

// Packets is how many packets the DNAT rules have translated: the first
// of each flow (a TCP connection, one ping run); conntrack handles the rest.
func (s *ServiceNAT) Packets(tb testing.TB) uint64 {
	tb.Helper()
	var n uint64
	err := s.conn(func(c *nftables.Conn) error {
		for _, ch := range s.chains {
			rules, err := c.GetRules(s.table, ch)
			if err != nil {
				return err
			}
			for _, r := range rules {
				for _, e := range r.Exprs {
					if ctr, ok := e.(*expr.Counter); ok {
						n += ctr.Packets
					}
				}
			}
		}
		return nil
	})
	if err != nil {
		tb.Fatalf("read the service NAT counter in %s: %v", s.ns.Name, err)
	}
	return n
}
