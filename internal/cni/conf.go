// Package cni is the underpass CNI plugin as a library: cmd/underpass is a
// thin main around Funcs.
//
// The plugin works in two ways (see the README, "CNI configuration"):
//   - main plugin: it creates the macvlan/ipvlan slave on master, delegates
//     IPAM and configures the interface;
//   - chained after the standard macvlan/ipvlan plugins: it adopts the slave
//     named CNI_IFNAME from prevResult and passes the result on unchanged.
//
// Either way it registers the endpoint in the pinned datapath (bpffs), makes
// sure the parent NIC is registered and carries the hairpin program, and
// attaches the per-endpoint programs inside the container netns. It never
// adds service or host routes: steering is by map.
package cni

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"strings"
	"unicode"
	"unicode/utf8"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/version"
	"github.com/vishvananda/netlink"

	"github.com/underpass-cni/underpass/internal/cidrs"
	"github.com/underpass-cni/underpass/internal/loader"
)

// Values of the "mode" key.
const (
	ModeMacvlan = "macvlan"
	ModeIPvlan  = "ipvlan"
)

// SupportedVersions are the CNI spec versions the plugin speaks. GC and
// STATUS exist from 1.1.0 on; CHECK from 0.4.0.
var SupportedVersions = version.PluginSupports("0.3.1", "0.4.0", "1.0.0", "1.1.0")

// NetConf is the plugin's JSON configuration as written by the user.
type NetConf struct {
	types.PluginConf

	// Master is the parent NIC (main mode). Empty: the NIC of the default
	// route when another key says main mode; with no interface key at all
	// the entry is chained.
	Master      string `json:"master,omitempty"`
	Mode        string `json:"mode,omitempty"`        // macvlan (default) | ipvlan
	MacvlanMode string `json:"macvlanMode,omitempty"` // bridge (default) | vepa | private (passthru is refused)
	IPvlanMode  string `json:"ipvlanMode,omitempty"`  // l2 (default) | l3 | l3s
	MTU         int    `json:"mtu,omitempty"`         // 0: the master's
	BPFFS       string `json:"bpffs,omitempty"`       // default /sys/fs/bpf/underpass
	// MAC is the slave's MAC (main mode, macvlan), the reference macvlan
	// plugin's key; CNI_ARGS MAC overrides it, and runtimeConfig.mac (the
	// "mac" capability: Multus's "mac" in a network selection) both.
	// Empty: the kernel's random one. Not an interface key: a chained
	// entry leaves the MAC to the plugin before it.
	MAC           string `json:"mac,omitempty"`
	RuntimeConfig struct {
		MAC string `json:"mac,omitempty"`
	} `json:"runtimeConfig,omitempty"`
}

// Conf is a validated configuration.
type Conf struct {
	NetConf

	// Chained: no interface keys (master, mode, macvlanMode, ipvlanMode, mtu,
	// ipam). It is read from the config alone, never from prevResult:
	// libcni sends GC and STATUS none, and a runtime that lost its result
	// cache sends DEL none, but the entry is chained all the same.
	Chained bool
	// Kind is the link kind the slave has (main mode) or must have: macvlan
	// or ipvlan.
	Kind string
	// DatapathMode is what the parent and the endpoint are registered as.
	DatapathMode    loader.Mode
	MacvlanLinkMode netlink.MacvlanMode
	IPvlanLinkMode  netlink.IPVlanMode
	// SlaveMAC is the MAC asked for (mac, runtimeConfig.mac; add applies
	// CNI_ARGS MAC), nil for the kernel's.
	SlaveMAC net.HardwareAddr
	// IPAMSubnets are the subnets and addresses the ipam section names, where
	// they can be read (host-local ranges/subnet, static addresses): checked
	// against the service CIDRs before anything is allocated.
	IPAMSubnets []netip.Prefix
}

