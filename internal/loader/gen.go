package loader

// The one generate line. clang is pinned (Debian bookworm's clang 14) so that
// the committed objects are reproducible: CI rebuilds them and fails on a diff.
//go:generate go run github.com/cilium/ebpf/cmd/bpf2go -cc clang-14 -target bpfel -cflags "-O2 -g -Wall -Werror -I../../bpf/include" -type up_config -type up_parent -type up_mac_key -type up_ip_key -type up_lpm_key -type up_ep_ref -type up_host_entry -type up_counter -type up_ep_stats -type up_ep_addr -type up_endpoint -type up_trace -type up_mode -type up_config_flags -type up_host_flags -type up_drop_reason -type up_stat -type up_trace_kind -type up_event -type up_event_kind -type up_limits -type up_prefilter -type up_net4 -type up_net6 -type up_prefilter_limits -type up_ep_prog -type up_ep_ip_key -type up_learned -type up_attach_key -type up_marks -type up_ref_flags -type up_flow_key bpf ../../bpf/underpass.c
