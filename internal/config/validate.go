package config

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode"

	"github.com/underpass-cni/underpass/internal/attach"
	"github.com/underpass-cni/underpass/internal/cidrs"
)

// MinGCInterval keeps a typo like "1ms" from turning endpoint GC into a busy loop.
const MinGCInterval = time.Second

// Validate checks every key and returns all problems found, joined, each
// prefixed with its key path. On success it fills the values the accessors
// return; on failure they are cleared, so a rejected config never looks usable.
func (c *Config) Validate() error {
	v := &validation{}
	v.ranges(c)
	v.services(c)
	v.uplinks(c)
	v.rest(c)
	if len(v.errs) > 0 {
		c.parsed = parsed{}
		return errors.Join(v.errs...)
	}
	c.parsed = v.p
	return nil
}

// validation collects what Validate parsed and every error it found, in
// the order of the keys.
type validation struct {
	p     parsed
	errs  []error
	svcOK bool // staleServices.cidrs parsed
}

func (v *validation) fail(key, format string, args ...any) {
	v.errs = append(v.errs, fmt.Errorf(key+": "+format, args...))
}

// ranges checks hostCIDRs, staleServices.cidrs and staleServices.action.
func (v *validation) ranges(c *Config) {
	v.p.hostCIDRs, _ = parseCIDRs("hostCIDRs", c.HostCIDRList, &v.errs)
	v.p.serviceCIDRs, v.svcOK = parseCIDRs("staleServices.cidrs", c.StaleServices.CIDRs, &v.errs)

	// A host CIDR inside a service range would be judged by the stale guard
	// first and dropped unless it happens to be a live service.
	for i, h := range c.HostCIDRList {
		hp, err := cidrs.ParsePrefix(h)
		if err != nil {
			continue
		}
		for j, s := range c.StaleServices.CIDRs {
			sp, err := cidrs.ParsePrefix(s)
			if err != nil || !cidrs.Overlaps(hp, sp) {
				continue
			}
			v.fail(fmt.Sprintf("hostCIDRs[%d]", i),
				"%s overlaps staleServices.cidrs[%d] %s: the stale service guard would drop traffic to it unless it is a live service; move it out of the service range (or, if it is a service IP, list it in services.static instead)",
				hp, j, sp)
		}
	}

	if i, ok := enum("staleServices.action", c.StaleServices.Action, actionNames, &v.errs); ok {
		v.p.action = Action(i)
	}
}

// services checks services.static, services.kubernetes and
// services.kubeconfig.
func (v *validation) services(c *Config) {
	for i, s := range c.Services.Static {
		key := fmt.Sprintf("services.static[%d]", i)
		a, err := cidrs.ParseAddr(s)
		if err != nil {
			if strings.Contains(s, "/") {
				v.fail(key, "%v; services.static takes single addresses, ranges belong in staleServices.cidrs", err)
			} else {
				v.fail(key, "%v", err)
			}
			continue
		}
		v.p.static = append(v.p.static, a)
	}
	// Service IPs reach the host (and kube-proxy) only because they lie in a
	// service CIDR; a static entry elsewhere changes nothing, which is worth
	// saying rather than silently ignoring. Only judged once the ranges parsed.
	if v.svcOK {
		if len(v.p.serviceCIDRs) == 0 && len(v.p.static) > 0 {
			v.fail("services.static", "has %d addresses but staleServices.cidrs is empty (stale service guard off), so they have no effect; set staleServices.cidrs to the cluster's service range or remove services.static", len(v.p.static))
		} else {
			for i, a := range v.p.static {
				if !slices.ContainsFunc(v.p.serviceCIDRs, func(sp netip.Prefix) bool { return sp.Contains(a) }) {
					v.fail(fmt.Sprintf("services.static[%d]", i),
						"%s is outside every staleServices.cidrs range, so listing it has no effect; add its range to staleServices.cidrs or remove it", a)
				}
			}
		}
	}

	if i, ok := enum("services.kubernetes", c.Services.Kubernetes, kubernetesNames, &v.errs); ok {
		v.p.kubernetes = KubernetesMode(i)
		if v.p.kubernetes == KubernetesOff && c.Services.Kubeconfig != "" {
			v.fail("services.kubeconfig", "is set but services.kubernetes is false, so it is never used; remove it or set services.kubernetes to auto or true")
		}
	}
	if i, ok := enum("services.mode", c.Services.Mode, serviceModeNames, &v.errs); ok {
		v.p.serviceMode = ServiceMode(i)
		if v.p.serviceMode == ServiceModeEBPF && v.p.kubernetes == KubernetesOff {
			v.fail("services.mode", "is ebpf, which translates Services from their EndpointSlices, but services.kubernetes is false; set services.kubernetes to auto or true, or services.mode to host")
		}
	}
	if c.Services.Kubeconfig != "" {
		if err := checkPathChars(c.Services.Kubeconfig); err != nil {
			v.fail("services.kubeconfig", "%v", err)
		}
	}
}

