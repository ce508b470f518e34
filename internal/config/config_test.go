package config

import (
	"errors"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/underpass-cni/underpass/internal/attach"
	"github.com/underpass-cni/underpass/internal/loader"
	"github.com/underpass-cni/underpass/internal/testutil"
)

// example is the documented agent config (README, "Agent configuration"), comments included.
const example = `hostReachability: true          # default true
hostCIDRs: [169.254.20.10/32]   # default empty
staleServices:
  cidrs: [10.96.0.0/16]         # default empty = guard off
  action: drop                  # drop | reject, default drop
  requireEndpoints: false
services:
  static: [10.96.0.1, 10.96.0.10]
  kubernetes: auto              # auto | true | false ; default auto
  kubeconfig: ""                # optional path; empty = in-cluster when kubernetes is auto/true
uplinks: [eth0]                 # extra NICs whose egress also gets the stale guard
xdp: auto                       # auto | native | generic | off
metrics: {listen: "127.0.0.1:9775"}
bpffs: /sys/fs/bpf/underpass
gcInterval: 1m                  # endpoint GC period (duration string), default 1m
logLevel: info                  # debug|info|warn|error
`

func mustParse(t *testing.T, s string) *Config {
	t.Helper()
	c, err := Parse([]byte(s))
	if err != nil {
		t.Fatalf("Parse(%q): %v", s, err)
	}
	return c
}

func prefixes(ss ...string) []netip.Prefix { return testutil.Parse(netip.MustParsePrefix, ss...) }

func addrs(ss ...string) []netip.Addr { return testutil.Parse(netip.MustParseAddr, ss...) }

func TestExampleParses(t *testing.T) {
	c := mustParse(t, example)
	if !c.HostReachability {
		t.Error("HostReachability = false")
	}
	if got, want := c.HostCIDRs(), prefixes("169.254.20.10/32"); !slices.Equal(got, want) {
		t.Errorf("HostCIDRs() = %v, want %v", got, want)
	}
	if got, want := c.ServiceCIDRs(), prefixes("10.96.0.0/16"); !slices.Equal(got, want) {
		t.Errorf("ServiceCIDRs() = %v, want %v", got, want)
	}
	if got, want := c.StaticServices(), addrs("10.96.0.1", "10.96.0.10"); !slices.Equal(got, want) {
		t.Errorf("StaticServices() = %v, want %v", got, want)
	}
	if c.StaleAction() != ActionDrop || c.StaleServices.RequireEndpoints {
		t.Errorf("stale = %v, requireEndpoints %v", c.StaleAction(), c.StaleServices.RequireEndpoints)
	}
	if c.Kubernetes() != KubernetesAuto || c.Services.Kubeconfig != "" {
		t.Errorf("kubernetes = %v, kubeconfig %q", c.Kubernetes(), c.Services.Kubeconfig)
	}
	if !slices.Equal(c.Uplinks, []string{"eth0"}) {
		t.Errorf("Uplinks = %v", c.Uplinks)
	}
	if c.XDPMode() != attach.XDPAuto || c.Metrics.Listen != "127.0.0.1:9775" || c.BPFFS != "/sys/fs/bpf/underpass" {
		t.Errorf("xdp %v, listen %q, bpffs %q", c.XDPMode(), c.Metrics.Listen, c.BPFFS)
	}
	if c.GCPeriod() != time.Minute || c.Level() != slog.LevelInfo {
		t.Errorf("gc %v, level %v", c.GCPeriod(), c.Level())
	}
	if !c.GuardEnabled() {
		t.Error("GuardEnabled() = false with a service CIDR")
	}
}

