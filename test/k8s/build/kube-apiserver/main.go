// Command kube-apiserver is k8s.io/kubernetes/cmd/kube-apiserver's main,
// built at the version in ../go.mod.
package main

import (
	_ "time/tzdata" // for timeZone support in CronJob

	"k8s.io/kubernetes/cmd/kube-apiserver/app"

	"github.com/underpass-cni/underpass/test/k8s/build/internal/component"
)

func main() {
	component.Run(app.NewAPIServerCommand())
}
