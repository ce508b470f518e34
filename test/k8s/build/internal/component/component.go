// Package component is what the Kubernetes components' upstream mains
// (k8s.io/kubernetes/cmd/<name>) share: the JSON log format and the
// client-go and version metrics registered, and the command run as
// component-base runs it.
package component

import (
	"os"

	"github.com/spf13/cobra"
	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"          // JSON log format
	_ "k8s.io/component-base/metrics/prometheus/clientgo" // client-go metrics
	_ "k8s.io/component-base/metrics/prometheus/version"  // version metric
)

// Run runs cmd and exits with its status, as the upstream main does.
func Run(cmd *cobra.Command) {
	os.Exit(cli.Run(cmd))
}