func TestDefaults(t *testing.T) {
	d := Default()
	if err := d.Validate(); err != nil {
		t.Fatalf("Default() is invalid: %v", err)
	}
	for _, in := range []string{"", "\n", "# only a comment\n", "---\n", "{}", "null"} {
		c := mustParse(t, in)
		if !reflect.DeepEqual(c, d) {
			t.Errorf("Parse(%q) = %+v, want Default() %+v", in, c, d)
		}
	}
	if !d.HostReachability || d.HostCIDRs() != nil || d.ServiceCIDRs() != nil || d.StaticServices() != nil ||
		d.GuardEnabled() || d.StaleAction() != ActionDrop || d.StaleServices.RequireEndpoints ||
		d.Kubernetes() != KubernetesAuto || d.Services.Kubeconfig != "" || d.Uplinks != nil ||
		d.XDPMode() != attach.XDPAuto || d.Metrics.Listen != DefaultMetricsListen || d.BPFFS != loader.DefaultBPFFS ||
		d.GCPeriod() != time.Minute || d.Level() != slog.LevelInfo {
		t.Errorf("unexpected defaults: %+v", d)
	}

	// Keys given as "" or [] mean the default, and "[]" equals a missing list.
	c := mustParse(t, `{xdp: "", logLevel: "", bpffs: "", gcInterval: "", metrics: {listen: ""},
		staleServices: {action: "", cidrs: []}, services: {kubernetes: "", static: []}, hostCIDRs: [], uplinks: []}`)
	if !reflect.DeepEqual(c, d) {
		t.Errorf("empty values: got %+v, want Default() %+v", c, d)
	}
	// A partial mapping keeps the defaults of its other keys.
	c = mustParse(t, "staleServices: {requireEndpoints: true}\nmetrics: {}\n")
	if c.StaleServices.Action != "drop" || c.Metrics.Listen != DefaultMetricsListen {
		t.Errorf("partial mappings lost defaults: %+v", c)
	}
}

