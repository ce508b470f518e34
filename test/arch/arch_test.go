// Package arch holds the module's import graph to the layers that
// docs/architecture.md draws: calls go one way, from the commands down to
// the generated objects.
package arch

import (
	"os/exec"
	"strings"
	"testing"
)

const module = "github.com/underpass-cni/underpass/"

// layer ranks every non-test package: a package may import only packages
// of a lower rank. A new package must be given one here.
var layer = map[string]int{
	// Leaves that know nothing of the datapath.
	"internal/flock": 0, "internal/cidrs": 0, "internal/hostnat": 0, "internal/netwatch": 0, "internal/ociimage": 0,
	// Putting programs on interfaces (tcx, XDP, cls_bpf), given the programs.
	"internal/attach": 1,
	// The loader, with the bpf2go objects.
	"internal/loader": 2,
	// Typed access to the pinned maps; the config.
	"internal/datapath": 3, "internal/config": 3, "internal/release": 3,
	// What the agent and the CLI build on the maps.
	"internal/endpointgc": 4, "internal/services": 4, "internal/adopt": 4,
	"internal/events": 5, "internal/metrics": 5,
	// The plugin's verbs, the agent, the CLI, the tools and test helpers.
	"internal/cni": 6, "internal/agent": 6, "internal/ctl": 6, "internal/cmd/mkimage": 6, "internal/testutil": 6,
	// The mains.
	"cmd/underpass": 7, "cmd/underpassd": 7, "cmd/underpassctl": 7,
}

func TestImportsGoOneWay(t *testing.T) {
	out, err := exec.Command("go", "list", "-f", `{{.ImportPath}} {{join .Imports " "}}`, "../../cmd/...", "../../internal/...").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	seen := 0
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		f := strings.Fields(line)
		pkg, _ := strings.CutPrefix(f[0], module)
		rank, ok := layer[pkg]
		if !ok {
			t.Errorf("%s has no layer: add it to layer (and docs/architecture.md)", pkg)
			continue
		}
		seen++
		for _, imp := range f[1:] {
			dep, ours := strings.CutPrefix(imp, module)
			if !ours {
				continue
			}
			if r, ok := layer[dep]; ok && r >= rank {
				t.Errorf("%s (layer %d) imports %s (layer %d): calls go down only", pkg, rank, dep, r)
			}
		}
	}
	if seen != len(layer) {
		t.Errorf("go list saw %d of the %d packages in layer: remove the ones that are gone", seen, len(layer))
	}
}
