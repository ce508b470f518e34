package loader

// Go names for the C types in bpf/underpass.h. They are aliases of the
// bpf2go output, so C stays the single definition.
type (
	Config        = datapathUpConfig
	Parent        = datapathUpParent
	MACKey        = datapathUpMacKey
	IPKey         = datapathUpIpKey
	EpIPKey       = datapathUpEpIpKey
	AttachKey     = datapathUpAttachKey
	FlowKey       = datapathUpFlowKey
	Learned       = datapathUpLearned
	RefFlags      = datapathUpRefFlags
	LPMKey        = datapathUpLpmKey
	EndpointRef   = datapathUpEpRef
	HostEntry     = datapathUpHostEntry
	Counter       = datapathUpCounter
	EndpointStats = datapathUpEpStats
	EndpointAddr  = datapathUpEpAddr
	Endpoint      = datapathUpEndpoint
	Trace         = datapathUpTrace
	Mode          = datapathUpMode
	ConfigFlags   = datapathUpConfigFlags
	HostFlags     = datapathUpHostFlags
	DropReason    = datapathUpDropReason
	Stat          = datapathUpStat
	TraceKind     = datapathUpTraceKind
	Event         = datapathUpEvent
	EventKind     = datapathUpEventKind
)

const (
	ModeNone      = datapathUpModeUP_MODE_NONE
	ModeMacvlan   = datapathUpModeUP_MODE_MACVLAN
	ModeIPvlanL2  = datapathUpModeUP_MODE_IPVLAN_L2
	ModeIPvlanL3  = datapathUpModeUP_MODE_IPVLAN_L3
	ModeIPvlanL3S = datapathUpModeUP_MODE_IPVLAN_L3S

	ConfigHostBlocked = datapathUpConfigFlagsUP_CFG_HOST_BLOCKED
	ConfigStaleReject = datapathUpConfigFlagsUP_CFG_STALE_REJECT
	ConfigSvcSynced   = datapathUpConfigFlagsUP_CFG_SVC_SYNCED

	// MarkSteered and MarkService are the skb marks the parent program puts
	// on endpoint frames it hands to the host stack (enum up_marks):
	// steered, and steered to a live Service VIP.
	MarkSteered = uint32(datapathUpMarksUP_MARK_STEERED)
	MarkService = uint32(datapathUpMarksUP_MARK_SERVICE)

	RefLearned = datapathUpRefFlagsUP_REF_LEARNED

	HostLocal = datapathUpHostFlagsUP_HOST_LOCAL
	HostSteer = datapathUpHostFlagsUP_HOST_STEER

	DropStaleService    = datapathUpDropReasonUP_DROP_STALE_SERVICE
	DropHostUnreachable = datapathUpDropReasonUP_DROP_HOST_UNREACHABLE
	DropSpoofedSource   = datapathUpDropReasonUP_DROP_SPOOFED_SOURCE
	DropRejectFailed    = datapathUpDropReasonUP_DROP_REJECT_FAILED
	DropUnvetted        = datapathUpDropReasonUP_DROP_UNVETTED
	DropRouted          = datapathUpDropReasonUP_DROP_ROUTED
	DropMax             = datapathUpDropReasonUP_DROP_MAX

	StatHostToEndpoint = datapathUpStatUP_STAT_HOST_TO_EP
	StatEndpointToHost = datapathUpStatUP_STAT_EP_TO_HOST
	StatSteered        = datapathUpStatUP_STAT_STEERED
	StatARPCloned      = datapathUpStatUP_STAT_ARP_CLONED
	StatNDCloned       = datapathUpStatUP_STAT_ND_CLONED
	StatStaleDropped   = datapathUpStatUP_STAT_STALE_DROPPED
	StatStaleRejected  = datapathUpStatUP_STAT_STALE_REJECTED
	StatCloneFailed    = datapathUpStatUP_STAT_CLONE_FAILED
	StatIPConflict     = datapathUpStatUP_STAT_IP_CONFLICT
	StatWireRx         = datapathUpStatUP_STAT_WIRE_RX
	StatLearned        = datapathUpStatUP_STAT_LEARNED
	StatUnlearned      = datapathUpStatUP_STAT_UNLEARNED
	StatMax            = datapathUpStatUP_STAT_MAX

	EventIPConflict = datapathUpEventKindUP_EVENT_IP_CONFLICT

	TraceNone     = datapathUpTraceKindUP_TRACE_NONE
	TraceRedirect = datapathUpTraceKindUP_TRACE_REDIRECT
	TraceClone    = datapathUpTraceKindUP_TRACE_CLONE
)

// String names used in logs, metrics labels and the CLI.
func (r DropReason) String() string {
	switch r {
	case DropStaleService:
		return "stale_service"
	case DropHostUnreachable:
		return "host_unreachable"
	case DropSpoofedSource:
		return "spoofed_source"
	case DropRejectFailed:
		return "reject_failed"
	case DropUnvetted:
		return "unvetted_frame"
	case DropRouted:
		return "routed_via_node"
	}
	return "unknown"
}

func (m Mode) String() string {
	switch m {
	case ModeMacvlan:
		return "macvlan"
	case ModeIPvlanL2:
		return "ipvlan-l2"
	case ModeIPvlanL3:
		return "ipvlan-l3"
	case ModeIPvlanL3S:
		return "ipvlan-l3s"
	}
	return "none"
}

// Prefilter types: see up_prefilter in bpf/underpass.h.
type (
	Prefilter = datapathUpPrefilter
	Net4      = datapathUpNet4
	Net6      = datapathUpNet6
)

// Prefilter slots per family.
const (
	PrefilterV4 = int(datapathUpPrefilterLimitsUP_PREFILTER_V4)
	PrefilterV6 = int(datapathUpPrefilterLimitsUP_PREFILTER_V6)
)

// MaxParentIfindex bounds the ifindex of a parent NIC (the parents array).
const MaxParentIfindex = int(datapathUpLimitsUP_MAX_PARENT_IFINDEX)

// EpProg is a slot of ep_progs: which body endpoint_ingress or
// endpoint_egress tail-calls.
type EpProg = datapathUpEpProg

const (
	EpProgIngress = datapathUpEpProgUP_EP_PROG_INGRESS
	EpProgEgress  = datapathUpEpProgUP_EP_PROG_EGRESS
)

// MaxAddrs is UP_MAX_ADDRS: how many addresses an endpoint can have.
const MaxAddrs = len(Endpoint{}.Addrs)

// MaxLearned is UP_MAX_LEARNED: how many addresses an endpoint can have
// learnt from its DAD.
const MaxLearned = len(Endpoint{}.Learned)
