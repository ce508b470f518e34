//go:build linux

package main

import (
	"context"
	"fmt"
	"time"

	"github.com/underpass-cni/underpass/test/demo"
	"github.com/underpass-cni/underpass/test/demo/kit"
)

// agentConfig is the demo's /etc/underpass/underpass.yaml.
func agentConfig(action string) string {
	return fmt.Sprintf(`# underpassd config of the demo (see the README, "Agent configuration", for every key)
hostReachability: true
staleServices:
  cidrs: [%s]
  action: %s
services:
  static: [%s]
  kubernetes: "false"
metrics: {listen: %q}
bpffs: %s
`, svcCIDR, action, liveVIP, demo.MetricsAddr, demo.BPFFS)
}

// startAgent runs underpassd in the node netns and waits for /readyz.
func (d *demoRun) startAgent(ctx context.Context) error {
	if err := kit.WriteConfig(configPath, agentConfig("drop")); err != nil {
		return err
	}
	agent, took, err := kit.StartAgent(ctx, d.node, d.bin, configPath, agentLogPath, demo.MetricsAddr)
	d.agent = agent
	if err != nil {
		return err
	}
	d.OK("underpassd (pid %d) loaded the datapath, pinned in %s, ready after %s", d.agent.Pid(), demo.BPFFS, took.Round(10*time.Millisecond))
	d.Detail("config %s: services.static [%s], staleServices.cidrs [%s], action drop", configPath, liveVIP, svcCIDR)
	return nil
}