// TestKeys sets each key to each kind of valid value and checks the field or
// accessor that exposes it.
func TestKeys(t *testing.T) {
	tests := []struct {
		in    string
		check func(c *Config) bool
	}{
		{"hostReachability: false", func(c *Config) bool { return !c.HostReachability }},
		{"hostReachability: true", func(c *Config) bool { return c.HostReachability }},
		{"hostReachability: no", func(c *Config) bool { return !c.HostReachability }},
		{"hostReachability: null", func(c *Config) bool { return c.HostReachability }},
		{"hostCIDRs: [169.254.20.10/32, 169.254.25.10, fd00:a::/64, 10.1.2.3/24]", func(c *Config) bool {
			return slices.Equal(c.HostCIDRs(), prefixes("169.254.20.10/32", "169.254.25.10/32", "fd00:a::/64", "10.1.2.0/24")) &&
				c.HostCIDRList[3] == "10.1.2.3/24" // raw kept for round trips
		}},
		{"hostCIDRs: ['::ffff:169.254.20.10']", func(c *Config) bool {
			return slices.Equal(c.HostCIDRs(), prefixes("169.254.20.10/32"))
		}},
		{"staleServices: {cidrs: [10.96.0.0/12, 'fd00:96::/108']}", func(c *Config) bool {
			return slices.Equal(c.ServiceCIDRs(), prefixes("10.96.0.0/12", "fd00:96::/108")) && c.GuardEnabled()
		}},
		{"staleServices: {action: reject}", func(c *Config) bool { return c.StaleAction() == ActionReject }},
		{"staleServices: {action: drop}", func(c *Config) bool { return c.StaleAction() == ActionDrop }},
		{"staleServices: {requireEndpoints: true}", func(c *Config) bool { return c.StaleServices.RequireEndpoints }},
		{"staleServices: {cidrs: [10.96.0.0/16, 'fd00:96::/108']}\nservices: {static: [10.96.0.1, 'fd00:96::a', '::ffff:10.96.0.10']}", func(c *Config) bool {
			return slices.Equal(c.StaticServices(), addrs("10.96.0.1", "fd00:96::a", "10.96.0.10"))
		}},
		{"services: {kubernetes: auto}", func(c *Config) bool { return c.Kubernetes() == KubernetesAuto }},
		{"services: {kubernetes: true}", func(c *Config) bool { return c.Kubernetes() == KubernetesOn }},
		{"services: {kubernetes: 'true'}", func(c *Config) bool { return c.Kubernetes() == KubernetesOn }},
		{"services: {kubernetes: yes}", func(c *Config) bool { return c.Kubernetes() == KubernetesOn }},
		{"services: {kubernetes: false}", func(c *Config) bool { return c.Kubernetes() == KubernetesOff }},
		{"services: {kubernetes: true, kubeconfig: /etc/kubernetes/kubelet.conf}", func(c *Config) bool {
			return c.Services.Kubeconfig == "/etc/kubernetes/kubelet.conf"
		}},
		{"services: {kubeconfig: ./kubeconfig}", func(c *Config) bool { return c.Services.Kubeconfig == "./kubeconfig" }},
		{"uplinks: [eth0, bond0.100, ens1f0np0]", func(c *Config) bool {
			return slices.Equal(c.Uplinks, []string{"eth0", "bond0.100", "ens1f0np0"})
		}},
		{"adopt: {parents: [eth0, eth0.100]}", func(c *Config) bool {
			return slices.Equal(c.Adopt.Parents, []string{"eth0", "eth0.100"})
		}},
		{"adopt: {parents: []}", func(c *Config) bool { return c.Adopt.Parents == nil }},
		{"adopt: {parents: [eth0], docker: auto}", func(c *Config) bool {
			s, auto := c.DockerSocket()
			return s == DefaultDockerSocket && auto
		}},
		{"adopt: {docker: /run/alt/docker.sock}", func(c *Config) bool {
			s, auto := c.DockerSocket()
			return s == "/run/alt/docker.sock" && !auto
		}},
		{"adopt: {parents: [eth0]}", func(c *Config) bool { s, _ := c.DockerSocket(); return s == "" }},
		{"xdp: auto", func(c *Config) bool { return c.XDPMode() == attach.XDPAuto }},
		{"xdp: native", func(c *Config) bool { return c.XDPMode() == attach.XDPNative }},
		{"xdp: generic", func(c *Config) bool { return c.XDPMode() == attach.XDPGeneric }},
		{"xdp: off", func(c *Config) bool { return c.XDPMode() == attach.XDPOff && c.XDP == "off" }},
		{"xdp: 'off'", func(c *Config) bool { return c.XDPMode() == attach.XDPOff }},
		{"metrics: {listen: ':9775'}", func(c *Config) bool { return c.Metrics.Listen == ":9775" }},
		{"metrics: {listen: '[::1]:9775'}", func(c *Config) bool { return c.Metrics.Listen == "[::1]:9775" }},
		{"metrics: {listen: 'localhost:9100'}", func(c *Config) bool { return c.Metrics.Listen == "localhost:9100" }},
		{"metrics: {listen: '0.0.0.0:65535'}", func(c *Config) bool { return c.Metrics.Listen == "0.0.0.0:65535" }},
		{"bpffs: /run/underpass/bpf", func(c *Config) bool { return c.BPFFS == "/run/underpass/bpf" }},
		{"gcInterval: 30s", func(c *Config) bool { return c.GCPeriod() == 30*time.Second }},
		{"gcInterval: 1h30m", func(c *Config) bool { return c.GCPeriod() == 90*time.Minute }},
		{"gcInterval: 1s", func(c *Config) bool { return c.GCPeriod() == time.Second }},
		{"logLevel: debug", func(c *Config) bool { return c.Level() == slog.LevelDebug }},
		{"logLevel: info", func(c *Config) bool { return c.Level() == slog.LevelInfo }},
		{"logLevel: warn", func(c *Config) bool { return c.Level() == slog.LevelWarn }},
		{"logLevel: error", func(c *Config) bool { return c.Level() == slog.LevelError }},
	}
	for _, tt := range tests {
		c := mustParse(t, tt.in)
		if !tt.check(c) {
			t.Errorf("Parse(%q): check failed on %+v", tt.in, c)
		}
	}
}

