// Command kubelet is k8s.io/kubernetes/cmd/kubelet's main, built at the
// version in ../go.mod.
package main

import (
	"context"

	"k8s.io/kubernetes/cmd/kubelet/app"

	"github.com/underpass-cni/underpass/test/k8s/build/internal/component"
)

func main() {
	component.Run(app.NewKubeletCommand(context.Background()))
}
