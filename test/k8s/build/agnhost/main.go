// Command agnhost is the part of k8s.io/kubernetes/test/images/agnhost the
// node tier uses (netexec: an HTTP server that reports the client's address
// and serves probes; pause: the pod sandbox), built at the version in
// ../go.mod. Its images are made locally: no registry is reachable.
package main

import (
	"os"

	"github.com/spf13/cobra"
	"k8s.io/component-base/cli"
	"k8s.io/kubernetes/test/images/agnhost/netexec"
	"k8s.io/kubernetes/test/images/agnhost/pause"
)

func main() {
	root := &cobra.Command{Use: "agnhost"}
	root.AddCommand(netexec.CmdNetexec, pause.CmdPause)
	os.Exit(cli.Run(root))
}