// TestErrors checks each rejected input names the key and says what is wrong.
// Every want substring must appear, and there must be exactly len(want) errors.
func TestErrors(t *testing.T) {
	tests := []struct {
		in   string
		want []string
	}{
		// Syntax and shape.
		{"a: [", []string{"not valid YAML"}},
		{"xdp: auto\nxdp: off", []string{`key "xdp" already set`}},
		{"- xdp", []string{"must be a mapping of keys to values, not a list"}},
		{"just a string", []string{"must be a mapping of keys to values, not a string"}},
		{"hostReachability: maybe", []string{"hostReachability: got a string, want true or false"}},
		{"hostCIDRs: 10.0.0.0/8", []string{"hostCIDRs: got a string, want a list"}},
		{"metrics: 5", []string{"metrics: got a number, want a mapping"}},
		{"metrics: {listen: [a]}", []string{"metrics.listen: got a list, want a string"}},
		{"staleServices: [drop]", []string{"staleServices: got a list, want a mapping"}},

		// Unknown keys.
		{"hostcidrs: []", []string{"hostcidrs: unknown key; did you mean hostCIDRs? (keys are case-sensitive)"}},
		{"staleServices: {acton: drop}", []string{"staleServices.acton: unknown key; did you mean action?"}},
		{"services: {kubeConfig: /x}", []string{"services.kubeConfig: unknown key; did you mean kubeconfig?"}},
		{"metrics: {address: ':1'}", []string{"metrics.address: unknown key; known keys here: listen"}},
		{"mtu: 1500\nfoo: {bar: 1}", []string{"foo: unknown key; known keys here: hostReachability, hostCIDRs,", "mtu: unknown key"}},

		// hostCIDRs.
		{"hostCIDRs: [10.0.0.0/8, 10.0.0.300/32]", []string{`hostCIDRs[1]: "10.0.0.300/32" is not a CIDR`}},
		{"hostCIDRs: ['', 10.0.0.0/40]", []string{`hostCIDRs[0]: "" is not a CIDR or IP address`, `hostCIDRs[1]: "10.0.0.0/40" is not a CIDR (prefix length out of range)`}},
		{"hostCIDRs: ['::/0']", []string{"hostCIDRs[0]: ::/0 also covers every IPv4 address"}},
		{"hostCIDRs: [10.96.0.10]\nstaleServices: {cidrs: [10.99.0.0/16, 10.96.0.0/16]}",
			[]string{"hostCIDRs[0]: 10.96.0.10/32 overlaps staleServices.cidrs[1] 10.96.0.0/16: the stale service guard would drop traffic to it"}},
		{"hostCIDRs: [10.0.0.0/8]\nstaleServices: {cidrs: [10.96.0.0/12]}",
			[]string{"hostCIDRs[0]: 10.0.0.0/8 overlaps staleServices.cidrs[0] 10.96.0.0/12"}},

		// staleServices.
		{"staleServices: {cidrs: [10.96.0.0/33]}", []string{`staleServices.cidrs[0]: "10.96.0.0/33" is not a CIDR`}},
		{"staleServices: {cidrs: ['::/64']}", []string{"staleServices.cidrs[0]: ::/64 also covers every IPv4 address"}},
		{"staleServices: {action: deny}", []string{`staleServices.action: "deny" is not one of drop, reject`}},
		{"staleServices: {action: DROP}", []string{`staleServices.action: "DROP" is not one of drop, reject`}},
		{"staleServices: {action: no}", []string{`staleServices.action: "false" is not one of drop, reject (unquoted on, off, yes and no are booleans in YAML`}},
		{"staleServices: {requireEndpoints: sometimes}", []string{"staleServices.requireEndpoints: got a string, want true or false"}},

		// services.
		{"staleServices: {cidrs: [10.96.0.0/16]}\nservices: {static: [10.96.0.300]}", []string{`services.static[0]: "10.96.0.300" is not an IP address`}},
		{"staleServices: {cidrs: [10.96.0.0/16]}\nservices: {static: [10.96.0.0/24]}", []string{`services.static[0]: "10.96.0.0/24" is not an IP address (unexpected character (at "/24")); services.static takes single addresses, ranges belong in staleServices.cidrs`}},
		{"staleServices: {cidrs: ['fd00::/64']}\nservices: {static: ['fd00::1%eth0']}", []string{`services.static[0]: "fd00::1%eth0" has an IPv6 zone`}},
		{"staleServices: {cidrs: [10.96.0.0/16]}\nservices: {static: [10.96.0.1, 10.97.0.1]}",
			[]string{"services.static[1]: 10.97.0.1 is outside every staleServices.cidrs range, so listing it has no effect"}},
		{"services: {static: [10.96.0.1, 10.96.0.10]}",
			[]string{"services.static: has 2 addresses but staleServices.cidrs is empty (stale service guard off), so they have no effect"}},
		{"services: {kubernetes: maybe}", []string{`services.kubernetes: "maybe" is not one of auto, true, false`}},
		{"services: {mode: bpf}", []string{`services.mode: "bpf" is not one of host, ebpf`}},
		{"services: {mode: ebpf, kubernetes: false}", []string{"services.mode: is ebpf, which translates Services from their EndpointSlices, but services.kubernetes is false"}},
		{"services: {kubernetes: false, kubeconfig: /root/.kube/config}", []string{"services.kubeconfig: is set but services.kubernetes is false"}},
		{"services: {kubeconfig: \"/x\\ty\"}", []string{`services.kubeconfig: "/x\ty" contains the control character '\t'`}},

		// uplinks.
		{"uplinks: [eth0, eth0]", []string{`uplinks[1]: "eth0" is already uplinks[0]`}},
		{"uplinks: ['']", []string{"uplinks[0]: interface name is empty"}},
		{"adopt: {parents: [eth0.100, 'a/b', eth0.100]}", []string{`adopt.parents[1]: "a/b" contains '/'`, `adopt.parents[2]: "eth0.100" is already adopt.parents[0]`}},
		{"adopt: {parent: [eth0]}", []string{"adopt.parent"}},
		{"adopt: {docker: docker.sock}", []string{`adopt.docker: "docker.sock" is neither auto nor an absolute path`}},
		{"adopt: {docker: yes}", []string{"adopt.docker"}},
		{"uplinks: [averyveryverylongname]", []string{`uplinks[0]: "averyveryverylongname" is longer than 15 bytes`}},
		{"uplinks: [eth0, 'eth 1', 'a/b', 'a:b', '..']", []string{`uplinks[1]: "eth 1" contains ' '`, `uplinks[2]: "a/b" contains '/'`, `uplinks[3]: "a:b" contains ':'`, `uplinks[4]: ".." is not a valid interface name`}},

		// xdp.
		{"xdp: on", []string{`xdp: "true" is not one of auto, native, generic, off (unquoted on, off, yes and no are booleans in YAML; quote the value)`}},
		{"xdp: driver", []string{`xdp: "driver" is not one of auto, native, generic, off`}},

		// metrics.listen.
		{"metrics: {listen: 127.0.0.1}", []string{`metrics.listen: "127.0.0.1" is not host:port (missing port in address)`}},
		{"metrics: {listen: ':http'}", []string{`metrics.listen: port "http" in ":http" is not a number from 1 to 65535`}},
		{"metrics: {listen: ':0'}", []string{`metrics.listen: port "0"`}},
		{"metrics: {listen: ':65536'}", []string{`metrics.listen: port "65536"`}},
		{"metrics: {listen: 'bad_host:9775'}", []string{`metrics.listen: host "bad_host" in "bad_host:9775" is neither an IP address nor a host name`}},
		{"metrics: {listen: '::1:9775'}", []string{`metrics.listen: "::1:9775" is not host:port (too many colons in address)`}},

		// bpffs.
		{"bpffs: sys/fs/bpf/underpass", []string{`bpffs: must be an absolute path`}},
		{"bpffs: \"/sys/fs/bpf/\\0x\"", []string{`bpffs: "/sys/fs/bpf/\x00x" contains the control character`}},

		// gcInterval.
		{"gcInterval: 60", []string{`gcInterval: "60" is not a duration; write it like 30s, 1m or 1h`}},
		{"gcInterval: soon", []string{`gcInterval: "soon" is not a duration`}},
		{"gcInterval: 100ms", []string{"gcInterval: 100ms is too short; use 1s or more"}},
		{"gcInterval: -1m", []string{"gcInterval: -1m0s is too short"}},

		// logLevel.
		{"logLevel: trace", []string{`logLevel: "trace" is not one of debug, info, warn, error`}},
		{"logLevel: warning", []string{`logLevel: "warning" is not one of`}},

		// Several problems are all reported at once.
		{"xdp: x\nlogLevel: y\nbpffs: z\nstaleServices: {action: w}", []string{"xdp:", "logLevel:", "bpffs:", "staleServices.action:"}},
	}
	for _, tt := range tests {
		c, err := Parse([]byte(tt.in))
		if err == nil {
			t.Errorf("Parse(%q) succeeded: %+v", tt.in, c)
			continue
		}
		if c != nil {
			t.Errorf("Parse(%q) returned a config with its error", tt.in)
		}
		msg := err.Error()
		for _, w := range tt.want {
			if !strings.Contains(msg, w) {
				t.Errorf("Parse(%q) error:\n%s\nwant it to contain %q", tt.in, msg, w)
			}
		}
		if n := len(strings.Split(msg, "\n")); n != len(tt.want) && !strings.Contains(msg, "yaml") {
			t.Errorf("Parse(%q) gave %d errors, want %d:\n%s", tt.in, n, len(tt.want), msg)
		}
		if msg != "" && msg[0] >= 'A' && msg[0] <= 'Z' {
			t.Errorf("error %q starts with a capital", msg)
		}
	}
}

