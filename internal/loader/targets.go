package loader

import "github.com/underpass-cni/underpass/internal/attach"

// EgressTarget is the attachment of role's program (parent_egress,
// uplink_egress) on the egress of ifindex, pinned in dp.
func (dp *Objects) EgressTarget(role attach.Role, ifindex int) attach.EgressOptions {
	o := attach.EgressOptions{Role: role, Ifindex: ifindex, Dir: dp.Dir}
	switch role {
	case attach.RoleParent:
		o.Program = dp.Programs.ParentEgress
	case attach.RoleUplink:
		o.Program = dp.Programs.UplinkEgress
	}
	return o
}

// XDPTarget is the attachment of parent_xdp on parent ifindex in mode,
// pinned in dp.
func (dp *Objects) XDPTarget(ifindex int, mode attach.XDPMode) attach.XDPOptions {
	return attach.XDPOptions{Program: dp.Programs.ParentXdp, Ifindex: ifindex, Mode: mode, Dir: dp.Dir}
}

// EndpointTarget is the attachment of endpoint id's programs on ifindex in
// the netns at netns ("": the calling thread's).
func (dp *Objects) EndpointTarget(id uint32, netns string, ifindex int) attach.EndpointOptions {
	return attach.EndpointOptions{ID: id, Ifindex: ifindex, Netns: netns,
		Ingress: dp.Programs.EndpointIngress, Egress: dp.Programs.EndpointEgress}
}
