package main

import (
	"slices"
	"testing"
)

// The resolver's order, as glibc and musl try names: with fewer dots than
// ndots the search list first, else the name first; a trailing dot is
// absolute.
func TestCandidates(t *testing.T) {
	rc := resolvConf{server: "10.96.0.10", search: []string{"ns1.svc.cluster.local", "svc.cluster.local", "cluster.local"}, ndots: 5}
	for _, tc := range []struct {
		name   string
		search bool
		want   []string
	}{
		{"kubernetes.default", true, []string{"kubernetes.default.ns1.svc.cluster.local.", "kubernetes.default.svc.cluster.local.", "kubernetes.default.cluster.local.", "kubernetes.default."}},
		{"kubernetes.default", false, []string{"kubernetes.default."}},
		{"kubernetes.default.svc.cluster.local.", true, []string{"kubernetes.default.svc.cluster.local."}},
		{"a.b.c.d.e.f", true, []string{"a.b.c.d.e.f.", "a.b.c.d.e.f.ns1.svc.cluster.local.", "a.b.c.d.e.f.svc.cluster.local.", "a.b.c.d.e.f.cluster.local."}},
	} {
		if got := rc.candidates(tc.name, tc.search); !slices.Equal(got, tc.want) {
			t.Errorf("candidates(%q, %v) = %v, want %v", tc.name, tc.search, got, tc.want)
		}
	}
}
