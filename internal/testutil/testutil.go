// Package testutil holds the few helpers every privileged test of the project
// shares: the single skip policy for missing kernel features, the root check and
// a private bpffs directory per test. It is also the one harness the test
// tiers and the demo share: building and running underpassd and the plugin
// (agent.go, cni.go, proc.go), reaching the agent inside a node netns,
// waiting for it (wait.go) and driving the plugin through libcni. The
// network namespaces themselves are test/netenv's.
package testutil

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/underpass-cni/underpass/internal/loader"
)

// RequireFeaturesEnv names the environment variable that turns skips into
// failures: a comma list of feature names (as reported in the skip message) or
// "all". CI on a kernel that must have a feature sets it so a regression in
// feature detection cannot hide behind a skip.
const RequireFeaturesEnv = "UNDERPASS_REQUIRE_FEATURES"

// BPFFSRoot is where the kernel's bpffs is expected (and mounted if missing).
const BPFFSRoot = "/sys/fs/bpf"

// FeatureError marks err as "the running kernel lacks Feature". It matches
// ebpf.ErrNotSupported with errors.Is, so project code can report missing
// non-eBPF features (ipvlan, a sysctl, …) through the same skip policy:
//
//	testutil.SkipIfNotSupported(t, testutil.NotSupported("ipvlan", err))
type FeatureError struct {
	Feature string
	Err     error
}

// NotSupported wraps err as a missing-feature error. A nil err stays nil so
// the call can wrap a result unconditionally.
func NotSupported(feature string, err error) error {
	if err == nil {
		return nil
	}
	return &FeatureError{Feature: feature, Err: err}
}

func (e *FeatureError) Error() string {
	return fmt.Sprintf("%s not supported: %v", e.Feature, e.Err)
}

func (e *FeatureError) Unwrap() error { return e.Err }

// Is makes every FeatureError an ebpf.ErrNotSupported.
func (e *FeatureError) Is(target error) bool { return target == ebpf.ErrNotSupported }

// SkipIfNotSupported is the project's only skip helper. A nil err does
// nothing; an error that means "this kernel lacks a feature"
// (ebpf.ErrNotSupported, cilium/ebpf's UnsupportedFeatureError, FeatureError)
// skips the test naming the feature, unless RequireFeaturesEnv lists that
// feature or "all", in which case the test fails. Any other error fails.
func SkipIfNotSupported(tb testing.TB, err error) {
	tb.Helper()
	if err == nil {
		return
	}
	if !errors.Is(err, ebpf.ErrNotSupported) {
		tb.Fatal(err)
		return
	}
	feature := featureName(err)
	if featureRequired(feature, os.Getenv(RequireFeaturesEnv)) {
		tb.Fatalf("required feature %q is not supported by this kernel (%s=%q): %v",
			feature, RequireFeaturesEnv, os.Getenv(RequireFeaturesEnv), err)
		return
	}
	tb.Skipf("kernel feature %q not supported (set %s=%q to fail instead): %v",
		feature, RequireFeaturesEnv, feature, err)
}

// featureName finds the name of the missing feature in err's tree. cilium/ebpf
// keeps its UnsupportedFeatureError in an internal package, so it is recognised
// by shape (a struct of that name with a string field Name) rather than by type.
// Without a name the error text is the best description there is.
func featureName(err error) string {
	var name string
	walkErrors(err, func(e error) bool {
		if fe, ok := e.(*FeatureError); ok {
			name = fe.Feature
			return true
		}
		v := reflect.ValueOf(e)
		if v.Kind() != reflect.Pointer || v.IsNil() || v.Elem().Kind() != reflect.Struct {
			return false
		}
		if v.Elem().Type().Name() != "UnsupportedFeatureError" {
			return false
		}
		f := v.Elem().FieldByName("Name")
		if !f.IsValid() || f.Kind() != reflect.String || f.String() == "" {
			return false
		}
		name = f.String()
		return true
	})
	if name == "" {
		name = err.Error()
	}
	return name
}

// walkErrors visits err and everything it wraps (both Unwrap forms), depth
// first, until visit returns true.
func walkErrors(err error, visit func(error) bool) bool {
	if err == nil {
		return false
	}
	if visit(err) {
		return true
	}
	switch u := err.(type) {
	case interface{ Unwrap() error }:
		return walkErrors(u.Unwrap(), visit)
	case interface{ Unwrap() []error }:
		for _, e := range u.Unwrap() {
			if walkErrors(e, visit) {
				return true
			}
		}
	}
	return false
}

