// Package config is underpassd's configuration file (/etc/underpass/underpass.yaml):
// its schema, defaults, strict parsing, validation with messages that name the
// key to fix, typed accessors, and a polling watcher for live reloads.
//
// The struct keeps the raw strings so a config re-marshals to what the user
// wrote; the typed values (prefixes, addresses, enums, durations) are derived by
// Validate and read through accessors.
package config

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"reflect"
	"slices"
	"strings"
	"time"

	yamlv2 "go.yaml.in/yaml/v2"
	"sigs.k8s.io/yaml"

	"github.com/underpass-cni/underpass/internal/attach"
	"github.com/underpass-cni/underpass/internal/loader"
)

// Defaults. DefaultMetricsListen (and loader.DefaultBPFFS) are part of the
// user-facing contract (docs/architecture.md, "The contract").
const (
	// DefaultPath is underpassd's config file; underpassctl oci-hook reads
	// the same one, so the agent and the hook agree on adopt.parents.
	DefaultPath          = "/etc/underpass/underpass.yaml"
	DefaultMetricsListen = "127.0.0.1:9775"
	DefaultGCInterval    = "1m"

	// MaxFileSize bounds what Load and Watch read: a config is a few hundred
	// bytes, so anything this big is a mistake (a wrong path, a log file), and
	// reading it every poll would be wasteful.
	MaxFileSize = 1 << 20
)

// Config is the agent configuration. Field tags are the YAML keys (sigs.k8s.io/yaml
// goes through encoding/json, hence json tags; the yaml tags are for direct
// go.yaml.in/yaml users). Build one with Default or Parse; after changing
// fields by hand, call Validate before using the accessors.
type Config struct {
	// HostReachability turns host <-> endpoint traffic (the parent hairpin) on or off.
	HostReachability bool `json:"hostReachability" yaml:"hostReachability"`
	// HostCIDRList holds more destinations steered from endpoints to the host
	// stack (node-local DNS and the like); read them parsed with HostCIDRs.
	HostCIDRList  []string      `json:"hostCIDRs,omitempty" yaml:"hostCIDRs,omitempty"`
	StaleServices StaleServices `json:"staleServices" yaml:"staleServices"`
	Services      Services      `json:"services" yaml:"services"`
	// Uplinks are extra NICs whose egress also gets the stale service guard,
	// for when the host routes a stale VIP out of another NIC than the parent.
	Uplinks []string `json:"uplinks,omitempty" yaml:"uplinks,omitempty"`
	// Adopt says whose macvlan/ipvlan slaves the agent serves though no
	// CNI call registered them (Docker, Podman, ip netns).
	Adopt Adopt `json:"adopt" yaml:"adopt"`
	// XDP is auto, native, generic or off; read it with XDPMode.
	XDP     string  `json:"xdp" yaml:"xdp"`
	Metrics Metrics `json:"metrics" yaml:"metrics"`
	// BPFFS is the pin directory shared with the CNI plugin.
	BPFFS string `json:"bpffs" yaml:"bpffs"`
	// GCInterval is the endpoint garbage collection period as a Go duration
	// string; read it with GCPeriod.
	GCInterval string `json:"gcInterval" yaml:"gcInterval"`
	// LogLevel is debug, info, warn or error; read it with Level.
	LogLevel string `json:"logLevel" yaml:"logLevel"`

	parsed parsed
}

// Adopt configures adoption (internal/adopt).
type Adopt struct {
	// Parents are the parents (host NICs, VLAN sub-interfaces) whose
	// slaves in any network namespace are registered as endpoints; empty
	// adopts nothing.
	Parents []string `json:"parents,omitempty" yaml:"parents,omitempty"`
	// Docker is a Docker engine's API socket to follow, so that its
	// containers on macvlan/ipvlan networks are adopted as soon as they
	// start and named after the container: "" (off), "auto" (the default
	// socket, /var/run/docker.sock, once it exists) or an absolute path.
	// Read it with DockerSocket.
	Docker string `json:"docker,omitempty" yaml:"docker,omitempty"`
}

// DockerSocket is the engine socket adopt.docker names ("" when off), and
// whether it was auto: its absence is no fault.
func (c *Config) DockerSocket() (socket string, auto bool) {
	if c.Adopt.Docker == "auto" {
		return DefaultDockerSocket, true
	}
	return c.Adopt.Docker, false
}

// DefaultDockerSocket is where adopt.docker: auto looks for the engine.
const DefaultDockerSocket = "/var/run/docker.sock"