// ParseConf decodes and validates the stdin configuration, including
// prevResult. It needs no privileges and touches nothing: what depends on
// the node (does master exist, its MTU) is checked by the verbs. Errors are
// *types.Error with code 6 (not JSON) or 7 (invalid config).
func ParseConf(stdin []byte) (*Conf, error) {
	c := &Conf{}
	if err := json.Unmarshal(stdin, &c.NetConf); err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, fmt.Sprintf("parse network configuration: %v", err), "")
	}
	if c.BPFFS == "" {
		c.BPFFS = loader.DefaultBPFFS
	}
	if !filepath.IsAbs(c.BPFFS) {
		return nil, invalidConf("bpffs %q is not an absolute path: use the agent's bpffs, default %s", c.BPFFS, loader.DefaultBPFFS)
	}
	c.BPFFS = filepath.Clean(c.BPFFS)
	if c.Master != "" {
		if err := validIfName(c.Master); err != nil {
			return nil, invalidConf("master %q is not a valid interface name (%v): set master to an existing NIC", c.Master, err)
		}
	}

	switch c.Mode {
	case "", ModeMacvlan:
		c.Kind = ModeMacvlan
		if c.IPvlanMode != "" {
			return nil, invalidConf("ipvlanMode %q is set but mode is macvlan: set mode to ipvlan or remove ipvlanMode", c.IPvlanMode)
		}
		m, err := macvlanMode(c.MacvlanMode)
		if err != nil {
			return nil, err
		}
		c.MacvlanLinkMode = m
		c.DatapathMode = loader.ModeMacvlan
	case ModeIPvlan:
		c.Kind = ModeIPvlan
		if c.MacvlanMode != "" {
			return nil, invalidConf("macvlanMode %q is set but mode is ipvlan: set mode to macvlan or remove macvlanMode", c.MacvlanMode)
		}
		m, dm, err := ipvlanMode(c.IPvlanMode)
		if err != nil {
			return nil, err
		}
		c.IPvlanLinkMode, c.DatapathMode = m, dm
	default:
		return nil, invalidConf("unknown mode %q: use macvlan or ipvlan", c.Mode)
	}
	// runtimeConfig.mac last: it wins.
	for _, m := range [][2]string{{"mac", c.MAC}, {"runtimeConfig.mac", c.RuntimeConfig.MAC}} {
		if m[1] == "" {
			continue
		}
		hw, err := parseSlaveMAC(m[1])
		if err != nil {
			return nil, invalidConf("%s %q: %v", m[0], m[1], err)
		}
		c.SlaveMAC = hw
	}
	if err := c.checkMACKind(); err != nil {
		return nil, err
	}
	// 68 is the IPv4 minimum; anything above 65535 no NIC carries.
	if c.MTU != 0 && (c.MTU < 68 || c.MTU > 65535) {
		return nil, invalidConf("mtu %d is out of range: use 68..65535 (at most the master's MTU), or leave it out for the master's", c.MTU)
	}

	if c.RawPrevResult != nil {
		if err := version.ParsePrevResult(&c.PluginConf); err != nil {
			return nil, types.NewError(types.ErrDecodingFailure, fmt.Sprintf("prevResult: %v", err), "")
		}
	}
	c.Chained = !c.hasInterfaceKeys()

	subnets, err := ipamSubnets(stdin)
	if err != nil {
		return nil, err
	}
	c.IPAMSubnets = subnets
	return c, nil
}

// parseConfForDel is ParseConf for DEL, which must not be blocked by a
// config that no longer validates or decodes (edited since ADD, say
// `"mtu": "1500"` quoted in a NetworkAttachmentDefinition, or rejected by
// ADD): it falls back to the keys it can read and cleans up what they
// name. Only input that is no JSON object at all is refused.
func parseConfForDel(stdin []byte) (*Conf, error) {
	c, err := ParseConf(stdin)
	var te *types.Error
	if err == nil || !errors.As(err, &te) || te.Code != types.ErrInvalidNetworkConfig && te.Code != types.ErrDecodingFailure {
		return c, err
	}
	var raw map[string]json.RawMessage
	if json.Unmarshal(stdin, &raw) != nil || raw == nil {
		return nil, err
	}
	str := func(v json.RawMessage) string {
		var s string
		_ = json.Unmarshal(v, &s) // a key of another type reads as unset
		return s
	}
	c = &Conf{}
	c.CNIVersion, c.Name, c.Type = str(raw["cniVersion"]), str(raw["name"]), str(raw["type"])
	c.Master, c.Mode, c.MacvlanMode, c.IPvlanMode = str(raw["master"]), str(raw["mode"]), str(raw["macvlanMode"]), str(raw["ipvlanMode"])
	c.BPFFS = str(raw["bpffs"])
	var ipam map[string]json.RawMessage
	_ = json.Unmarshal(raw["ipam"], &ipam)
	c.IPAM.Type = str(ipam["type"])
	if c.BPFFS == "" || !filepath.IsAbs(c.BPFFS) {
		c.BPFFS = loader.DefaultBPFFS
	}
	// Chained when in doubt: main mode deletes the interface, which in a
	// chain is the previous plugin's (its DEL, a dhcp release through it,
	// would then fail), while a main-mode link left alone goes with the
	// netns. An mtu counts unless it reads as 0 (number or string).
	mtu := false
	if v := raw["mtu"]; len(v) > 0 {
		var n float64
		if json.Unmarshal(v, &n) == nil { // null reads as 0
			mtu = n != 0
		} else {
			mtu = str(v) != "" && str(v) != "0"
		}
	}
	c.Chained = !c.hasInterfaceKeys() && !mtu
	return c, nil
}

