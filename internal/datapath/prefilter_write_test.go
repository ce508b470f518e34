package datapath_test

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"testing"

	"github.com/underpass-cni/underpass/internal/datapath"
	"github.com/underpass-cni/underpass/internal/loader"
)

// A program on another CPU may read any mix of two consecutive values of a
// prefilter entry (an array update is a plain copy). Across random changes
// of the Service CIDRs, no two consecutive values both trust (exact = 1)
// slots that differ: a mix of them never says "certainly not" for an
// address the trie holds.
func TestPrefilterNeverTrustsHalfWrittenSlots(t *testing.T) {
	m := load(t)

	var prev loader.Prefilter
	if err := m.Prefilter.Lookup(uint32(0), &prev); err != nil {
		t.Fatal(err)
	}
	writes, checked := 0, 0
	restore := datapath.RecordPrefilterWrites(func(which uint32, v loader.Prefilter) {
		if which != 0 {
			return
		}
		writes++
		if prev.Exact4 == 1 && v.Exact4 == 1 && prev.V4 != v.V4 {
			t.Errorf("write %d: IPv4 slots changed while trusted:\n%+v\n%+v", writes, prev.V4, v.V4)
		}
		if prev.Exact6 == 1 && v.Exact6 == 1 && prev.V6 != v.V6 {
			t.Errorf("write %d: IPv6 slots changed while trusted", writes)
		}
		if prev.V4 != v.V4 || prev.V6 != v.V6 {
			checked++
		}
		prev = v
	})
	defer restore()

	rng := rand.New(rand.NewPCG(1, 2))
	randomSet := func() []netip.Prefix {
		var out []netip.Prefix
		for range rng.IntN(loader.PrefilterV4 + 2) {
			out = append(out, netip.MustParsePrefix(fmt.Sprintf("10.%d.0.0/16", rng.IntN(64))))
		}
		for range rng.IntN(loader.PrefilterV6 + 2) {
			out = append(out, netip.MustParsePrefix(fmt.Sprintf("fd00:%x::/64", rng.IntN(64))))
		}
		return out
	}
	for range 200 {
		if err := datapath.SyncServiceCIDRs(m, randomSet()); err != nil {
			t.Fatal(err)
		}
	}
	if checked < 100 {
		t.Fatalf("only %d of %d writes changed the slots: the test did not exercise the protocol", checked, writes)
	}
	if !t.Failed() {
		t.Logf("%d prefilter writes, %d of them changed slots; no trusted slot was ever rewritten", writes, checked)
	}
}
