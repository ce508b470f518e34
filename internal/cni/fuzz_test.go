package cni

import (
	"encoding/json"
	"errors"
	"path/filepath"
	"testing"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/underpass-cni/underpass/internal/loader"
)

var confSeeds = []string{
	`{"cniVersion":"1.1.0","name":"n","type":"underpass","master":"eth0","mode":"macvlan","macvlanMode":"bridge","mtu":1500,"ipam":{"type":"host-local","ranges":[[{"subnet":"10.1.0.0/24"}]]}}`,
	`{"cniVersion":"1.0.0","name":"n","type":"underpass","mode":"ipvlan","ipvlanMode":"l3s","bpffs":"/sys/fs/bpf/x","ipam":{"type":"static","addresses":[{"address":"10.1.0.5/24"}]}}`,
	`{"cniVersion":"1.0.0","name":"n","type":"underpass","prevResult":{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","mac":"02:00:00:00:00:01","sandbox":"/var/run/netns/x"}],"ips":[{"address":"10.1.0.5/24","interface":0,"gateway":"10.1.0.1"}]}}`,
	`{"cniVersion":"0.4.0","name":"n","type":"underpass","prevResult":{"cniVersion":"0.4.0","interfaces":[{"name":"eth0","sandbox":"/x"}],"ips":[{"version":"4","address":"10.1.0.5/24","interface":0}]}}`,
	`{"cniVersion":"1.1.0","name":"n","type":"underpass","mode":"bogus"}`,
	`{"cniVersion":"1.1.0","name":"n","type":"underpass","mtu":-1}`,
	`{"cniVersion":"1.1.0","name":"n","type":"underpass","bpffs":"rel"}`,
	`{"cniVersion":"1.1.0","name":"n","type":"underpass","ipam":{"type":"host-local","subnet":"10.0.0.0/33"}}`,
	`{"cniVersion":"1.1.0","name":"n","type":"underpass","cni.dev/valid-attachments":[{"containerID":"a","ifname":"eth0"}]}`,
	`{"prevResult":"x"}`,
	`[]`,
	``,
}

// FuzzParseConf: the config parser never panics, fails only with CNI
// errors 6 or 7, and what it accepts is consistent. The DEL parser accepts
// whatever decodes.
func FuzzParseConf(f *testing.F) {
	for _, s := range confSeeds {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		c, err := ParseConf(in)
		dc, derr := parseConfForDel(in)
		if err != nil {
			var te *types.Error
			if !errors.As(err, &te) || (te.Code != types.ErrDecodingFailure && te.Code != types.ErrInvalidNetworkConfig) {
				t.Fatalf("error %v is not a CNI error 6 or 7", err)
			}
			if te.Msg == "" {
				t.Fatal("empty error message")
			}
			var obj map[string]json.RawMessage
			if json.Unmarshal(in, &obj) == nil && obj != nil && derr != nil {
				t.Fatalf("DEL refused a JSON object: %v", derr)
			}
			if derr == nil && !filepath.IsAbs(dc.BPFFS) {
				t.Fatalf("DEL config has a relative bpffs %q", dc.BPFFS)
			}
			return
		}
		if derr != nil {
			t.Fatalf("DEL refused what ADD accepts: %v", derr)
		}
		if c.Kind != ModeMacvlan && c.Kind != ModeIPvlan {
			t.Fatalf("kind %q", c.Kind)
		}
		switch c.DatapathMode {
		case loader.ModeMacvlan:
			if c.Kind != ModeMacvlan {
				t.Fatalf("datapath mode %s for kind %s", c.DatapathMode, c.Kind)
			}
		case loader.ModeIPvlanL2, loader.ModeIPvlanL3, loader.ModeIPvlanL3S:
			if c.Kind != ModeIPvlan {
				t.Fatalf("datapath mode %s for kind %s", c.DatapathMode, c.Kind)
			}
		default:
			t.Fatalf("datapath mode %d", c.DatapathMode)
		}
		if !filepath.IsAbs(c.BPFFS) || filepath.Clean(c.BPFFS) != c.BPFFS {
			t.Fatalf("bpffs %q", c.BPFFS)
		}
		if c.MTU != 0 && (c.MTU < 68 || c.MTU > 65535) {
			t.Fatalf("mtu %d accepted", c.MTU)
		}
		if c.Chained == c.hasInterfaceKeys() {
			t.Fatalf("chained=%v with interface keys=%v", c.Chained, c.hasInterfaceKeys())
		}
		if c.Chained != dc.Chained {
			t.Fatalf("ADD says chained=%v, DEL says %v", c.Chained, dc.Chained)
		}
		for _, p := range c.IPAMSubnets {
			if !p.IsValid() {
				t.Fatalf("invalid ipam subnet %v", p)
			}
		}
	})
}
