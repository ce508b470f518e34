// Command kube-scheduler is k8s.io/kubernetes/cmd/kube-scheduler's main,
// built at the version in ../go.mod.
package main

import (
	"k8s.io/kubernetes/cmd/kube-scheduler/app"

	"github.com/underpass-cni/underpass/test/k8s/build/internal/component"
)

func main() {
	component.Run(app.NewSchedulerCommand())
}
