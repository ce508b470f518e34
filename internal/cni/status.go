package cni

import (
	"errors"
	"fmt"
	"net"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/plugins/pkg/ipam"
	"github.com/vishvananda/netlink"
)

// status is CNI STATUS (1.1.0): code 50 when the plugin cannot add pods now,
// because the datapath is not loaded or the master is missing or down.
func status(c *Conf, args *skel.CmdArgs) error {
	dp, err := openDatapath(c.BPFFS, types.ErrPluginNotAvailable)
	if err != nil {
		return err
	}
	dp.Close()

	// Chained: the previous plugin reports on its own master.
	if !c.Chained {
		l, err := resolveMaster(c.Master)
		var te *types.Error
		if errors.As(err, &te) {
			return errorf(types.ErrPluginNotAvailable, "%s", te.Msg)
		}
		if err != nil {
			return err
		}
		name := l.Attrs().Name
		if l.Attrs().Flags&net.FlagUp == 0 {
			return errorf(types.ErrPluginNotAvailable, "master %s is down: bring it up (ip link set %s up)", name, name)
		}
		if l.Attrs().OperState == netlink.OperDown || l.Attrs().OperState == netlink.OperLowerLayerDown {
			return errorf(types.ErrPluginNotAvailable, "master %s has no carrier (%s): check its cable or peer", name, l.Attrs().OperState)
		}
	}
	if !c.Chained && c.IPAM.Type != "" {
		if err := ipam.ExecStatus(c.IPAM.Type, args.StdinData); err != nil {
			return fmt.Errorf("ipam %s: %w", c.IPAM.Type, err)
		}
	}
	return nil
}
