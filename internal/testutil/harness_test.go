package testutil

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"
	"time"

	current "github.com/containernetworking/cni/pkg/types/100"
)

func TestSeriesValue(t *testing.T) {
	body := "# HELP x y\nunderpass_endpoints 3\nunderpass_drops_total{reason=\"a\"} 7\nunderpass_bad NaN?\n"
	for _, tc := range []struct {
		series string
		v      float64
		found  bool
		err    bool
	}{
		{"underpass_endpoints", 3, true, false},
		{`underpass_drops_total{reason="a"}`, 7, true, false},
		{"underpass_drops_total", 0, false, false}, // the bare name is another series
		{"underpass_bad", 0, true, true},
		{"missing", 0, false, false},
	} {
		v, found, err := SeriesValue(body, tc.series)
		if v != tc.v || found != tc.found || (err != nil) != tc.err {
			t.Errorf("SeriesValue(%s) = %v, %v, %v; want %v, %v, error %v", tc.series, v, found, err, tc.v, tc.found, tc.err)
		}
	}
}

func TestTailLines(t *testing.T) {
	if got := TailLines("a\nb\nc\n", 2); got != "… 1 lines before\nb\nc" {
		t.Errorf("TailLines = %q", got)
	}
	if got := TailLines("a\nb\n", 5); got != "a\nb" {
		t.Errorf("TailLines = %q", got)
	}
}

func TestWaitReady(t *testing.T) {
	calls := 0
	get := func(string) (int, string, error) {
		calls++
		if calls < 3 {
			return http.StatusServiceUnavailable, "not yet\n", nil
		}
		return http.StatusOK, "ok", nil
	}
	if _, err := WaitReady(context.Background(), get, nil, time.Second, time.Millisecond); err != nil || calls != 3 {
		t.Fatalf("WaitReady: %v after %d calls, want ready after 3", err, calls)
	}

	never := func(string) (int, string, error) { return 0, "", errors.New("refused") }
	_, err := WaitReady(context.Background(), never, nil, 20*time.Millisecond, time.Millisecond)
	if err == nil || !strings.Contains(err.Error(), "last /readyz: 0  refused") {
		t.Errorf("timeout: %v, want the last answer quoted", err)
	}
	exited := make(chan struct{})
	close(exited)
	if _, err := WaitReady(context.Background(), never, exited, time.Second, time.Millisecond); !errors.Is(err, ErrExited) {
		t.Errorf("exited: %v, want ErrExited", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := WaitReady(ctx, never, nil, time.Second, time.Millisecond); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled: %v, want context.Canceled", err)
	}
}

func TestResultAddrs(t *testing.T) {
	r := &current.Result{
		Interfaces: []*current.Interface{{Name: "eth0", Mac: "02:00:00:00:00:01"}, {Name: "eth0", Mac: "02:00:00:00:00:02", Sandbox: "/run/netns/x"}},
		IPs: []*current.IPConfig{
			{Address: net.IPNet{IP: net.ParseIP("192.0.2.100"), Mask: net.CIDRMask(24, 32)}},
			{Address: net.IPNet{IP: net.ParseIP("2001:db8::100"), Mask: net.CIDRMask(64, 128)}},
		},
	}
	ip4, ip6, mac := ResultAddrs(r, "eth0")
	if ip4 != netip.MustParseAddr("192.0.2.100") || ip6 != netip.MustParseAddr("2001:db8::100") || mac.String() != "02:00:00:00:00:02" {
		t.Errorf("ResultAddrs = %v %v %v", ip4, ip6, mac)
	}
	if _, _, mac := ResultAddrs(r, "net1"); mac != nil {
		t.Errorf("MAC %v for an interface the result lacks", mac)
	}
}

func TestPodRuntimeConf(t *testing.T) {
	rt := PodRuntimeConf("id", "/run/netns/p", "eth0", "ns", "pod", [2]string{"K8S_POD_UID", "u"})
	want := [][2]string{{"IgnoreUnknown", "1"}, {"K8S_POD_NAMESPACE", "ns"}, {"K8S_POD_NAME", "pod"}, {"K8S_POD_UID", "u"}}
	if rt.ContainerID != "id" || rt.NetNS != "/run/netns/p" || rt.IfName != "eth0" || len(rt.Args) != len(want) {
		t.Fatalf("PodRuntimeConf = %+v", rt)
	}
	for i := range want {
		if rt.Args[i] != want[i] {
			t.Errorf("arg %d = %v, want %v", i, rt.Args[i], want[i])
		}
	}
}

func TestNetnsHTTPClient(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { _, _ = w.Write([]byte("ok " + r.URL.Path)) }))
	defer srv.Close()
	dials := 0
	do := func(fn func() error) error { dials++; return fn() }
	code, body, err := HTTPGet(NetnsHTTPClient(do, 5*time.Second), srv.URL+"/readyz")
	if err != nil || code != http.StatusOK || body != "ok /readyz" || dials != 1 {
		t.Fatalf("HTTPGet = %d %q %v with %d dials through do, want 200 \"ok /readyz\" and 1", code, body, err, dials)
	}
}

func TestWriteConflist(t *testing.T) {
	path := filepath.Join(t.TempDir(), "n.conflist")
	l, err := WriteConflist(path, "n", "1.1.0", map[string]any{"type": "underpass", "bpffs": "/x"})
	if err != nil {
		t.Fatal(err)
	}
	if l.Name != "n" || l.CNIVersion != "1.1.0" || len(l.Plugins) != 1 || l.Plugins[0].Network.Type != "underpass" {
		t.Errorf("loaded back %+v", l)
	}
}
