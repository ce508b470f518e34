package config

import (
	"reflect"
	"testing"

	"sigs.k8s.io/yaml"
)

// FuzzParse checks that Parse never panics, and that whatever it accepts
// survives a marshal/parse round trip unchanged: the agent and underpassctl
// print configs back, and the printed form must mean the same thing.
func FuzzParse(f *testing.F) {
	for _, seed := range []string{
		example,
		"",
		"{}",
		"xdp: off\nhostReachability: false\n",
		"staleServices: {cidrs: ['fd00:96::/108', 10.96.0.0/12], action: reject}\nservices: {static: ['fd00:96::1']}\n",
		"hostCIDRs: ['::ffff:169.254.20.10', 169.254.25.10/32]\nuplinks: [eth1, bond0]\n",
		"services: {kubernetes: yes, kubeconfig: /etc/k}\nmetrics: {listen: '[::1]:9775'}\ngcInterval: 2m30s\n",
		"hostcidrs: []\nstaleServices: {acton: drop}\n",
		"a: &x [1]\nb: *x\n",
		"hostCIDRs: [10.0.0.300/32]\n",
		"- 1\n",
		"gcInterval: 1.5\nuplinks: [1, 0x10, true]\n",
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := Parse(data)
		if err != nil {
			if c != nil {
				t.Fatalf("Parse returned a config and an error: %v", err)
			}
			return
		}
		if err := c.Validate(); err != nil {
			t.Fatalf("a parsed config fails Validate: %v", err)
		}
		out, err := yaml.Marshal(c)
		if err != nil {
			t.Fatalf("marshal: %v", err)
		}
		c2, err := Parse(out)
		if err != nil {
			t.Fatalf("re-parse of\n%s\nfailed: %v\n(input %q)", out, err, data)
		}
		if !reflect.DeepEqual(c, c2) {
			t.Fatalf("round trip changed the config:\n%+v\n%+v\n(input %q, marshaled %q)", c, c2, data, out)
		}
	})
}
