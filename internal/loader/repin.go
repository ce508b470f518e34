package loader

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
)

// MissingPins lists the map and program pins of dp that are missing from
// dp.Dir, as paths relative to it ("parents", "progs/parent_egress"): all of
// them when the directory itself is gone. Someone removed them (rm -rf of
// the bpffs dir, a tool that unpins): the datapath keeps running on the fds
// the agent holds, but Open, and so the CNI plugin, fails. One lstat per
// pin, cheap enough to run every second.
func (dp *Objects) MissingPins() []string {
	var missing []string
	for _, name := range dp.pinNames() {
		if _, err := os.Lstat(filepath.Join(dp.Dir, name)); errors.Is(err, fs.ErrNotExist) {
			missing = append(missing, name)
		}
	}
	return missing
}

// Repin pins again the maps and programs of dp whose pins are missing, with
// the names and layout Load gives them, so that Open finds the very same
// objects (same IDs) again. Pins still present are left alone. It returns
// what it restored. A datapath opened with Open can repin too: the objects
// are the same.
//
// Link pins are not restored here: see RestoreEgress and RestoreXDP.
func (dp *Objects) Repin() ([]string, error) {
	missing := dp.MissingPins()
	if len(missing) == 0 {
		return nil, nil
	}
	dp.forgetPins(missing)
	if _, err := os.Lstat(dp.Dir); errors.Is(err, fs.ErrNotExist) {
		// The same temp dir and rename as a first Load: nobody sees half.
		if err := dp.pinFresh(dp.Dir); err != nil {
			return nil, fmt.Errorf("repin %s: %w", dp.Dir, err)
		}
		return missing, nil
	}
	if err := dp.repinInto(missing); err != nil {
		return nil, fmt.Errorf("repin in %s: %w", dp.Dir, err)
	}
	return missing, nil
}

// repinInto restores missing pins in a directory that still exists. Maps
// go first and progs/ last, through a temp dir when it is gone as a whole:
// Open takes progs/ as the sign that a datapath is there.
func (dp *Objects) repinInto(missing []string) error {
	want := map[string]bool{}
	for _, name := range missing {
		want[name] = true
	}
	for name, m := range dp.maps() {
		if want[name] {
			if err := pinAtomic(filepath.Join(dp.Dir, name), m.Pin); err != nil {
				return fmt.Errorf("pin map %s: %w", name, err)
			}
		}
	}
	if err := os.MkdirAll(filepath.Join(dp.Dir, linkDir), 0o700); err != nil {
		return fmt.Errorf("create %s: %w", linkDir, err)
	}
	progs := filepath.Join(dp.Dir, progDir)
	if _, err := os.Lstat(progs); errors.Is(err, fs.ErrNotExist) {
		return dp.pinProgramsFresh(progs)
	}
	for name, p := range dp.programs() {
		if want[filepath.Join(progDir, name)] {
			if err := pinAtomic(filepath.Join(progs, name), p.Pin); err != nil {
				return fmt.Errorf("pin program %s: %w", name, err)
			}
		}
	}
	return nil
}

// pinProgramsFresh pins every program into a temp dir renamed to dir.
func (dp *Objects) pinProgramsFresh(dir string) error {
	// bpffs refuses names with a dot, so temp names use underscores.
	tmp, err := os.MkdirTemp(filepath.Dir(dir), filepath.Base(dir)+"_loading_")
	if err != nil {
		return fmt.Errorf("create temp %s dir: %w", progDir, err)
	}
	defer os.RemoveAll(tmp) // a no-op after the rename
	for name, p := range dp.programs() {
		if err := pinAtomic(filepath.Join(tmp, name), p.Pin); err != nil {
			return fmt.Errorf("pin program %s: %w", name, err)
		}
	}
	if err := os.Rename(tmp, dir); err != nil {
		return fmt.Errorf("rename %s to %s: %w", tmp, dir, err)
	}
	return nil
}

// forgetPins makes the objects behind missing pins forget where they were
// pinned. cilium/ebpf remembers the last path (the temp name pinAtomic
// renamed away, or the pin somebody removed) and makes Pin to that same
// path a no-op, so a second repin would pin nothing. The remembered path
// is gone, so Unpin removes nothing.
func (dp *Objects) forgetPins(missing []string) {
	want := map[string]bool{}
	for _, name := range missing {
		want[name] = true
	}
	for name, m := range dp.maps() {
		if want[name] {
			_ = m.Unpin()
		}
	}
	for name, p := range dp.programs() {
		if want[filepath.Join(progDir, name)] {
			_ = p.Unpin()
		}
	}
}

// pinNames are the map and program pins of dp relative to dp.Dir.
func (dp *Objects) pinNames() []string {
	var names []string
	dp.eachMap(func(name string, _ **ebpf.Map) { names = append(names, name) })
	dp.eachProgram(func(name string, _ **ebpf.Program) { names = append(names, filepath.Join(progDir, name)) })
	return names
}
