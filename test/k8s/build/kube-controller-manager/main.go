// Command kube-controller-manager is k8s.io/kubernetes/cmd/
// kube-controller-manager's main, built at the version in ../go.mod.
package main

import (
	_ "time/tzdata" // for CronJob time zones

	"k8s.io/kubernetes/cmd/kube-controller-manager/app"

	"github.com/underpass-cni/underpass/test/k8s/build/internal/component"
)

func main() {
	component.Run(app.NewControllerManagerCommand())
}
