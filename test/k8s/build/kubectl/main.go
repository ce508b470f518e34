// Command kubectl is k8s.io/kubernetes/cmd/kubectl's main, built at the
// version in ../go.mod: the node tier applies deploy/kubernetes with it, as
// users do.
package main

import (
	"k8s.io/component-base/cli"
	"k8s.io/kubectl/pkg/cmd"
	"k8s.io/kubectl/pkg/cmd/util"
)

func main() {
	if err := cli.RunNoErrOutput(cmd.NewDefaultKubectlCommand()); err != nil {
		util.CheckErr(err)
	}
}
