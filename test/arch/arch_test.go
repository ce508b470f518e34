// Package arch holds the module's import graph to the layers that
// docs/architecture.md draws: calls go one way, from the commands down to
// the generated objects.
package arch

import (
	"os/exec"
	"slices"
	"strings"
	"testing"
)

const module = "github.com/underpass-cni/underpass/"

// layer ranks every non-test package: a package may import only packages
// of a lower rank. A new package must be given one here.
var layer = map[string]int{
	// The loader (with the bpf2go objects) and the leaves that know nothing
	// of the datapath.
	"internal/loader": 0, "internal/cidrs": 0, "internal/hostnat": 0, "internal/netwatch": 0, "internal/ociimage": 0,
	// Typed access to the pinned maps; the config.
	"internal/datapath": 1, "internal/config": 1, "internal/release": 1,
	// What the agent and the CLI build on the maps.
	"internal/epinfo": 2, "internal/endpointgc": 2, "internal/services": 2,
	"internal/events": 3, "internal/metrics": 3,
	// The plugin's verbs, the agent, the CLI, the tools and test helpers.
	"internal/cni": 4, "internal/agent": 4, "internal/ctl": 4, "internal/cmd/mkimage": 4, "internal/testutil": 4,
	// The mains.
	"cmd/underpass": 5, "cmd/underpassd": 5, "cmd/underpassctl": 5,
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

// The loader is the bottom: it imports nothing of the module.
func TestLoaderImportsNothingOfTheModule(t *testing.T) {
	out, err := exec.Command("go", "list", "-f", `{{join .Imports "\n"}}`, "../../internal/loader").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	if i := slices.IndexFunc(strings.Fields(string(out)), func(s string) bool { return strings.HasPrefix(s, module) }); i >= 0 {
		t.Errorf("internal/loader imports %s", strings.Fields(string(out))[i])
	}
}