// featureRequired reports whether the comma list names feature (case
// insensitive) or "all".
func featureRequired(feature, list string) bool {
	for item := range strings.SplitSeq(list, ",") {
		item = strings.TrimSpace(item)
		if item == "" {
			continue
		}
		if strings.EqualFold(item, "all") || strings.EqualFold(item, feature) {
			return true
		}
	}
	return false
}

// RequireRoot fails (never skips) the test when not running as root: the
// privileged suite silently skipping everything would look like a pass.
func RequireRoot(tb testing.TB) {
	tb.Helper()
	if os.Geteuid() != 0 {
		tb.Fatalf("the privileged suite must run as root: sudo make test (euid %d)", os.Geteuid())
	}
}

// MountBPFFS makes sure a bpffs is mounted at BPFFSRoot and returns a fresh,
// empty directory below it (underpass-test-*), removed with everything pinned
// in it when the test ends. The directory lives on the host's real bpffs, so
// processes started with nsenter --net (not ip netns exec, which remounts /sys)
// see the same pins.
func MountBPFFS(tb testing.TB) string {
	tb.Helper()
	if err := loader.EnsureBPFFS(BPFFSRoot); err != nil {
		tb.Fatalf("bpffs: %v", err)
	}
	dir, err := os.MkdirTemp(BPFFSRoot, "underpass-test-")
	if err != nil {
		tb.Fatalf("create bpffs test dir: %v", err)
	}
	tb.Cleanup(func() {
		if err := os.RemoveAll(dir); err != nil {
			tb.Errorf("remove bpffs test dir: %v", err)
		}
	})
	return dir
}

// LoadDatapath loads the datapath as underpassd does into a fresh pin
// directory (MountBPFFS, then "underpass" in it) and closes it when the
// test ends. It fails unless run as root.
func LoadDatapath(tb testing.TB) *loader.Objects {
	tb.Helper()
	dp, _ := LoadDatapathDir(tb)
	return dp
}

// LoadDatapathDir is LoadDatapath that also returns the pin directory, for
// tests that look at, remove or restore what is pinned in it.
func LoadDatapathDir(tb testing.TB) (*loader.Objects, string) {
	tb.Helper()
	RequireRoot(tb)
	dir := filepath.Join(MountBPFFS(tb), "underpass")
	dp, err := loader.Load(dir, loader.Options{})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { dp.Close() })
	return dp, dir
}

// WantErrorLines checks an error that reports one problem a line: none at
// all when want is empty, else exactly len(want) lines, line i containing
// want[i]. It fails the test when err is nil but want is not, so a caller
// may go on to inspect a non-nil err.
func WantErrorLines(tb testing.TB, err error, want []string) {
	tb.Helper()
	if len(want) == 0 {
		if err != nil {
			tb.Fatalf("unexpected error: %v", err)
		}
		return
	}
	if err == nil {
		tb.Fatal("no error")
	}
	lines := strings.Split(err.Error(), "\n")
	if len(lines) != len(want) {
		tb.Fatalf("got %d errors, want %d:\n%v", len(lines), len(want), err)
	}
	for i, w := range want {
		if !strings.Contains(lines[i], w) {
			tb.Errorf("error %d:\n%s\nwant it to contain %q", i, lines[i], w)
		}
	}
}

// Parse applies parse (netip.MustParseAddr, netip.MustParsePrefix, ...) to
// each of ss: tables write their addresses as strings.
func Parse[T any](parse func(string) T, ss ...string) []T {
	var out []T
	for _, s := range ss {
		out = append(out, parse(s))
	}
	return out
}

// KernelRelease returns uname -r and its major and minor numbers, for the
// tests that know which kernel must have a feature.
func KernelRelease(tb testing.TB) (rel string, major, minor int) {
	tb.Helper()
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		tb.Fatalf("uname: %v", err)
	}
	rel = unix.ByteSliceToString(u.Release[:])
	parts := strings.SplitN(rel, ".", 3)
	if len(parts) < 2 {
		tb.Fatalf("cannot parse kernel release %q", rel)
	}
	major, _ = strconv.Atoi(parts[0])
	minor, _ = strconv.Atoi(strings.TrimFunc(parts[1], func(r rune) bool { return r < '0' || r > '9' }))
	return rel, major, minor
}