// hasInterfaceKeys reports whether the config describes an interface for
// the plugin to create: then it is the main plugin, also at DEL time, when
// libcni hands every plugin of the list the final result as prevResult.
func (c *Conf) hasInterfaceKeys() bool {
	return c.Master != "" || c.Mode != "" || c.MacvlanMode != "" || c.IPvlanMode != "" || c.MTU != 0 || c.IPAM.Type != ""
}

// passthruRefused says why: a passthru slave takes the parent's MAC and
// all of its traffic, so the host has no path of its own on that NIC for
// underpass to hairpin, steer or guard.
const passthruRefused = "underpass cannot honour passthru (the pod takes the parent NIC's MAC and all its traffic, so the host has no path to it on that NIC): use bridge, vepa or private, or leave underpass out of this network"

func macvlanMode(s string) (netlink.MacvlanMode, error) {
	switch s {
	case "", "bridge":
		return netlink.MACVLAN_MODE_BRIDGE, nil
	case "vepa":
		return netlink.MACVLAN_MODE_VEPA, nil
	case "private":
		return netlink.MACVLAN_MODE_PRIVATE, nil
	case "passthru":
		return 0, invalidConf("macvlanMode passthru: %s", passthruRefused)
	}
	return 0, invalidConf("unknown macvlanMode %q: use bridge, vepa or private", s)
}

func ipvlanMode(s string) (netlink.IPVlanMode, loader.Mode, error) {
	switch s {
	case "", "l2":
		return netlink.IPVLAN_MODE_L2, loader.ModeIPvlanL2, nil
	case "l3":
		return netlink.IPVLAN_MODE_L3, loader.ModeIPvlanL3, nil
	case "l3s":
		return netlink.IPVLAN_MODE_L3S, loader.ModeIPvlanL3S, nil
	}
	return 0, 0, invalidConf("unknown ipvlanMode %q: use l2, l3 or l3s", s)
}

func validIfName(s string) error {
	if len(s) >= 16 {
		return errors.New("longer than 15 bytes")
	}
	if s == "." || s == ".." || strings.ContainsAny(s, "/: \t\n\x00") {
		return errors.New("contains '/', ':' or whitespace")
	}
	return nil
}

// ipamSubnets reads the prefixes an ipam section declares, for the IPAM
// plugins whose format is known. Other IPAMs (whereabouts, dhcp...) are
// checked on the addresses they hand out instead.
func ipamSubnets(stdin []byte) ([]netip.Prefix, error) {
	var raw struct {
		IPAM struct {
			Type   string `json:"type"`
			Subnet string `json:"subnet"`
			Ranges [][]struct {
				Subnet string `json:"subnet"`
			} `json:"ranges"`
			Addresses []struct {
				Address string `json:"address"`
			} `json:"addresses"`
		} `json:"ipam"`
	}
	// Shapes this does not know are not this parser's business: the IPAM
	// plugin validates its own config.
	if err := json.Unmarshal(stdin, &raw); err != nil {
		return nil, nil
	}
	var strs []string
	switch raw.IPAM.Type {
	case "host-local":
		if raw.IPAM.Subnet != "" {
			strs = append(strs, raw.IPAM.Subnet)
		}
		for _, set := range raw.IPAM.Ranges {
			for _, r := range set {
				strs = append(strs, r.Subnet)
			}
		}
	case "static":
		for _, a := range raw.IPAM.Addresses {
			strs = append(strs, a.Address)
		}
	default:
		return nil, nil
	}
	var out []netip.Prefix
	for _, s := range strs {
		p, err := cidrs.ParsePrefix(s)
		if err != nil {
			return nil, invalidConf("ipam: %v", err)
		}
		out = append(out, p)
	}
	return out, nil
}