func TestValidateAfterEdit(t *testing.T) {
	c := mustParse(t, example)
	c.StaleServices.Action = "reject"
	c.HostCIDRList = append(c.HostCIDRList, "169.254.25.10")
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	if c.StaleAction() != ActionReject || len(c.HostCIDRs()) != 2 {
		t.Errorf("accessors not refreshed: %v %v", c.StaleAction(), c.HostCIDRs())
	}

	// A rejected config must not keep serving the old values.
	c.XDP = "fast"
	if err := c.Validate(); err == nil {
		t.Fatal("Validate accepted xdp: fast")
	}
	if c.ServiceCIDRs() != nil || c.HostCIDRs() != nil || c.GCPeriod() != 0 {
		t.Errorf("accessors still set after a failed Validate: %v %v %v", c.ServiceCIDRs(), c.HostCIDRs(), c.GCPeriod())
	}

	// A zero Config is not valid: Parse and Default fill the defaults.
	if err := (&Config{}).Validate(); err == nil {
		t.Error("zero Config validated")
	}
}

func TestAccessorsReturnCopies(t *testing.T) {
	c := mustParse(t, example)
	c.ServiceCIDRs()[0] = netip.Prefix{}
	c.HostCIDRs()[0] = netip.Prefix{}
	c.StaticServices()[0] = netip.Addr{}
	if !c.ServiceCIDRs()[0].IsValid() || !c.HostCIDRs()[0].IsValid() || !c.StaticServices()[0].IsValid() {
		t.Error("an accessor exposed internal state")
	}
}