func (v *validation) uplinks(c *Config) {
	v.ifNames("uplinks", c.Uplinks)
	v.ifNames("adopt.parents", c.Adopt.Parents)
	if d := c.Adopt.Docker; d != "" && d != "auto" {
		if !filepath.IsAbs(d) {
			v.fail("adopt.docker", "%q is neither auto nor an absolute path to the Docker engine's socket", d)
		} else if err := checkPathChars(d); err != nil {
			v.fail("adopt.docker", "%v", err)
		}
	}
}

// ifNames checks a list of interface names: valid, each once.
func (v *validation) ifNames(name string, list []string) {
	seen := map[string]int{}
	for i, u := range list {
		key := fmt.Sprintf("%s[%d]", name, i)
		if err := checkIfName(u); err != nil {
			v.fail(key, "%v", err)
			continue
		}
		if j, dup := seen[u]; dup {
			v.fail(key, "%q is already %s[%d]; list each interface once", u, name, j)
			continue
		}
		seen[u] = i
	}
}

// rest checks xdp, metrics.listen, bpffs, gcInterval and logLevel.
func (v *validation) rest(c *Config) {
	if i, ok := enum("xdp", c.XDP, xdpNames, &v.errs); ok {
		v.p.xdp = attach.XDPMode(xdpNames[i])
	}

	if err := checkListen(c.Metrics.Listen); err != nil {
		v.fail("metrics.listen", "%v", err)
	}

	if !filepath.IsAbs(c.BPFFS) {
		v.fail("bpffs", "must be an absolute path (the CNI plugin and underpassd must agree on it), got %q", c.BPFFS)
	} else if err := checkPathChars(c.BPFFS); err != nil {
		v.fail("bpffs", "%v", err)
	}

	if d, err := time.ParseDuration(c.GCInterval); err != nil {
		v.fail("gcInterval", "%q is not a duration; write it like 30s, 1m or 1h", c.GCInterval)
	} else if d < MinGCInterval {
		v.fail("gcInterval", "%s is too short; use %s or more", d, MinGCInterval)
	} else {
		v.p.gcInterval = d
	}

	if i, ok := enum("logLevel", c.LogLevel, levelNames, &v.errs); ok {
		v.p.level = levelValues[i]
	}
}

// ValidateAgainst runs Validate and then checks the service CIDRs against the
// node's subnets and the endpoint (pod) subnets. The datapath treats every
// destination in a service CIDR as a service, so an overlap (10.96.0.0/12
// contains 10.99.0.0/24!) would make pods and nodes look like stale services.
func (c *Config) ValidateAgainst(nodeSubnets, endpointSubnets []netip.Prefix) error {
	if err := c.Validate(); err != nil {
		return err
	}
	var errs []error
	for i, sp := range c.parsed.serviceCIDRs {
		for _, other := range []struct {
			name string
			set  []netip.Prefix
		}{{"node subnet", nodeSubnets}, {"endpoint subnet", endpointSubnets}} {
			err := cidrs.CheckDisjoint("service CIDR", []netip.Prefix{sp}, other.name, other.set)
			for _, e := range unjoin(err) {
				var oe *cidrs.OverlapError
				if !errors.As(e, &oe) {
					errs = append(errs, e)
					continue
				}
				errs = append(errs, fmt.Errorf("staleServices.cidrs[%d]: service CIDR %s overlaps %s %s: pods and hosts in %s would be treated as services (and dropped as stale); pick a service range outside the node and endpoint subnets",
					i, cidrs.Canonical(oe.Prefix1), oe.Name2, cidrs.Canonical(oe.Prefix2), oe.Shared()))
			}
		}
	}
	return errors.Join(errs...)
}

