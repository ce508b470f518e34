//go:build linux

package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/netip"
	"path/filepath"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"

	"github.com/underpass-cni/underpass/internal/testutil"
	"github.com/underpass-cni/underpass/test/demo"
)

type pod struct {
	name string
	ns   *demo.NS
	id   string
	ip   netip.Addr
	mac  string
}

func (p *pod) rt() *libcni.RuntimeConf {
	return testutil.PodRuntimeConf(p.id, p.ns.Path, "eth0", "demo", p.name, [2]string{"K8S_POD_INFRA_CONTAINER_ID", p.id})
}

// writeConflist writes the pods' network: underpass as the main plugin.
func (d *demoRun) writeConflist() error {
	plugin := map[string]any{
		"type":        "underpass",
		"master":      "eth0",
		"mode":        "macvlan",
		"macvlanMode": "bridge",
		"bpffs":       demo.BPFFS,
		"ipam": map[string]any{
			"type":    "host-local",
			"dataDir": ipamDir,
			"ranges": []any{[]any{map[string]any{
				"subnet": subnet.String(), "rangeStart": "192.0.2.100", "rangeEnd": "192.0.2.200", "gateway": gateway.String(),
			}}},
			"routes": []any{map[string]any{"dst": "0.0.0.0/0"}},
		},
	}
	path := filepath.Join(confDir, "10-underpass-demo.conflist")
	var err error
	if d.netconf, err = testutil.WriteConflist(path, "underpass-demo", "1.1.0", plugin); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	if _, err := invoke.FindInPath("host-local", d.cniPath); err != nil {
		return fmt.Errorf("the host-local IPAM plugin: %w (pass its directory with --cni-path; make demo installs it)", err)
	}
	return nil
}

// addPod creates a pod netns and runs CNI ADD for it from the node netns,
// as the container runtime on a node does.
func (d *demoRun) addPod(ctx context.Context, name string) (*pod, error) {
	n, err := demo.Names.CreateNS(name)
	if err != nil {
		return nil, err
	}
	// A container ID as a runtime makes one (64 hex digits), fixed per name.
	sum := sha256.Sum256([]byte(n.Name))
	p := &pod{name: name, ns: n, id: hex.EncodeToString(sum[:])}
	d.pods = append(d.pods, p)
	if err := n.Sysctl("net.ipv6.conf.all.accept_dad", "0", "net.ipv6.conf.default.accept_dad", "0"); err != nil {
		return nil, err
	}
	res, err := testutil.CNIAdd(ctx, d.node.Do, d.cni, d.netconf, p.rt())
	if err != nil {
		return nil, err
	}
	ip4, _, mac := testutil.ResultAddrs(res, "eth0")
	p.ip, p.mac = ip4, mac.String()
	if !p.ip.IsValid() {
		return nil, fmt.Errorf("the result has no IPv4 address: %v", res)
	}
	return p, nil
}