func TestValidateAgainst(t *testing.T) {
	tests := []struct {
		name        string
		cidrs       string
		nodes, pods []netip.Prefix
		want        []string
	}{
		{name: "disjoint", cidrs: "[10.96.0.0/16]", nodes: prefixes("10.99.0.0/24"), pods: prefixes("10.99.0.0/24", "fd00:99::/64")},
		{name: "guard off", cidrs: "[]", nodes: prefixes("0.0.0.0/0")},
		{
			name: "service range contains the node subnet", cidrs: "[10.96.0.0/12]", nodes: prefixes("10.99.0.0/24"),
			want: []string{"staleServices.cidrs[0]: service CIDR 10.96.0.0/12 overlaps node subnet 10.99.0.0/24: pods and hosts in 10.99.0.0/24 would be treated as services (and dropped as stale); pick a service range outside the node and endpoint subnets"},
		},
		{
			name: "endpoint subnet inside, node subnet given with host bits", cidrs: "[10.96.0.0/16, 'fd00:96::/108']",
			nodes: prefixes("10.96.7.1/24"), pods: prefixes("fd00:96::/120"),
			want: []string{
				"staleServices.cidrs[0]: service CIDR 10.96.0.0/16 overlaps node subnet 10.96.7.0/24: pods and hosts in 10.96.7.0/24",
				"staleServices.cidrs[1]: service CIDR fd00:96::/108 overlaps endpoint subnet fd00:96::/120",
			},
		},
		{
			name: "node subnet contains the service range", cidrs: "[10.96.0.0/16]", pods: prefixes("10.0.0.0/8"),
			want: []string{"staleServices.cidrs[0]: service CIDR 10.96.0.0/16 overlaps endpoint subnet 10.0.0.0/8: pods and hosts in 10.96.0.0/16"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := mustParse(t, "staleServices: {cidrs: "+tt.cidrs+"}")
			testutil.WantErrorLines(t, c.ValidateAgainst(tt.nodes, tt.pods), tt.want)
		})
	}

	// ValidateAgainst also reports what Validate would.
	c := mustParse(t, example)
	c.LogLevel = "loud"
	if err := c.ValidateAgainst(nil, nil); err == nil || !strings.Contains(err.Error(), "logLevel") {
		t.Errorf("ValidateAgainst on an invalid config: %v", err)
	}
}

