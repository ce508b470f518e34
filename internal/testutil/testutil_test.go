package testutil

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// fakeTB records Skip/Fatal instead of ending the goroutine, so the policy can
// be checked without ending the real test.
type fakeTB struct {
	testing.TB
	skipped, failed string
}

func (f *fakeTB) Helper()                           {}
func (f *fakeTB) Skipf(format string, args ...any)  { f.skipped = fmt.Sprintf(format, args...) }
func (f *fakeTB) Fatalf(format string, args ...any) { f.failed = fmt.Sprintf(format, args...) }
func (f *fakeTB) Fatal(args ...any)                 { f.failed = fmt.Sprint(args...) }

// UnsupportedFeatureError has the shape of cilium/ebpf's internal type of the
// same name, which tests outside that module cannot construct.
type UnsupportedFeatureError struct{ Name string }

func (e *UnsupportedFeatureError) Error() string        { return e.Name + " not supported" }
func (e *UnsupportedFeatureError) Is(target error) bool { return target == ebpf.ErrNotSupported }

func TestSkipIfNotSupported(t *testing.T) {
	tcx := fmt.Errorf("attach: %w", &UnsupportedFeatureError{Name: "tcx"})
	ipvlan := NotSupported("ipvlan", errors.New("operation not supported"))
	plain := fmt.Errorf("load: %w", ebpf.ErrNotSupported)
	joined := errors.Join(errors.New("other"), tcx)

	for _, tc := range []struct {
		name     string
		err      error
		require  string
		wantSkip string // substring of the skip message, "" for no skip
		wantFail bool
	}{
		{name: "nil", err: nil},
		{name: "other error fails", err: errors.New("boom"), wantFail: true},
		{name: "cilium feature skips", err: tcx, wantSkip: `"tcx"`},
		{name: "joined feature skips", err: joined, wantSkip: `"tcx"`},
		{name: "FeatureError skips", err: ipvlan, wantSkip: `"ipvlan"`},
		{name: "plain ErrNotSupported skips", err: plain, wantSkip: "not supported"},
		{name: "required feature fails", err: tcx, require: "xdp, TCX", wantFail: true},
		{name: "other feature required still skips", err: tcx, require: "ipvlan", wantSkip: `"tcx"`},
		{name: "all fails", err: plain, require: "all", wantFail: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv(RequireFeaturesEnv, tc.require)
			f := &fakeTB{}
			SkipIfNotSupported(f, tc.err)
			if tc.wantFail != (f.failed != "") {
				t.Errorf("failed = %q, want failure %v", f.failed, tc.wantFail)
			}
			if tc.wantSkip == "" && f.skipped != "" {
				t.Errorf("unexpected skip: %q", f.skipped)
			}
			if tc.wantSkip != "" && !strings.Contains(f.skipped, tc.wantSkip) {
				t.Errorf("skip message %q does not contain %q", f.skipped, tc.wantSkip)
			}
		})
	}
}

func TestNotSupportedNil(t *testing.T) {
	if err := NotSupported("x", nil); err != nil {
		t.Fatalf("NotSupported(nil) = %v, want nil", err)
	}
}

func TestRequireRoot(t *testing.T) {
	f := &fakeTB{}
	RequireRoot(f)
	if (os.Geteuid() == 0) == (f.failed != "") {
		t.Fatalf("euid %d, failure %q", os.Geteuid(), f.failed)
	}
}

func TestMountBPFFS(t *testing.T) {
	RequireRoot(t)
	var dir string
	t.Run("mount", func(t *testing.T) {
		dir = MountBPFFS(t)
		if filepath.Dir(dir) != BPFFSRoot || !strings.HasPrefix(filepath.Base(dir), "underpass-test-") {
			t.Fatalf("unexpected dir %s", dir)
		}
		var st unix.Statfs_t
		if err := unix.Statfs(dir, &st); err != nil {
			t.Fatal(err)
		}
		if uint32(st.Type) != unix.BPF_FS_MAGIC {
			t.Fatalf("%s is not on bpffs (magic %#x)", dir, st.Type)
		}
		// Pinning a map proves the directory is usable, and that RemoveAll
		// copes with pins in it.
		m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: 1})
		SkipIfNotSupported(t, err)
		defer m.Close()
		if err := m.Pin(filepath.Join(dir, "m")); err != nil {
			t.Fatal(err)
		}
		if other := MountBPFFS(t); other == dir {
			t.Fatalf("two calls returned the same dir %s", dir)
		}
	})
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("%s still there after cleanup: %v", dir, err)
	}
}

// wantProbe: a probe's answer on this kernel is either nil (the feature is
// there) or a FeatureError naming feature, never another error.
func wantProbe(t *testing.T, probe string, err error, feature string) {
	t.Helper()
	t.Logf("%s: %v", probe, err)
	if err == nil {
		return
	}
	var fe *FeatureError
	if !errors.As(err, &fe) || fe.Feature != feature {
		t.Fatalf("%s: %v, want nil or a FeatureError for %s", probe, err, feature)
	}
}

// On this kernel ip_vs is either there or reported as the missing feature
// "ip_vs", never as another error.
func TestProbeIPVS(t *testing.T) {
	wantProbe(t, "ProbeIPVS", ProbeIPVS(), "ip_vs")
}

// On this kernel VLAN links are either possible or reported as the missing
// feature "vlan", never as another error (the VM kernels have 8021q).
func TestProbeVLAN(t *testing.T) {
	RequireRoot(t)
	wantProbe(t, "ProbeVLAN", ProbeVLAN(), "vlan")
}
