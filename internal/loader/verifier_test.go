package loader_test

import (
	"fmt"
	"maps"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"golang.org/x/sys/unix"

	"github.com/underpass-cni/underpass/internal/loader"
	"github.com/underpass-cni/underpass/internal/testutil"
)

// The verifier gives up at 1M processed instructions (BPF_COMPLEXITY_LIMIT_INSNS).
// A program that needs a tenth of that has a branch explosion waiting to
// happen on the next kernel or the next feature: fail early.
const (
	verifierLimit  = 1_000_000
	verifierBudget = verifierLimit / 10
)

var (
	statsLine = regexp.MustCompile(`processed (\d+) insns \(limit \d+\) max_states_per_insn (\d+) total_states (\d+) peak_states (\d+)`)
	timeLine  = regexp.MustCompile(`verification time (\d+) usec`)
	stackLine = regexp.MustCompile(`stack depth (\S+)`)
)

type verifierFigures struct {
	name                   string
	insns                  int // BPF instructions in the object (a wide load counts 2)
	processed              int // the verifier's insn_processed, from its log
	verified               uint32
	verifiedOK             bool // kernel reports verified_insns (5.16+)
	maxStates, total, peak int
	stack                  string
	verifyUsec             int // the kernel's own measure, 0 when not logged
	load                   time.Duration
}

// TestVerifierFigures loads every program of the datapath on its own, with
// the verifier's statistics, and prints a table per kernel:
//
//	go test -run VerifierFigures -v ./internal/loader
//	test/vm/run.sh -pkgs ./internal/loader -run VerifierFigures -show verifier:
//
// Pods cost no program load: their filters share endpoint_ingress and
// endpoint_egress.
func TestVerifierFigures(t *testing.T) {
	testutil.RequireRoot(t)
	spec, err := loader.Spec()
	must(t, err)

	// The maps once; each program is then loaded into them on its own, so
	// the load time is the program's (verification, mostly).
	mapsOnly := spec.Copy()
	mapsOnly.Programs = map[string]*ebpf.ProgramSpec{}
	base, err := ebpf.NewCollection(mapsOnly)
	must(t, err)
	defer base.Close()
	repl := map[string]*ebpf.Map{}
	for name, m := range base.Maps {
		if !strings.HasPrefix(name, ".") {
			repl[name] = m
		}
	}

	var rows []verifierFigures
	for _, name := range slices.Sorted(maps.Keys(spec.Programs)) {
		one := spec.Copy()
		one.Programs = map[string]*ebpf.ProgramSpec{name: one.Programs[name]}
		start := time.Now()
		coll, err := ebpf.NewCollectionWithOptions(one, ebpf.CollectionOptions{
			MapReplacements: repl,
			Programs:        ebpf.ProgramOptions{LogLevel: ebpf.LogLevelStats},
		})
		load := time.Since(start)
		if err != nil {
			t.Fatalf("load %s: %v", name, err)
		}
		rows = append(rows, figures(t, name, spec.Programs[name].Instructions, coll.Programs[name], load))
		coll.Close()
	}
	var u unix.Utsname
	_ = unix.Uname(&u)
	var b strings.Builder
	fmt.Fprintf(&b, "verifier: kernel %s, LogLevelStats, budget %d processed insns\n", unix.ByteSliceToString(u.Release[:]), verifierBudget)
	fmt.Fprintf(&b, "verifier: | program | insns | processed | of 1M | states total/peak/max per insn | stack | verify µs | load ms |\n")
	fmt.Fprintf(&b, "verifier: |---|---:|---:|---:|---:|---|---:|---:|\n")
	for _, f := range rows {
		fmt.Fprintf(&b, "verifier: | %s | %d | %d | %.2f%% | %d/%d/%d | %s | %d | %.1f |\n",
			f.name, f.insns, f.processed, 100*float64(f.processed)/verifierLimit,
			f.total, f.peak, f.maxStates, f.stack, f.verifyUsec, float64(f.load.Microseconds())/1000)
	}
	t.Log("\n" + strings.TrimRight(b.String(), "\n"))
}

// figures reads the verifier's statistics of a loaded program and holds
// them to the budget.
func figures(t *testing.T, name string, insns asm.Instructions, prog *ebpf.Program, load time.Duration) verifierFigures {
	t.Helper()
	f := verifierFigures{name: name, insns: len(insns), load: load}
	for _, ins := range insns {
		if ins.OpCode.IsDWordLoad() {
			f.insns++
		}
	}
	log := prog.VerifierLog
	if m := statsLine.FindStringSubmatch(log); m != nil {
		f.processed, _ = strconv.Atoi(m[1])
		f.maxStates, _ = strconv.Atoi(m[2])
		f.total, _ = strconv.Atoi(m[3])
		f.peak, _ = strconv.Atoi(m[4])
	} else {
		t.Errorf("%s: no statistics in the verifier log:\n%s", name, log)
	}
	if m := timeLine.FindStringSubmatch(log); m != nil {
		f.verifyUsec, _ = strconv.Atoi(m[1])
	}
	if m := stackLine.FindStringSubmatch(log); m != nil {
		f.stack = m[1]
	}
	if info, err := prog.Info(); err == nil {
		f.verified, f.verifiedOK = info.VerifiedInstructions()
	}
	if f.processed >= verifierBudget {
		t.Errorf("%s: the verifier processed %d instructions, over the budget of %d (10%% of its %d limit)",
			name, f.processed, verifierBudget, verifierLimit)
	}
	if f.verifiedOK && f.processed != 0 && int(f.verified) != f.processed {
		t.Errorf("%s: verified_insns %d but the log says %d processed", name, f.verified, f.processed)
	}
	return f
}
