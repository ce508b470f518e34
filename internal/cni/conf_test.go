package cni

import (
	"errors"
	"net"
	"net/netip"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"

	"github.com/underpass-cni/underpass/internal/loader"
)

func TestParseConf(t *testing.T) {
	for _, tc := range []struct {
		name    string
		in      string
		chained bool
		mode    loader.Mode
		code    uint
		msg     string
	}{
		{name: "defaults", in: `{"cniVersion":"1.1.0","type":"underpass","master":"eth0"}`, mode: loader.ModeMacvlan},
		{name: "ipvlan l3", in: `{"cniVersion":"1.1.0","type":"underpass","mode":"ipvlan","ipvlanMode":"l3"}`, mode: loader.ModeIPvlanL3},
		{name: "ipvlan default l2", in: `{"cniVersion":"1.1.0","type":"underpass","mode":"ipvlan"}`, mode: loader.ModeIPvlanL2},
		{name: "chained", in: `{"cniVersion":"1.0.0","type":"underpass","prevResult":{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/x"}]}}`, chained: true, mode: loader.ModeMacvlan},
		{name: "no interface keys, no prevResult: chained (GC, STATUS)", in: `{"cniVersion":"1.1.0","type":"underpass","name":"n"}`, chained: true, mode: loader.ModeMacvlan},
		{name: "prevResult but ipam: main", in: `{"cniVersion":"1.0.0","type":"underpass","ipam":{"type":"host-local"},"prevResult":{"cniVersion":"1.0.0"}}`, mode: loader.ModeMacvlan},
		{name: "unknown mode", in: `{"type":"underpass","mode":"x"}`, code: 7, msg: `unknown mode "x": use macvlan or ipvlan`},
		{name: "unknown ipvlanMode", in: `{"type":"underpass","mode":"ipvlan","ipvlanMode":"l4"}`, code: 7, msg: `unknown ipvlanMode "l4"`},
		{name: "macvlanMode with ipvlan", in: `{"type":"underpass","mode":"ipvlan","macvlanMode":"vepa"}`, code: 7, msg: "set mode to macvlan or remove macvlanMode"},
		{name: "bad mtu", in: `{"type":"underpass","mtu":70000}`, code: 7, msg: "mtu 70000 is out of range"},
		{name: "bad master name", in: `{"type":"underpass","master":"a/b"}`, code: 7, msg: "set master to an existing NIC"},
		{name: "bad ipam subnet", in: `{"type":"underpass","ipam":{"type":"host-local","ranges":[[{"subnet":"10.0.0.0/40"}]]}}`, code: 7, msg: "ipam:"},
		{name: "not json", in: `{`, code: 6, msg: "parse network configuration"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := ParseConf([]byte(tc.in))
			if !wantCode(t, err, tc.code, tc.msg) {
				return
			}
			if c.Chained != tc.chained || c.DatapathMode != tc.mode || c.BPFFS != loader.DefaultBPFFS {
				t.Fatalf("chained %v mode %s bpffs %s", c.Chained, c.DatapathMode, c.BPFFS)
			}
		})
	}
}

func TestIPAMSubnets(t *testing.T) {
	c, err := ParseConf([]byte(`{"type":"underpass","ipam":{"type":"host-local","subnet":"10.1.0.0/24","ranges":[[{"subnet":"10.2.0.5/24"}],[{"subnet":"fd00::/64"}]]}}`))
	if err != nil {
		t.Fatal(err)
	}
	want := []netip.Prefix{netip.MustParsePrefix("10.1.0.0/24"), netip.MustParsePrefix("10.2.0.0/24"), netip.MustParsePrefix("fd00::/64")}
	if len(c.IPAMSubnets) != len(want) {
		t.Fatalf("%v, want %v", c.IPAMSubnets, want)
	}
	for i := range want {
		if c.IPAMSubnets[i] != want[i] {
			t.Fatalf("%v, want %v", c.IPAMSubnets, want)
		}
	}
}

func TestParseCNIArgs(t *testing.T) {
	a, err := parseCNIArgs("K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-1;K8S_POD_UID=u;FOO=bar;MAC=02:00:00:00:00:01")
	if err != nil || a.PodName != "coredns-1" || a.PodNamespace != "kube-system" || a.MAC != "02:00:00:00:00:01" {
		t.Fatalf("%+v %v", a, err)
	}
	if _, err := parseCNIArgs("garbage"); err == nil {
		t.Fatal("malformed CNI_ARGS accepted")
	}
}

