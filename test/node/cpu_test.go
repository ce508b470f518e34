package node_test

import (
	"bytes"
	"cmp"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"
)

// cpuSnap is the CPU time of every process on the machine, by pid, with
// its name, and the machine's total: what BenchmarkPodStart logs per round
// so that a network that starts pods slower shows whose CPU it cost.
type cpuSnap struct {
	procs map[int]procCPU
	total time.Duration // all CPUs, busy (not idle or iowait)
}

type procCPU struct {
	name       string
	self, kids time.Duration // utime+stime; cutime+cstime (children reaped)
}

const clockTick = 10 * time.Millisecond // USER_HZ is 100 on Linux

func takeCPU() cpuSnap {
	s := cpuSnap{procs: map[int]procCPU{}}
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue // exited meanwhile
		}
		// comm is in parentheses and may hold spaces: the fields after the
		// last ')' start with state (field 3); utime is field 14.
		i, j := bytes.IndexByte(b, '('), bytes.LastIndexByte(b, ')')
		if i < 0 || j < i {
			continue
		}
		f := strings.Fields(string(b[j+1:]))
		if len(f) < 15 {
			continue
		}
		tick := func(k int) time.Duration {
			v, _ := strconv.ParseInt(f[k-3], 10, 64)
			return time.Duration(v) * clockTick
		}
		s.procs[pid] = procCPU{name: string(b[i+1 : j]), self: tick(14) + tick(15), kids: tick(16) + tick(17)}
	}
	if b, err := os.ReadFile("/proc/stat"); err == nil {
		f := strings.Fields(strings.SplitN(string(b), "\n", 2)[0]) // cpu user nice system idle iowait irq softirq steal
		for k, v := range f[1:min(len(f), 9)] {
			if k == 3 || k == 4 { // idle, iowait
				continue
			}
			n, _ := strconv.ParseInt(v, 10, 64)
			s.total += time.Duration(n) * clockTick
		}
	}
	return s
}

// count is how many processes are named with prefix (comm).
func (s cpuSnap) count(prefix string) int {
	n := 0
	for _, p := range s.procs {
		if strings.HasPrefix(p.name, prefix) {
			n++
		}
	}
	return n
}

// cpuUse is what the machine's processes spent in a window.
type cpuUse struct {
	summary string        // the total, then the largest spenders by name
	plugins time.Duration // containerd's children's: the CNI plugins (and the shims' start commands, the same for every network)
}

// cpuSince is what each process name spent from before to now, the
// largest first (its own time, and that of its reaped children, such as
// containerd's CNI plugins and the shims' runc), and the machine's total.
// A process that ended inside the window is counted in its parent's
// children only once reaped.
func cpuSince(before cpuSnap) cpuUse {
	now := takeCPU()
	type row struct {
		name       string
		self, kids time.Duration
	}
	by := map[string]*row{}
	for pid, p := range now.procs {
		b := before.procs[pid]
		if b.name != p.name { // a new process (or a pid reused)
			b = procCPU{}
		}
		r := by[p.name]
		if r == nil {
			r = &row{name: p.name}
			by[p.name] = r
		}
		r.self += p.self - b.self
		r.kids += p.kids - b.kids
	}
	var rows []*row
	for _, r := range by {
		if r.self+r.kids >= 100*time.Millisecond {
			rows = append(rows, r)
		}
	}
	slices.SortFunc(rows, func(a, b *row) int { return cmp.Compare(b.self+b.kids, a.self+a.kids) })
	var sb strings.Builder
	fmt.Fprintf(&sb, "CPU busy %.1f s (all CPUs);", (now.total - before.total).Seconds())
	for _, r := range rows[:min(len(rows), 10)] {
		fmt.Fprintf(&sb, " %s %.1f", r.name, r.self.Seconds())
		if r.kids > 0 {
			fmt.Fprintf(&sb, "+%.1f", r.kids.Seconds())
		}
	}
	use := cpuUse{summary: sb.String()}
	if r := by["containerd"]; r != nil {
		use.plugins = r.kids
	}
	return use
}
