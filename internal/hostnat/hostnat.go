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
// pods. So the agent masquerades the flows the datapath steered (skb mark
// UP_MARK_STEERED, set by the parent program, arriving on a parent the
// agent serves) that the host then DNATed and forwarded, whatever the
// backend: the backend sees the node's address and answers it, and
// conntrack takes the reply back to the client. Flows to a backend on this
// host (host network) are delivered locally, never reach postrouting, and
// keep the pod's address. The parent match keeps other users of the mark
// bit (Calico, say) out of the rule.
//
// kube-proxy's IPVS mode records no DNAT in conntrack (IPVS rewrites the
// reply tuple without IPS_DST_NAT), so a rule on "ct status dnat" misses
// it. The datapath marks frames steered to a live Service VIP with a second
// bit (UP_MARK_SERVICE); whatever of such a flow the host forwards out
// again, kube-proxy translated, by DNAT or by IPVS, and the first rule of
// each parent masquerades it on that mark alone. (IPVS's packets reach
// postrouting with the parent as their input device, like forwarded ones.)
// The second rule keeps the DNAT of other steered flows (a host CIDR the
// host DNATs) masqueraded.
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

// Marks are the datapath's skb marks the rules match (loader.MarkSteered,
// loader.MarkService).
type Marks struct {
	Steered, Service uint32
}

// Install writes the table with two rules per parent, replacing what was
// there in the same transaction: a reader never sees the table
// half-written, and calling it again is harmless.
func Install(marks Marks, parents []string) error {
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
	for _, p := range parents {
		c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: masqueradeMarked(p, marks.Service, false),
			UserData: []byte("underpass: masquerade Service flows of underlay pods that the host forwards (kube-proxy DNAT or IPVS)")})
		c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: masqueradeMarked(p, marks.Steered, true),
			UserData: []byte("underpass: masquerade steered flows of underlay pods that the host DNATed and forwarded")})
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("install nftables table inet %s: %w", Table, err)
	}
	return nil
}

// masqueradeMarked is
//
//	iifname parent  meta mark & mark == mark  [ct status & dnat == dnat]  counter  masquerade
func masqueradeMarked(parent string, mark uint32, dnat bool) []expr.Any {
	name := make([]byte, unix.IFNAMSIZ)
	copy(name, parent)
	e := []expr.Any{
		&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: name},
		&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(mark), Xor: binaryutil.NativeEndian.PutUint32(0)},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(mark)},
	}
	if dnat {
		e = append(e,
			&expr.Ct{Key: expr.CtKeySTATUS, Register: 1},
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
				Mask: binaryutil.NativeEndian.PutUint32(ipsDstNAT), Xor: binaryutil.NativeEndian.PutUint32(0)},
			&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(0)})
	}
	return append(e, &expr.Counter{}, &expr.Masq{})
}

// Rules is how many rules Install writes for n parents.
func Rules(n int) int { return 2 * n }

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

// State is what is installed.
type State struct {
	Table bool   // the table exists
	Rules int    // rules in its chain (-1: no chain)
	Flows uint64 // flows masqueraded (the first packet of each: conntrack does the rest)
}

// Installed reads the table back.
func Installed() (State, error) {
	st := State{Rules: -1}
	c, err := nftables.New()
	if err != nil {
		return st, fmt.Errorf("nftables: %w", err)
	}
	defer c.CloseLasting()
	tables, err := c.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		return st, fmt.Errorf("list nftables tables: %w", err)
	}
	var t *nftables.Table
	for _, tt := range tables {
		if tt.Name == Table {
			t = tt
		}
	}
	if t == nil {
		return st, nil
	}
	st.Table = true
	rules, err := c.GetRules(t, &nftables.Chain{Name: chain, Table: t})
	if err != nil {
		return st, nil // no chain: -1 rules, to be reinstalled
	}
	st.Rules = len(rules)
	for _, r := range rules {
		for _, e := range r.Exprs {
			if ctr, ok := e.(*expr.Counter); ok {
				st.Flows += ctr.Packets
			}
		}
	}
	return st, nil
}