// ipvlanMAC says why an ipvlan slave cannot have the MAC asked for.
const ipvlanMAC = "a MAC is asked for (mac, CNI_ARGS MAC or runtimeConfig.mac), but ipvlan slaves all have the parent's MAC: use mode macvlan, or leave the MAC out"

// parseSlaveMAC reads a MAC a slave can have: 6 bytes, unicast, not zero.
func parseSlaveMAC(s string) (net.HardwareAddr, error) {
	hw, err := net.ParseMAC(s)
	if err != nil {
		return nil, err
	}
	switch {
	case len(hw) != 6:
		return nil, fmt.Errorf("%d bytes: an Ethernet MAC has 6", len(hw))
	case hw[0]&1 != 0:
		return nil, errors.New("a multicast MAC (the first byte is odd): use a unicast one, e.g. with 02 as the first byte (locally administered)")
	case bytes.Equal(hw, make(net.HardwareAddr, 6)):
		return nil, errors.New("the zero MAC")
	}
	return hw, nil
}

// checkMACKind refuses a MAC asked for an ipvlan slave, whichever source
// asked.
func (c *Conf) checkMACKind() error {
	if c.SlaveMAC != nil && c.Kind == ModeIPvlan {
		return invalidConf("%s", ipvlanMAC)
	}
	return nil
}

// applyMACArg applies CNI_ARGS MAC (main mode), unless runtimeConfig.mac,
// which wins, is there. Only where the network declares the "mac"
// capability, unlike the reference plugin: Multus puts a network
// selection's "mac" into CNI_ARGS whether or not the network allows it,
// and a pod author that picks a wire host's MAC (the gateway's) takes its
// neighbours' traffic to it; the capability is the network admin's
// consent.
func (c *Conf) applyMACArg(mac string) error {
	if c.Chained || c.RuntimeConfig.MAC != "" || !c.Capabilities["mac"] || mac == "" {
		return nil
	}
	hw, err := parseSlaveMAC(mac)
	if err != nil {
		return types.NewError(types.ErrInvalidEnvironmentVariables, fmt.Sprintf("CNI_ARGS: MAC=%q: %v", mac, err), "")
	}
	c.SlaveMAC = hw
	return c.checkMACKind()
}

// cniArgs are what the plugin reads from CNI_ARGS; the rest is ignored.
type cniArgs struct {
	PodName, PodNamespace string
	MAC                   string // as given: applyMACArg checks it where it is used
}

// parseCNIArgs reads CNI_ARGS once for ADD.
func parseCNIArgs(s string) (cniArgs, error) {
	a := struct {
		types.CommonArgs
		K8S_POD_NAME      types.UnmarshallableString //nolint:revive,stylecheck // the CNI_ARGS key
		K8S_POD_NAMESPACE types.UnmarshallableString //nolint:revive,stylecheck // the CNI_ARGS key
		MAC               types.UnmarshallableString // the reference macvlan plugin's key
	}{}
	a.IgnoreUnknown = true // runtimes pass keys for other plugins too
	if err := types.LoadArgs(s, &a); err != nil {
		return cniArgs{}, types.NewError(types.ErrInvalidEnvironmentVariables, fmt.Sprintf("CNI_ARGS: %v", err), "")
	}
	out := cniArgs{PodName: string(a.K8S_POD_NAME), PodNamespace: string(a.K8S_POD_NAMESPACE), MAC: string(a.MAC)}
	// They become metric labels and registry strings: Kubernetes names are
	// printable ASCII, so anything else is a broken runtime. Long names are
	// kept, truncated in the registry (127 bytes for the name).
	for _, kv := range [][2]string{{"K8S_POD_NAME", out.PodName}, {"K8S_POD_NAMESPACE", out.PodNamespace}} {
		if !utf8.ValidString(kv[1]) || strings.ContainsFunc(kv[1], unicode.IsControl) {
			return cniArgs{}, types.NewError(types.ErrInvalidEnvironmentVariables, fmt.Sprintf("CNI_ARGS: %s=%q has control characters or invalid UTF-8", kv[0], kv[1]), "")
		}
	}
	return out, nil
}

func invalidConf(format string, args ...any) *types.Error {
	return types.NewError(types.ErrInvalidNetworkConfig, fmt.Sprintf(format, args...), "")
}
