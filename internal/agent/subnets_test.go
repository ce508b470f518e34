package agent

import (
	"net/netip"
	"slices"
	"testing"

	"github.com/underpass-cni/underpass/internal/config"
)

// A node running kube-proxy in IPVS mode has every ClusterIP on kube-ipvs0
// as a /32: that must not count as a node subnet overlapping the service
// range, or the agent could not start on such nodes.
func TestSubnetsOfIgnoresHostAddresses(t *testing.T) {
	addrs := []netip.Prefix{
		netip.MustParsePrefix("192.0.2.2/24"),
		netip.MustParsePrefix("10.96.0.1/32"),  // kube-ipvs0
		netip.MustParsePrefix("10.96.0.10/32"), // kube-ipvs0
		netip.MustParsePrefix("127.0.0.1/8"),
		netip.MustParsePrefix("fe80::1/64"),
		netip.MustParsePrefix("fd00:96::1/128"),
		netip.MustParsePrefix("2001:db8:1::2/64"),
	}
	got := subnetsOf(addrs)
	want := []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24"), netip.MustParsePrefix("2001:db8:1::/64")}
	if !slices.Equal(got, want) {
		t.Fatalf("subnets %v, want %v", got, want)
	}
	cfg, err := config.Parse([]byte("staleServices: {cidrs: [10.96.0.0/16]}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if err := cfg.ValidateAgainst(got, nil); err != nil {
		t.Fatalf("IPVS node refused: %v", err)
	}
	// A real subnet inside the service range is still refused.
	if err := cfg.ValidateAgainst(subnetsOf([]netip.Prefix{netip.MustParsePrefix("10.96.5.2/24")}), nil); err == nil {
		t.Fatal("node subnet inside the service range accepted")
	}
}