// StaleServices configures the stale service guard.
type StaleServices struct {
	// CIDRs are the service ranges; empty turns the guard off. Read them
	// parsed with Config.ServiceCIDRs.
	CIDRs []string `json:"cidrs,omitempty" yaml:"cidrs,omitempty"`
	// Action is drop or reject; read it with Config.StaleAction.
	Action string `json:"action" yaml:"action"`
	// RequireEndpoints makes a service without ready endpoints count as stale.
	RequireEndpoints bool `json:"requireEndpoints" yaml:"requireEndpoints"`
}

// Services says where live service IPs come from.
type Services struct {
	// Static service IPs are always live; read them with Config.StaticServices.
	Static []string `json:"static,omitempty" yaml:"static,omitempty"`
	// Kubernetes is auto, true or false; read it with Config.Kubernetes.
	Kubernetes string `json:"kubernetes" yaml:"kubernetes"`
	// Kubeconfig is a kubeconfig path; empty means in-cluster credentials.
	Kubeconfig string `json:"kubeconfig,omitempty" yaml:"kubeconfig,omitempty"`
	// Masquerade: the agent's nftables table masquerades the Service flows
	// of underlay pods that the host translates to a backend (kube-proxy DNAT
	// or IPVS) and forwards, so
	// that the backend's reply comes back through the host (internal/hostnat).
	Masquerade bool `json:"masquerade" yaml:"masquerade"`
	// Mode is host or ebpf; read it with Config.ServiceMode.
	Mode string `json:"mode" yaml:"mode"`
}

// Metrics configures the HTTP endpoint serving /metrics, /healthz and /readyz.
type Metrics struct {
	Listen string `json:"listen" yaml:"listen"`
}

// parsed holds what Validate derives from the raw fields.
type parsed struct {
	hostCIDRs    []netip.Prefix
	serviceCIDRs []netip.Prefix
	static       []netip.Addr
	action       Action
	kubernetes   KubernetesMode
	serviceMode  ServiceMode
	xdp          attach.XDPMode
	gcInterval   time.Duration
	level        slog.Level
}

// Action is what the stale service guard does with a stale packet.
type Action int

const (
	// ActionDrop drops the packet (counted per source endpoint).
	ActionDrop Action = iota
	// ActionReject answers a TCP SYN with RST|ACK so the client fails fast;
	// other packets are dropped.
	ActionReject
)

var actionNames = []string{"drop", "reject"}

func (a Action) String() string { return enumString(actionNames, int(a)) }

// KubernetesMode says whether live services are read from the Kubernetes API.
type KubernetesMode int

const (
	// KubernetesAuto uses the API when credentials are found (in-cluster or
	// services.kubeconfig) and runs on static services alone otherwise.
	KubernetesAuto KubernetesMode = iota
	// KubernetesOn requires the API.
	KubernetesOn
	// KubernetesOff never talks to the API.
	KubernetesOff
)

var kubernetesNames = []string{"auto", "true", "false"}

func (k KubernetesMode) String() string { return enumString(kubernetesNames, int(k)) }

// ServiceMode is where underlay pods' ClusterIP traffic is translated.
type ServiceMode int

const (
	// ServiceModeHost steers it to the host, where kube-proxy translates it
	// (the default: it works with every kube-proxy mode and needs nothing
	// but the Service VIPs).
	ServiceModeHost ServiceMode = iota
	// ServiceModeEBPF translates it in the pod's own egress program, from
	// the Services' EndpointSlices: no detour through the host, the backend
	// sees the client's address. Needs the Kubernetes API.
	ServiceModeEBPF
)

var serviceModeNames = []string{"host", "ebpf"}

func (m ServiceMode) String() string { return enumString(serviceModeNames, int(m)) }

// xdpNames are the xdp values, the loader's modes.
var xdpNames = []string{string(attach.XDPAuto), string(attach.XDPNative), string(attach.XDPGeneric), string(attach.XDPOff)}

var levelNames = []string{"debug", "info", "warn", "error"}
var levelValues = []slog.Level{slog.LevelDebug, slog.LevelInfo, slog.LevelWarn, slog.LevelError}

func enumString(names []string, i int) string {
	if i >= 0 && i < len(names) {
		return names[i]
	}
	return fmt.Sprintf("invalid(%d)", i)
}

// Default returns the configuration an empty file gives: host reachability on,
// stale guard off, Kubernetes auto, XDP auto.
func Default() *Config {
	c := &Config{
		HostReachability: true,
		StaleServices:    StaleServices{Action: "drop"},
		Services:         Services{Kubernetes: "auto", Masquerade: true, Mode: "host"},
		XDP:              "auto",
		Metrics:          Metrics{Listen: DefaultMetricsListen},
		BPFFS:            loader.DefaultBPFFS,
		GCInterval:       DefaultGCInterval,
		LogLevel:         "info",
	}
	// The defaults are valid by construction; Validate only fills the parsed
	// fields here, and a test guards that it returns nil.
	_ = c.Validate()
	return c
}

