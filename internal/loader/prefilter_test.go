package loader_test

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
)

// The prefilter may only ever skip a trie lookup for addresses that are
// certainly outside the set; every way it can be laid out must keep the
// stale guard and the steering exact.
func TestPrefilter(t *testing.T) {
	r := newRig(t)
	m := &r.dp.Maps
	stale := tcpSYN(t, macA, macGW, ipA, vipStale, "S")
	stale6 := tcpSYN(t, macA, macGW, ipA6, vip6Stale, "S")
	toDNS := udp(t, macA, macGW, ipA, ipDNS)
	wire := icmpEcho(t, macA, macGW, ipA, ipRemote)
	check := func(t *testing.T) {
		t.Helper()
		for _, f := range [][]byte{stale, stale6} {
			if res := r.parent(t, f); res.verdict != actShot {
				t.Fatalf("stale VIP: verdict %d, want drop", res.verdict)
			}
		}
		wantSteered(t, r.parent(t, toDNS), r.idA)
		wantPass(t, r.parent(t, wire), wire)
	}

	t.Run("exact", func(t *testing.T) {
		var f loader.Prefilter
		must(t, m.Prefilter.Lookup(uint32(0), &f))
		if f.Exact4 != 1 || f.Exact6 != 1 || f.V4[0].Valid != 1 || f.V6[0].Valid != 1 {
			t.Fatalf("service prefilter not laid out: %+v", f)
		}
		check(t)
	})
	t.Run("overflow", func(t *testing.T) {
		var cidrs []netip.Prefix
		for i := 0; i < loader.PrefilterV4+1; i++ {
			cidrs = append(cidrs, netip.MustParsePrefix(fmt.Sprintf("10.%d.0.0/16", 100+i)))
		}
		cidrs = append(cidrs, netip.MustParsePrefix("10.96.0.0/16"), netip.MustParsePrefix("fd00:96::/108"))
		must(t, datapath.SyncServiceCIDRs(m, cidrs))
		var f loader.Prefilter
		must(t, m.Prefilter.Lookup(uint32(0), &f))
		if f.Exact4 != 0 {
			t.Fatal("overflowing prefilter claims to be exact")
		}
		check(t)
		// The last CIDR did not fit in the filter; the trie still guards it.
		if res := r.parent(t, tcpSYN(t, macA, macGW, ipA, netip.MustParseAddr("10.108.0.5"), "S")); res.verdict != actShot {
			t.Fatalf("stale VIP in the overflowed CIDR: verdict %d", res.verdict)
		}
	})
	t.Run("zeroed", func(t *testing.T) {
		// A fresh prefilter next to adopted tries (an upgrade) is all zero:
		// it must defer to the tries.
		zero := loader.Prefilter{}
		must(t, m.Prefilter.Update(uint32(0), &zero, ebpf.UpdateAny))
		must(t, m.Prefilter.Update(uint32(1), &zero, ebpf.UpdateAny))
		check(t)
	})
	t.Run("removed", func(t *testing.T) {
		must(t, datapath.SyncServiceCIDRs(m, nil))
		must(t, datapath.SyncHostCIDRs(m, datapath.HostSet{}))
		for _, f := range [][]byte{stale, toDNS} {
			wantPass(t, r.parent(t, f), f)
		}
	})
}