func TestIfaceIPs(t *testing.T) {
	mk := func(s string, idx *int) *current.IPConfig {
		ip, n, _ := net.ParseCIDR(s)
		n.IP = ip
		return &current.IPConfig{Address: *n, Interface: idx}
	}
	r := &current.Result{IPs: []*current.IPConfig{
		mk("10.0.0.5/24", current.Int(0)),
		mk("fd00::5/64", nil),
		mk("10.9.0.5/24", current.Int(1)),
	}}
	// An IPv4 address with a 16-byte mask, as some IPAMs produce.
	r.IPs = append(r.IPs, &current.IPConfig{Address: net.IPNet{IP: net.ParseIP("10.0.1.5"), Mask: net.CIDRMask(120, 128)}, Interface: current.Int(0)})
	_, got, err := ifaceIPs(r, 0)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"10.0.0.5/24", "fd00::5/64", "10.0.1.5/24"}
	if len(got) != len(want) {
		t.Fatalf("%v, want %v", got, want)
	}
	for i := range want {
		if got[i].String() != want[i] {
			t.Fatalf("%v, want %v", got, want)
		}
	}
}

func TestCNIErrorKeepsCodeAndContext(t *testing.T) {
	inner := types.NewError(11, "start underpassd", "")
	err := cniError(errors.Join(errors.New("first"), inner))
	var te *types.Error
	if !errors.As(err, &te) || te.Code != 11 || !strings.Contains(te.Msg, "first") || !strings.Contains(te.Msg, "start underpassd") {
		t.Fatalf("%#v", err)
	}
	if te2 := cniError(inner); te2 != error(inner) {
		t.Fatalf("a bare CNI error was rewrapped: %#v", te2)
	}
	if err := cniError(errors.New("boom")); !errors.As(err, &te) || te.Code != types.ErrInternal {
		t.Fatalf("%#v", err)
	}
}

// DEL reads what it can of a config whose keys no longer decode (edited
// since ADD): it must still find the lease, the link and the registration.
// Until December 2026 a type error failed every DEL (code 6).
func TestParseConfForDelReadsWhatDecodes(t *testing.T) {
	for _, tc := range []struct {
		name, in string
		chained  bool
		ipam     string
	}{
		{"quoted mtu", `{"cniVersion":"1.1.0","name":"n","type":"underpass","master":"eth0","mtu":"1500","ipam":{"type":"host-local","ranges":5}}`, false, "host-local"},
		// In doubt, chained: main mode would delete a previous plugin's interface.
		{"ipam not an object", `{"cniVersion":"1.1.0","name":"n","type":"underpass","ipam":"x"}`, true, ""},
		{"empty ipam, mtu 0", `{"cniVersion":"1.1.0","name":"n","type":"underpass","ipam":{},"mtu":0,"bpffs":5}`, true, ""},
		{"ipam type a number", `{"cniVersion":"1.1.0","name":"n","type":"underpass","ipam":{"type":5},"master":"eth0"}`, false, ""},
		{"chained, bpffs a number", `{"cniVersion":"1.1.0","name":"n","type":"underpass","bpffs":5}`, true, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := ParseConf([]byte(tc.in)); err == nil {
				t.Fatal("ParseConf accepts it: the case tests nothing")
			}
			c, err := parseConfForDel([]byte(tc.in))
			if err != nil {
				t.Fatal(err)
			}
			if c.Chained != tc.chained || c.IPAM.Type != tc.ipam || c.Name != "n" || c.BPFFS != loader.DefaultBPFFS {
				t.Fatalf("chained %v, ipam %q, name %q, bpffs %q; want chained %v, ipam %q", c.Chained, c.IPAM.Type, c.Name, c.BPFFS, tc.chained, tc.ipam)
			}
		})
	}
	if _, err := parseConfForDel([]byte(`[1,2]`)); err == nil {
		t.Fatal("DEL accepted a config that is no JSON object")
	}
}

// GC without the list of valid attachments collects nothing: every
// registration of the network would look invalid. null (libcni's nil
// list) is a list, of none.
func TestGCNeedsTheValidAttachments(t *testing.T) {
	in := []byte(`{"cniVersion":"1.1.0","name":"n","type":"underpass","bpffs":"/nonexistent/underpass"}`)
	c, err := ParseConf(in)
	if err != nil {
		t.Fatal(err)
	}
	err = gc(c, &skel.CmdArgs{StdinData: in})
	var te *types.Error
	if !errors.As(err, &te) || te.Code != types.ErrInvalidNetworkConfig || !strings.Contains(te.Msg, "valid-attachments") {
		t.Fatalf("GC without the list: %v, want code 7 naming it", err)
	}
	for _, key := range []string{"cni.dev/valid-attachments", "cni.dev/attachments"} { // the spec's first name
		in = []byte(`{"cniVersion":"1.1.0","name":"n","type":"underpass","bpffs":"/nonexistent/underpass","` + key + `":null}`)
		if err := gc(c, &skel.CmdArgs{StdinData: in}); err != nil {
			t.Fatalf("GC with a null %s (no datapath loaded): %v", key, err)
		}
	}
}