// applyDefaults fills keys that were left out or given as "" and normalises
// what YAML 1.1 does to unquoted words, so the raw fields are always meaningful.
func (c *Config) applyDefaults() {
	d := Default()
	setIfEmpty := func(s *string, def string) {
		if *s == "" {
			*s = def
		}
	}
	setIfEmpty(&c.StaleServices.Action, d.StaleServices.Action)
	setIfEmpty(&c.Services.Kubernetes, d.Services.Kubernetes)
	setIfEmpty(&c.Services.Mode, d.Services.Mode)
	setIfEmpty(&c.XDP, d.XDP)
	setIfEmpty(&c.Metrics.Listen, d.Metrics.Listen)
	setIfEmpty(&c.BPFFS, d.BPFFS)
	setIfEmpty(&c.GCInterval, d.GCInterval)
	setIfEmpty(&c.LogLevel, d.LogLevel)

	// The documented "xdp: off" is the boolean false in YAML 1.1 and arrives
	// here as "false"; users should not have to quote a documented value.
	if c.XDP == "false" {
		c.XDP = "off"
	}

	// "key: []" and a missing key mean the same; one spelling keeps parsed
	// configs comparable with reflect.DeepEqual.
	nilIfEmpty := func(s *[]string) {
		if len(*s) == 0 {
			*s = nil
		}
	}
	nilIfEmpty(&c.HostCIDRList)
	nilIfEmpty(&c.StaleServices.CIDRs)
	nilIfEmpty(&c.Services.Static)
	nilIfEmpty(&c.Uplinks)
	nilIfEmpty(&c.Adopt.Parents)
}

// Parse decodes a YAML config strictly (unknown or duplicate keys are errors),
// applies defaults for missing keys and validates the result. An empty document
// gives Default(). Errors name the key path to fix.
func Parse(data []byte) (*Config, error) {
	// Decode once into a generic tree to check key names exactly: encoding/json
	// (under sigs.k8s.io/yaml) matches keys case-insensitively, so "hostcidrs"
	// would otherwise be accepted silently.
	var tree any
	if err := yamlv2.UnmarshalStrict(data, &tree); err != nil {
		return nil, fmt.Errorf("not valid YAML: %w", err)
	}
	if tree == nil {
		return Default(), nil
	}
	if _, ok := tree.(map[any]any); !ok {
		return nil, fmt.Errorf("the config must be a mapping of keys to values, not %s", yamlKind(tree))
	}
	if errs := checkKeys(tree, reflect.TypeFor[Config](), ""); len(errs) > 0 {
		return nil, errors.Join(errs...)
	}

	c := Default()
	if err := yaml.UnmarshalStrict(data, c); err != nil {
		return nil, typeError(err)
	}
	c.applyDefaults()
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return c, nil
}

// Load reads and parses the config file at path (symlinks followed, as with a
// mounted ConfigMap). Errors are prefixed with the path.
func Load(path string) (*Config, error) {
	data, err := readFile(path)
	if err != nil {
		return nil, err
	}
	c, err := Parse(data)
	if err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	return c, nil
}

func readFile(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	defer f.Close()
	if fi, err := f.Stat(); err != nil {
		return nil, fmt.Errorf("config: %w", err)
	} else if fi.IsDir() {
		return nil, fmt.Errorf("config %s: is a directory, not a file", path)
	}
	data, err := io.ReadAll(io.LimitReader(f, MaxFileSize+1))
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	if len(data) > MaxFileSize {
		return nil, fmt.Errorf("config %s: larger than %d bytes; is this the right file?", path, MaxFileSize)
	}
	return data, nil
}

// ServiceCIDRs returns staleServices.cidrs parsed and canonical (masked,
// IPv4-mapped IPv6 written as IPv4). Empty means the stale guard is off.
func (c *Config) ServiceCIDRs() []netip.Prefix { return slices.Clone(c.parsed.serviceCIDRs) }

// HostCIDRs returns hostCIDRs parsed and canonical.
func (c *Config) HostCIDRs() []netip.Prefix { return slices.Clone(c.parsed.hostCIDRs) }

// StaticServices returns services.static parsed (IPv4-mapped IPv6 unmapped).
func (c *Config) StaticServices() []netip.Addr { return slices.Clone(c.parsed.static) }

// ServiceMode returns services.mode.
func (c *Config) ServiceMode() ServiceMode { return c.parsed.serviceMode }

// StaleAction returns staleServices.action.
func (c *Config) StaleAction() Action { return c.parsed.action }

