// Package hostnat owns underpassd's nftables table, `table inet underpass`,
// in the node's network namespace. Nothing else writes it.
//
// Why it exists: an underlay pod's SYN to a ClusterIP is steered to the
// host, where kube-proxy DNATs it. When the backend is another underlay pod
// (on this node or elsewhere on the wire), the backend would answer the
// client straight over L2 with its own address as the source; the reply
// never meets the node's conntrack, the client sees a SYN-ACK from an
// address it never called, and the connection fails. kube-proxy masquerades
// such traffic only with masqueradeAll or a cluster CIDR that excludes the
// pods. So the agent masquerades exactly the flows the datapath steered
// (skb mark UP_MARK_STEERED, set by the parent program) that the host then
// DNATed and forwarded: the backend sees the node's address and answers it,
// and conntrack takes the reply back to the client. Flows to host-network
// backends are delivered locally and never reach postrouting: their source
// address is kept.
package hostnat

import (
	"errors"
	"fmt"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// Table is the table's name (family inet).
const Table = "underpass"

const chain = "postrouting"

// ipsDstNAT is IPS_DST_NAT of ct status: the flow's destination was
// translated (kube-proxy's DNAT, in iptables or nftables mode).
const ipsDstNAT = 0x20

func table() *nftables.Table {
	return &nftables.Table{Name: Table, Family: nftables.TableFamilyINet}
}

// Install writes the table with its one rule, replacing what was there in
// the same transaction: a reader never sees the table half-written, and
// calling it again (every start, every reload) is harmless.
func Install(mark uint32) error {
	c, err := nftables.New()
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	defer c.CloseLasting()
	t := c.AddTable(table())
	c.DelTable(t) // then recreated: one batch, applied atomically
	t = c.AddTable(table())
	ch := c.AddChain(&nftables.Chain{
		Name: chain, Table: t, Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityNATSource,
	})
	c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: masqueradeSteered(mark),
		UserData: []byte("underpass: masquerade Service flows of underlay pods that the host DNATed and forwarded")})
	if err := c.Flush(); err != nil {
		return fmt.Errorf("install nftables table inet %s: %w", Table, err)
	}
	return nil
}

// masqueradeSteered is
//
//	meta mark & mark == mark  ct status & dnat == dnat  counter  masquerade
func masqueradeSteered(mark uint32) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(mark), Xor: binaryutil.NativeEndian.PutUint32(0)},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(mark)},
		&expr.Ct{Key: expr.CtKeySTATUS, Register: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(ipsDstNAT), Xor: binaryutil.NativeEndian.PutUint32(0)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(0)},
		&expr.Counter{},
		&expr.Masq{},
	}
}

// Remove deletes the table; it is not an error if there is none.
func Remove() error {
	c, err := nftables.New()
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	defer c.CloseLasting()
	c.DelTable(table())
	err = c.Flush()
	if errors.Is(err, unix.ENOENT) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("remove nftables table inet %s: %w", Table, err)
	}
	return nil
}

// Installed reports whether the table is there, and how many flows its rule
// has masqueraded (the first packet of each: conntrack does the rest).
func Installed() (ok bool, flows uint64, err error) {
	c, err := nftables.New()
	if err != nil {
		return false, 0, fmt.Errorf("nftables: %w", err)
	}
	defer c.CloseLasting()
	tables, err := c.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		return false, 0, fmt.Errorf("list nftables tables: %w", err)
	}
	var t *nftables.Table
	for _, tt := range tables {
		if tt.Name == Table {
			t = tt
		}
	}
	if t == nil {
		return false, 0, nil
	}
	rules, err := c.GetRules(t, &nftables.Chain{Name: chain, Table: t})
	if err != nil {
		return true, 0, fmt.Errorf("read nftables table inet %s: %w", Table, err)
	}
	for _, r := range rules {
		for _, e := range r.Exprs {
			if ctr, ok := e.(*expr.Counter); ok {
				flows += ctr.Packets
			}
		}
	}
	return true, flows, nil
}
