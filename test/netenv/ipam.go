package netenv

// HostLocalIPAM is a host-local IPAM section for pods on the uplink's
// subnet, as underlay pods get their addresses: .100-.199 of the IPv4
// subnet and, with v6, ::100-::1ff of the IPv6 one, default routes via the
// gateway, leases in dataDir.
func (u *Uplink) HostLocalIPAM(dataDir string, v6 bool) map[string]any {
	ranges := []any{[]any{map[string]any{
		"subnet": u.Subnet4.String(), "rangeStart": u.IP4(100).Addr().String(), "rangeEnd": u.IP4(199).Addr().String(),
		"gateway": u.Gateway4.String(),
	}}}
	routes := []any{map[string]any{"dst": "0.0.0.0/0"}}
	if v6 {
		ranges = append(ranges, []any{map[string]any{
			"subnet": u.Subnet6.String(), "rangeStart": u.IP6(0x100).Addr().String(), "rangeEnd": u.IP6(0x1ff).Addr().String(),
			"gateway": u.Gateway6.String(),
		}})
		routes = append(routes, map[string]any{"dst": "::/0"})
	}
	return map[string]any{"type": "host-local", "dataDir": dataDir, "ranges": ranges, "routes": routes}
}
