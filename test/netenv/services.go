package netenv

import "net/netip"

// The lab's Services, addressed as in a cluster: the Service CIDR of each
// family, a live VIP (one with endpoints) and a stale one (in the CIDR, no
// longer a Service).
var (
	SvcCIDR4  = netip.MustParsePrefix("10.96.0.0/16")
	SvcCIDR6  = netip.MustParsePrefix("fd00:96::/108")
	LiveVIP4  = netip.MustParseAddr("10.96.0.10")
	LiveVIP6  = netip.MustParseAddr("fd00:96::10")
	StaleVIP4 = netip.MustParseAddr("10.96.0.99")
	StaleVIP6 = netip.MustParseAddr("fd00:96::99")
)
