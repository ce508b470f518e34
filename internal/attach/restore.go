package attach

import (
	"fmt"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
)

// RestoreEgress brings back the link pin of role on ifindex after it was
// removed. Usually the link went with its pin (the pin was its last
// reference) and the program is attached afresh. But if the link lives on
// (another process held it open, or a bpffs mounted over dir hides the
// pin) a new attach would fail with EEXIST, or run the program twice: that
// link is pinned again instead, and adopted says so.
func RestoreEgress(o EgressOptions) (adopted bool, err error) {
	if l := findTCXLink(o.Ifindex, o.Program); l != nil {
		if err := pinLink(l, o.pin()); err != nil {
			return true, fmt.Errorf("pin tcx link of %s: %w", IfaceName(o.Ifindex), err)
		}
		return true, nil
	}
	_, err = Egress(o)
	return false, err
}

// RestoreXDP is RestoreEgress for the parent's XDP link.
func RestoreXDP(o XDPOptions) (adopted bool, err error) {
	if l := findXDPLink(o.Ifindex, o.Program); l != nil {
		if err := pinLink(l, XDPLinkPin(o.Dir, o.Ifindex)); err != nil {
			return true, fmt.Errorf("pin xdp link of %s: %w", IfaceName(o.Ifindex), err)
		}
		return true, nil
	}
	_, err = XDP(o)
	return false, err
}

// findTCXLink returns the tcx egress link running prog on ifindex, if any.
func findTCXLink(ifindex int, prog *ebpf.Program) link.Link {
	id, ok := programID(prog)
	if !ok {
		return nil
	}
	res, err := link.QueryPrograms(link.QueryOptions{Target: ifindex, Attach: ebpf.AttachTCXEgress})
	if err != nil {
		return nil // no tcx: nothing to adopt
	}
	for _, p := range res.Programs {
		if p.ID != id {
			continue
		}
		if lid, ok := p.LinkID(); ok {
			if l, err := link.NewFromID(lid); err == nil {
				return l
			}
		}
	}
	return nil
}

// findXDPLink returns the XDP link running prog on ifindex, if any. XDP
// has no per-interface query for links: this walks every link, which is
// fine for a repair.
func findXDPLink(ifindex int, prog *ebpf.Program) link.Link {
	id, ok := programID(prog)
	if !ok {
		return nil
	}
	var it link.Iterator
	for it.Next() {
		info, err := it.Link.Info()
		if err != nil || info.Type != link.XDPType || info.Program != id {
			continue
		}
		if x := info.XDP(); x != nil && int(x.Ifindex) == ifindex {
			return it.Take()
		}
	}
	return nil
}

func programID(prog *ebpf.Program) (ebpf.ProgramID, bool) {
	if prog == nil {
		return 0, false
	}
	info, err := prog.Info()
	if err != nil {
		return 0, false
	}
	return info.ID()
}
