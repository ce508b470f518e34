package loader

// Go names for the C types in bpf/underpass.h. They are aliases of the
// bpf2go output, so C stays the single definition.
type (
	Config        = bpfUpConfig
	Parent        = bpfUpParent
	MACKey        = bpfUpMacKey
	IPKey         = bpfUpIpKey
	EpIPKey       = bpfUpEpIpKey
	AttachKey     = bpfUpAttachKey
	FlowKey       = bpfUpFlowKey
	Learned       = bpfUpLearned
	RefFlags      = bpfUpRefFlags
	LPMKey        = bpfUpLpmKey
	EndpointRef   = bpfUpEpRef
	HostEntry     = bpfUpHostEntry
	Counter       = bpfUpCounter
	EndpointStats = bpfUpEpStats
	EndpointAddr  = bpfUpEpAddr
	Endpoint      = bpfUpEndpoint
	Trace         = bpfUpTrace
	Mode          = bpfUpMode
	ConfigFlags   = bpfUpConfigFlags
	HostFlags     = bpfUpHostFlags
	DropReason    = bpfUpDropReason
	Stat          = bpfUpStat
	TraceKind     = bpfUpTraceKind
	Event         = bpfUpEvent
	EventKind     = bpfUpEventKind

	// Services translated at the pod (services.mode: ebpf).
	SvcKey      = bpfUpSvcKey
	Svc         = bpfUpSvc
	SlotKey     = bpfUpSlotKey
	Backend     = bpfUpBackend
	CtKey       = bpfUpCtKey
	Ct          = bpfUpCt
	RevKey      = bpfUpRevKey
	Rev         = bpfUpRev
	AffinityKey = bpfUpAffinityKey
	Affinity    = bpfUpAffinity
	SvcStat     = bpfUpSvcStat
	SvcCounters = bpfUpSvcCounters
	SvcName     = bpfUpSvcName
	FragKey     = bpfUpFragKey
	Frag        = bpfUpFrag
)

