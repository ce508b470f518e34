package loader_test

import (
	"errors"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/gopacket/gopacket/layers"
	"golang.org/x/sys/unix"

	"github.com/underpass-cni/underpass/internal/datapath"
)

// FuzzFrames feeds any frame to every program (`make fuzz`; plain go test
// runs the seeds): parent and uplink egress pass, drop or redirect only to
// the parent's own ingress and attribute only to registered endpoints;
// endpoint A's programs count only into A (never into B) and never redirect;
// XDP only observes. TestGarbage does the same with a fixed random stream.
func FuzzFrames(f *testing.F) {
	r := newRig(f)
	r.setConfig(f, datapath.Config{ServicesSynced: true, HostReachable: true, StaleReject: true})
	for _, s := range [][]byte{
		icmpEcho(f, macParent, macA, ipHost, ipA),
		tcpSYN(f, macA, macGW, ipA, vipStale, "S"),
		udp(f, macA, macGW, ipA6, vip6Stale),
		arp(f, layers.ARPRequest, macParent, macBcast, macParent, ipHost, ipA),
		neighborSolicitation(f, macParent, ipHost6, ipA6),
		icmpEcho(f, macA, macGW, ipB, ipRemote),
	} {
		f.Add(s)
	}
	inA, egA := loadEndpoint(f, r.dp, r.idA)
	f.Fuzz(func(t *testing.T, frame []byte) {
		if len(frame) < 14 || len(frame) > 1514 {
			return // the test run takes Ethernet frames of up to a page; the wire's MTU is 1500
		}
		for _, prog := range []*ebpf.Program{r.dp.Programs.ParentEgress, r.dp.Programs.UplinkEgress} {
			r.runEgressAny(t, prog, frame) // a refused frame: see TestGarbage
		}
		b0 := r.epStats(t, r.idB)
		for _, prog := range []*ebpf.Program{inA, egA} {
			res, err := r.tryRun(t, prog, frame)
			if errors.Is(err, unix.EINVAL) && truncatedL3(frame) {
				continue
			}
			if err != nil {
				t.Fatalf("run on % x: %v", frame, err)
			}
			if res.verdict != actOK && res.verdict != actShot {
				t.Fatalf("endpoint program on % x: verdict %d, want pass or drop", frame, res.verdict)
			}
		}
		if b1 := r.epStats(t, r.idB); b1 != b0 {
			t.Fatalf("endpoint A's programs counted into B on % x: %+v -> %+v", frame, b0, b1)
		}
		r.xdp(t, frame)
	})
}
