package attach

import (
	"errors"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// failingDump is a netlink handle whose link lookups and filter dumps fail
// with the errors given.
type failingDump struct {
	tcNetlink // nil: any other call panics
	linkErr   error
	dumpErr   error
	deleted   int
}

func (f *failingDump) LinkByIndex(index int) (netlink.Link, error) {
	if f.linkErr != nil {
		return nil, f.linkErr
	}
	return &netlink.Dummy{LinkAttrs: netlink.LinkAttrs{Index: index, Name: "eth9"}}, nil
}

func (f *failingDump) FilterList(netlink.Link, uint32) ([]netlink.Filter, error) {
	return nil, f.dumpErr
}

func (f *failingDump) FilterDel(netlink.Filter) error { f.deleted++; return nil }

// A detach that cannot list the filters must fail, not report success with
// the filter still running; an interface that is gone took its filters
// with it.
func TestClsBPFRemoveReportsFailedDump(t *testing.T) {
	for _, tc := range []struct {
		name             string
		linkErr, dumpErr error
		wantErr          bool
	}{
		{"dump fails", nil, unix.ENOBUFS, true},
		{"link lookup fails", unix.EPERM, nil, true},
		{"link gone", netlink.LinkNotFoundError{}, nil, false},
		{"link gone during the dump", nil, unix.ENODEV, false},
		{"no filters", nil, nil, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := &failingDump{linkErr: tc.linkErr, dumpErr: tc.dumpErr}
			c := clsBPF{h: h, ifindex: 9, hook: netlink.HANDLE_MIN_EGRESS, name: "underpass-parent"}
			err := c.remove("underpass-parent")
			if (err != nil) != tc.wantErr {
				t.Fatalf("remove: %v, want error: %v", err, tc.wantErr)
			}
			if tc.wantErr && !errors.Is(err, tc.linkErr) && !errors.Is(err, tc.dumpErr) {
				t.Errorf("remove: %v does not wrap the netlink error", err)
			}
			if _, _, err := filterEndpointID(c); (err != nil) != tc.wantErr {
				t.Errorf("filterEndpointID: %v, want error: %v", err, tc.wantErr)
			}
		})
	}
}