func TestRoundTrip(t *testing.T) {
	for _, in := range []string{example, "", "xdp: off\nhostReachability: false\nservices: {kubernetes: false}\n",
		"staleServices: {cidrs: ['::ffff:10.96.0.0/112'], action: reject, requireEndpoints: true}\nservices: {static: ['10.96.0.1'], kubeconfig: '/k'}\ngcInterval: 90s\nlogLevel: debug\nuplinks: ['1', 'yes']\n"} {
		c := mustParse(t, in)
		out, err := yaml.Marshal(c)
		if err != nil {
			t.Fatal(err)
		}
		c2, err := Parse(out)
		if err != nil {
			t.Fatalf("re-parse of\n%s: %v", out, err)
		}
		if !reflect.DeepEqual(c, c2) {
			t.Errorf("round trip of %q changed it:\n%+v\n%+v", in, c, c2)
		}
	}
}

func TestEnumStrings(t *testing.T) {
	for _, tt := range []struct {
		got, want string
	}{
		{ActionDrop.String(), "drop"}, {ActionReject.String(), "reject"},
		{KubernetesAuto.String(), "auto"}, {KubernetesOn.String(), "true"}, {KubernetesOff.String(), "false"},
		{Action(7).String(), "invalid(7)"},
	} {
		if tt.got != tt.want {
			t.Errorf("got %q, want %q", tt.got, tt.want)
		}
	}
}

func TestLoad(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "underpass.yaml")
	if err := os.WriteFile(path, []byte(example), 0o644); err != nil {
		t.Fatal(err)
	}
	c, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(c, mustParse(t, example)) {
		t.Error("Load and Parse disagree")
	}

	// Through a symlink, as a mounted ConfigMap is.
	link := filepath.Join(dir, "link.yaml")
	if err := os.Symlink(path, link); err != nil {
		t.Fatal(err)
	}
	if _, err := Load(link); err != nil {
		t.Errorf("Load via symlink: %v", err)
	}

	if _, err := Load(filepath.Join(dir, "missing.yaml")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing file: %v, want ErrNotExist", err)
	}
	if _, err := Load(dir); err == nil || !strings.Contains(err.Error(), "is a directory") {
		t.Errorf("directory: %v", err)
	}

	bad := filepath.Join(dir, "bad.yaml")
	if err := os.WriteFile(bad, []byte("xdp: fast\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Load(bad); err == nil || !strings.Contains(err.Error(), "config "+bad+": xdp:") {
		t.Errorf("invalid file: %v, want the path and the key", err)
	}

	big := filepath.Join(dir, "big.yaml")
	if err := os.WriteFile(big, []byte("# "+strings.Repeat("x", MaxFileSize)+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Load(big); err == nil || !strings.Contains(err.Error(), "larger than") {
		t.Errorf("huge file: %v", err)
	}
}