// unjoin returns the errors inside an errors.Join result, or err alone.
func unjoin(err error) []error {
	if err == nil {
		return nil
	}
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		return j.Unwrap()
	}
	return []error{err}
}

// parseCIDRs parses a list key, reporting each bad entry; ok is false when any
// entry was bad, so checks that need the whole list can skip it.
func parseCIDRs(key string, list []string, errs *[]error) (out []netip.Prefix, ok bool) {
	ok = true
	for i, s := range list {
		p, err := cidrs.ParsePrefix(s)
		if err != nil {
			*errs = append(*errs, fmt.Errorf("%s[%d]: %w", key, i, err))
			ok = false
			continue
		}
		// One trie holds both families (IPv4 as ::ffff:a.b.c.d), so an IPv6
		// prefix this wide would silently apply to all IPv4 traffic as well.
		if cidrs.CoversIPv4(p) {
			*errs = append(*errs, fmt.Errorf("%s[%d]: %s also covers every IPv4 address (the datapath stores IPv4 as ::ffff:a.b.c.d); use a narrower IPv6 prefix", key, i, p))
			ok = false
			continue
		}
		out = append(out, p)
	}
	return out, ok
}

// enum returns the index of v in names, or reports the allowed values.
func enum(key, v string, names []string, errs *[]error) (int, bool) {
	if i := slices.Index(names, v); i >= 0 {
		return i, true
	}
	msg := fmt.Sprintf("%s: %q is not one of %s", key, v, strings.Join(names, ", "))
	if v == "true" || v == "false" {
		// YAML 1.1 turns unquoted on/off/yes/no into booleans before we see them.
		msg += " (unquoted on, off, yes and no are booleans in YAML; quote the value)"
	}
	*errs = append(*errs, errors.New(msg))
	return 0, false
}

// checkIfName applies the kernel's dev_valid_name rules, so a bad uplink is
// reported when the config is read rather than when attaching fails.
func checkIfName(s string) error {
	switch {
	case s == "":
		return errors.New("interface name is empty")
	case len(s) > 15:
		return fmt.Errorf("%q is longer than 15 bytes, the kernel's limit for interface names", s)
	case s == "." || s == "..":
		return fmt.Errorf("%q is not a valid interface name", s)
	}
	for _, r := range s {
		if r == '/' || r == ':' || unicode.IsSpace(r) || !unicode.IsPrint(r) {
			return fmt.Errorf("%q contains %q, which interface names cannot", s, r)
		}
	}
	return nil
}

// checkPathChars refuses control characters: no real path has them, and a NUL
// would be cut short by the kernel.
func checkPathChars(s string) error {
	for _, r := range s {
		if unicode.IsControl(r) {
			return fmt.Errorf("%q contains the control character %q", s, r)
		}
	}
	return nil
}

// checkListen accepts what net.Listen("tcp", …) does with a numeric port:
// ":9775", "127.0.0.1:9775", "[::1]:9775", "localhost:9775".
func checkListen(s string) error {
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		var ae *net.AddrError
		if errors.As(err, &ae) {
			err = errors.New(ae.Err)
		}
		return fmt.Errorf("%q is not host:port (%v); for example 127.0.0.1:9775 or :9775", s, err)
	}
	if n, err := strconv.ParseUint(port, 10, 16); err != nil || n == 0 {
		return fmt.Errorf("port %q in %q is not a number from 1 to 65535", port, s)
	}
	if host == "" {
		return nil
	}
	if _, err := netip.ParseAddr(host); err == nil {
		return nil
	}
	if !isHostName(host) {
		return fmt.Errorf("host %q in %q is neither an IP address nor a host name", host, s)
	}
	return nil
}

// isHostName is a loose RFC 1123 check: letters, digits, '-' and '.', labels
// of 1 to 63 characters.
func isHostName(s string) bool {
	if len(s) > 253 {
		return false
	}
	for label := range strings.SplitSeq(strings.TrimSuffix(s, "."), ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for _, r := range label {
			if !(r == '-' || r >= '0' && r <= '9' || r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z') {
				return false
			}
		}
	}
	return true
}