const (
	ModeNone      = bpfUpModeUP_MODE_NONE
	ModeMacvlan   = bpfUpModeUP_MODE_MACVLAN
	ModeIPvlanL2  = bpfUpModeUP_MODE_IPVLAN_L2
	ModeIPvlanL3  = bpfUpModeUP_MODE_IPVLAN_L3
	ModeIPvlanL3S = bpfUpModeUP_MODE_IPVLAN_L3S

	ConfigHostBlocked = bpfUpConfigFlagsUP_CFG_HOST_BLOCKED
	ConfigStaleReject = bpfUpConfigFlagsUP_CFG_STALE_REJECT
	ConfigSvcSynced   = bpfUpConfigFlagsUP_CFG_SVC_SYNCED
	ConfigSvcEBPF     = bpfUpConfigFlagsUP_CFG_SVC_EBPF
	ConfigSvcKube     = bpfUpConfigFlagsUP_CFG_SVC_KUBE

	SvcAffinity = uint8(bpfUpSvcFlagsUP_SVC_AFFINITY)

	SvcStatTranslated     = bpfUpSvcStatUP_SVC_STAT_TRANSLATED
	SvcStatReversed       = bpfUpSvcStatUP_SVC_STAT_REVERSED
	SvcStatNewFlows       = bpfUpSvcStatUP_SVC_STAT_NEW_FLOWS
	SvcStatNoSlot         = bpfUpSvcStatUP_SVC_STAT_NO_SLOT
	SvcStatStale          = bpfUpSvcStatUP_SVC_STAT_STALE
	SvcStatUntranslatable = bpfUpSvcStatUP_SVC_STAT_UNTRANSLATABLE
	SvcStatMax            = bpfUpSvcStatUP_SVC_STAT_MAX

	// MarkSteered and MarkService are the skb marks the parent program puts
	// on endpoint frames it hands to the host stack (enum up_marks):
	// steered, and steered to a live Service VIP.
	MarkSteered = uint32(bpfUpMarksUP_MARK_STEERED)
	MarkService = uint32(bpfUpMarksUP_MARK_SERVICE)

	RefLearned = bpfUpRefFlagsUP_REF_LEARNED

	HostLocal = bpfUpHostFlagsUP_HOST_LOCAL
	HostSteer = bpfUpHostFlagsUP_HOST_STEER

	DropStaleService    = bpfUpDropReasonUP_DROP_STALE_SERVICE
	DropHostUnreachable = bpfUpDropReasonUP_DROP_HOST_UNREACHABLE
	DropSpoofedSource   = bpfUpDropReasonUP_DROP_SPOOFED_SOURCE
	DropRejectFailed    = bpfUpDropReasonUP_DROP_REJECT_FAILED
	DropUnvetted        = bpfUpDropReasonUP_DROP_UNVETTED
	DropRouted          = bpfUpDropReasonUP_DROP_ROUTED
	DropSvcXlateFailed  = bpfUpDropReasonUP_DROP_SVC_XLATE_FAILED
	DropSvcTupleInUse   = bpfUpDropReasonUP_DROP_SVC_TUPLE_IN_USE
	DropMax             = bpfUpDropReasonUP_DROP_MAX

	StatHostToEndpoint = bpfUpStatUP_STAT_HOST_TO_EP
	StatEndpointToHost = bpfUpStatUP_STAT_EP_TO_HOST
	StatSteered        = bpfUpStatUP_STAT_STEERED
	StatARPCloned      = bpfUpStatUP_STAT_ARP_CLONED
	StatNDCloned       = bpfUpStatUP_STAT_ND_CLONED
	StatStaleDropped   = bpfUpStatUP_STAT_STALE_DROPPED
	StatStaleRejected  = bpfUpStatUP_STAT_STALE_REJECTED
	StatCloneFailed    = bpfUpStatUP_STAT_CLONE_FAILED
	StatIPConflict     = bpfUpStatUP_STAT_IP_CONFLICT
	StatWireRx         = bpfUpStatUP_STAT_WIRE_RX
	StatLearned        = bpfUpStatUP_STAT_LEARNED
	StatUnlearned      = bpfUpStatUP_STAT_UNLEARNED
	StatMax            = bpfUpStatUP_STAT_MAX

	EventIPConflict = bpfUpEventKindUP_EVENT_IP_CONFLICT

	TraceNone     = bpfUpTraceKindUP_TRACE_NONE
	TraceRedirect = bpfUpTraceKindUP_TRACE_REDIRECT
	TraceClone    = bpfUpTraceKindUP_TRACE_CLONE
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
	case DropSvcXlateFailed:
		return "service_translation_failed"
	case DropSvcTupleInUse:
		return "service_tuple_in_use"
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
	Prefilter = bpfUpPrefilter
	Net4      = bpfUpNet4
	Net6      = bpfUpNet6
)

// Prefilter slots per family.
const (
	PrefilterV4 = int(bpfUpPrefilterLimitsUP_PREFILTER_V4)
	PrefilterV6 = int(bpfUpPrefilterLimitsUP_PREFILTER_V6)
)

// MaxParentIfindex bounds the ifindex of a parent NIC (the parents array).
const MaxParentIfindex = int(bpfUpLimitsUP_MAX_PARENT_IFINDEX)

// EpProg is a slot of ep_progs: which body endpoint_ingress or
// endpoint_egress tail-calls.
type EpProg = bpfUpEpProg

const (
	EpProgIngress = bpfUpEpProgUP_EP_PROG_INGRESS
	EpProgEgress  = bpfUpEpProgUP_EP_PROG_EGRESS
)

// MaxAddrs is UP_MAX_ADDRS: how many addresses an endpoint can have.
const MaxAddrs = len(Endpoint{}.Addrs)

// MaxLearned is UP_MAX_LEARNED: how many addresses an endpoint can have
// learnt from its DAD.
const MaxLearned = len(Endpoint{}.Learned)

// Add adds o's packets and bytes to c: the per-CPU values of a counter
// summed.
func (c *Counter) Add(o Counter) {
	c.Packets += o.Packets
	c.Bytes += o.Bytes
}