// The MAC asked for: the reference macvlan plugin's precedence
// (runtimeConfig.mac over CNI_ARGS MAC over the mac key), checked as a
// MAC a slave can have; ipvlan cannot have one of its own.
func TestSlaveMAC(t *testing.T) {
	const base = `"cniVersion":"1.1.0","type":"underpass","master":"eth0"`
	for _, tc := range []struct {
		name, conf, args string
		want             string // "" with code 0: none asked for
		code             uint
		msg              string
	}{
		{name: "none", conf: `{` + base + `}`},
		{name: "mac key", conf: `{` + base + `,"mac":"02:11:22:33:44:55"}`, want: "02:11:22:33:44:55"},
		{name: "CNI_ARGS over the key", conf: `{` + base + `,"mac":"02:11:22:33:44:55","capabilities":{"mac":true}}`, args: "IgnoreUnknown=1;K8S_POD_NAME=p;MAC=02:aa:bb:cc:dd:ee", want: "02:aa:bb:cc:dd:ee"},
		// Multus puts a selection's "mac" into CNI_ARGS whether or not
		// the network allows it: without the capability it is ignored.
		{name: "CNI_ARGS without the capability", conf: `{` + base + `,"mac":"02:11:22:33:44:55"}`, args: "MAC=02:aa:bb:cc:dd:ee", want: "02:11:22:33:44:55"},
		{name: "ipvlan, CNI_ARGS without the capability", conf: `{` + base + `,"mode":"ipvlan"}`, args: "MAC=02:aa:bb:cc:dd:ee"},
		{name: "runtimeConfig over both", conf: `{` + base + `,"mac":"02:11:22:33:44:55","runtimeConfig":{"mac":"02:66:77:88:99:00"}}`, args: "MAC=02:aa:bb:cc:dd:ee", want: "02:66:77:88:99:00"},
		{name: "upper case", conf: `{` + base + `,"runtimeConfig":{"mac":"02:AB:CD:EF:01:23"}}`, want: "02:ab:cd:ef:01:23"},
		{name: "not a MAC", conf: `{` + base + `,"mac":"02:11:22"}`, code: 7, msg: `mac "02:11:22"`},
		{name: "multicast", conf: `{` + base + `,"runtimeConfig":{"mac":"01:00:5e:00:00:01"}}`, code: 7, msg: "multicast"},
		{name: "zero", conf: `{` + base + `,"mac":"00:00:00:00:00:00"}`, code: 7, msg: "zero"},
		{name: "EUI-64", conf: `{` + base + `,"mac":"02:00:00:ff:fe:00:00:01"}`, code: 7, msg: "8 bytes"},
		{name: "bad CNI_ARGS MAC", conf: `{` + base + `,"capabilities":{"mac":true}}`, args: "MAC=03:00:00:00:00:01", code: 4, msg: "CNI_ARGS: MAC="},
		{name: "ipvlan with the key", conf: `{` + base + `,"mode":"ipvlan","mac":"02:11:22:33:44:55"}`, code: 7, msg: "ipvlan slaves all have the parent's MAC"},
		{name: "ipvlan with CNI_ARGS", conf: `{` + base + `,"mode":"ipvlan","capabilities":{"mac":true}}`, args: "MAC=02:11:22:33:44:55", code: 7, msg: "ipvlan slaves all have the parent's MAC"},
		// The plugin before it made the interface, MAC and all.
		{name: "chained: CNI_ARGS left to the plugin before", conf: `{"cniVersion":"1.1.0","type":"underpass","capabilities":{"mac":true}}`, args: "MAC=02:11:22:33:44:55"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := ParseConf([]byte(tc.conf))
			if err == nil {
				var a cniArgs
				if a, err = parseCNIArgs(tc.args); err == nil {
					err = c.applyMACArg(a.MAC)
				}
			}
			if !wantCode(t, err, tc.code, tc.msg) {
				return
			}
			if got := c.SlaveMAC.String(); got != tc.want {
				t.Fatalf("SlaveMAC %q, want %q", got, tc.want)
			}
		})
	}
}

// wantCode checks err against the CNI error code (0: no error) saying msg,
// and says whether the case goes on (no error was wanted).
func wantCode(t *testing.T, err error, code uint, msg string) bool {
	t.Helper()
	if code == 0 {
		if err != nil {
			t.Fatal(err)
		}
		return true
	}
	var te *types.Error
	if !errors.As(err, &te) || te.Code != code || !strings.Contains(te.Msg, msg) {
		t.Fatalf("got %v, want code %d saying %q", err, code, msg)
	}
	return false
}
