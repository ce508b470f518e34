//go:build linux

package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	current "github.com/containernetworking/cni/pkg/types/100"

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
	return &libcni.RuntimeConf{
		ContainerID: p.id,
		NetNS:       p.ns.Path,
		IfName:      "eth0",
		Args: [][2]string{{"IgnoreUnknown", "1"}, {"K8S_POD_NAMESPACE", "demo"},
			{"K8S_POD_NAME", p.name}, {"K8S_POD_INFRA_CONTAINER_ID", p.id}},
	}
}

// writeConflist writes the pods' network: underpass as the main plugin.
func (d *demoRun) writeConflist() error {
	conf := map[string]any{
		"cniVersion": "1.1.0",
		"name":       "underpass-demo",
		"plugins": []any{map[string]any{
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
		}},
	}
	b, err := json.MarshalIndent(conf, "", "  ")
	if err != nil {
		return err
	}
	path := filepath.Join(confDir, "10-underpass-demo.conflist")
	if err := os.WriteFile(path, b, 0o644); err != nil {
		return err
	}
	if d.netconf, err = libcni.ConfListFromFile(path); err != nil {
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
	n, err := demo.CreateNS(name)
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
	var res *current.Result
	err = d.node.Do(func() error {
		r, err := d.cni.AddNetworkList(ctx, d.netconf, p.rt())
		if err != nil {
			return err
		}
		res, err = current.NewResultFromResult(r)
		return err
	})
	if err != nil {
		return nil, err
	}
	for _, ipc := range res.IPs {
		if a, ok := netip.AddrFromSlice(ipc.Address.IP); ok && a.Unmap().Is4() {
			p.ip = a.Unmap()
		}
	}
	for _, i := range res.Interfaces {
		if i.Name == "eth0" && i.Sandbox != "" {
			p.mac = i.Mac
		}
	}
	if !p.ip.IsValid() {
		return nil, fmt.Errorf("the result has no IPv4 address: %v", res)
	}
	return p, nil
}