// Kubernetes returns services.kubernetes.
func (c *Config) Kubernetes() KubernetesMode { return c.parsed.kubernetes }

// XDPMode returns xdp.
func (c *Config) XDPMode() attach.XDPMode {
	if c.parsed.xdp == "" {
		return attach.XDPAuto // not validated: the default
	}
	return c.parsed.xdp
}

// GCPeriod returns gcInterval as a duration.
func (c *Config) GCPeriod() time.Duration { return c.parsed.gcInterval }

// Level returns logLevel as a slog level.
func (c *Config) Level() slog.Level { return c.parsed.level }

// GuardEnabled reports whether the stale service guard is on (any service CIDR set).
func (c *Config) GuardEnabled() bool { return len(c.parsed.serviceCIDRs) > 0 }

// checkKeys reports every key in tree that the struct type t does not have,
// with its full path and, where one is close, the key that was probably meant.
// Values of the wrong shape are left for the decoder to report.
func checkKeys(tree any, t reflect.Type, path string) []error {
	switch t.Kind() {
	case reflect.Pointer:
		return checkKeys(tree, t.Elem(), path)
	case reflect.Slice:
		list, _ := tree.([]any)
		var errs []error
		for i, v := range list {
			errs = append(errs, checkKeys(v, t.Elem(), fmt.Sprintf("%s[%d]", path, i))...)
		}
		return errs
	case reflect.Struct:
	default:
		return nil
	}
	m, ok := tree.(map[any]any)
	if !ok {
		return nil
	}
	fields := map[string]reflect.Type{}
	var names []string
	for i := range t.NumField() {
		f := t.Field(i)
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		if !f.IsExported() || name == "" || name == "-" {
			continue
		}
		fields[name] = f.Type
		names = append(names, name)
	}
	keys := make([]string, 0, len(m))
	byName := map[string]any{}
	for k, v := range m {
		ks := fmt.Sprint(k)
		keys = append(keys, ks)
		byName[ks] = v
	}
	slices.Sort(keys) // map order is random; errors should not be
	var errs []error
	for _, k := range keys {
		p := k
		if path != "" {
			p = path + "." + k
		}
		ft, ok := fields[k]
		if !ok {
			errs = append(errs, fmt.Errorf("%s: unknown key; %s", p, suggest(k, names)))
			continue
		}
		errs = append(errs, checkKeys(byName[k], ft, p)...)
	}
	return errs
}

// suggest names the known key closest to k, or lists them all.
func suggest(k string, names []string) string {
	best, bestDist := "", 3 // more than 2 edits away is not a typo
	for _, n := range names {
		if strings.EqualFold(n, k) {
			return "did you mean " + n + "? (keys are case-sensitive)"
		}
		if d := editDistance(strings.ToLower(k), strings.ToLower(n)); d < bestDist {
			best, bestDist = n, d
		}
	}
	if best != "" {
		return "did you mean " + best + "?"
	}
	return "known keys here: " + strings.Join(names, ", ")
}

// editDistance is the Levenshtein distance, for typo suggestions on short keys.
func editDistance(a, b string) int {
	ra, rb := []rune(a), []rune(b)
	prev := make([]int, len(rb)+1)
	cur := make([]int, len(rb)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(ra); i++ {
		cur[0] = i
		for j := 1; j <= len(rb); j++ {
			cost := 1
			if ra[i-1] == rb[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(rb)]
}

func yamlKind(v any) string {
	switch v.(type) {
	case []any:
		return "a list"
	case map[any]any:
		return "a mapping"
	case string:
		return "a string"
	case bool:
		return "a boolean"
	case int, int64, uint64, float64:
		return "a number"
	}
	return fmt.Sprintf("a %T", v)
}

// typeError rewrites encoding/json's "cannot unmarshal number into Go struct
// field Config.metrics of type config.Metrics" into "metrics: got a number,
// want a mapping", which is what a YAML author can act on.
func typeError(err error) error {
	var te *json.UnmarshalTypeError
	if !errors.As(err, &te) || te.Field == "" {
		return fmt.Errorf("decoding: %w", err)
	}
	got := map[string]string{"array": "a list", "object": "a mapping", "bool": "a boolean", "number": "a number", "string": "a string"}[te.Value]
	if got == "" {
		got = te.Value
	}
	var want string
	switch te.Type.Kind() {
	case reflect.Bool:
		want = "true or false"
	case reflect.String:
		want = "a string"
	case reflect.Slice:
		want = "a list"
	case reflect.Struct, reflect.Map:
		want = "a mapping"
	default:
		want = te.Type.String()
	}
	return fmt.Errorf("%s: got %s, want %s", te.Field, got, want)
}
