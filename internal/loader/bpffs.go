package loader

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"

	"github.com/underpass-cni/underpass/internal/flock"
)

// DefaultBPFFS is where the datapath is pinned unless configured otherwise.
const DefaultBPFFS = "/sys/fs/bpf/underpass"

// EnsureBPFFS makes sure dir can hold pins: the nearest existing ancestor
// must be on a bpffs. /sys/fs/bpf is mounted when it is not, as many
// distributions leave it unmounted; anything else is the operator's choice
// and only reported.
func EnsureBPFFS(dir string) error {
	dir = filepath.Clean(dir)
	probe := dir
	for {
		if _, err := os.Stat(probe); err == nil {
			break
		}
		parent := filepath.Dir(probe)
		if parent == probe {
			return fmt.Errorf("bpffs %s: no existing parent directory", dir)
		}
		probe = parent
	}
	onBPF, err := isBPFFS(probe)
	if err != nil {
		return err
	}
	if onBPF {
		return nil
	}
	const root = "/sys/fs/bpf"
	if probe != root {
		return fmt.Errorf("%s is not on a bpffs: mount one (mount -t bpf bpf %s) or set bpffs under %s", dir, probe, root)
	}
	// Check and mount under a lock: two processes starting together (the
	// agent, the demo, test binaries) would otherwise stack two empty
	// instances and hide the pins made in the lower one. The lock is taken
	// on /sys/fs, the same inode for everyone and needing no lock file.
	unlock, err := flock.Wait(filepath.Dir(root))
	if err != nil {
		return err
	}
	defer unlock()
	if onBPF, err := isBPFFS(root); err != nil || onBPF {
		return err
	}
	if err := unix.Mount("bpf", root, "bpf", 0, "mode=0700"); err != nil && !errors.Is(err, unix.EBUSY) {
		return fmt.Errorf("mount bpffs at %s: %w", root, err)
	}
	if onBPF, err = isBPFFS(root); err != nil {
		return err
	} else if !onBPF {
		return fmt.Errorf("mount bpffs at %s: still not a bpffs after mounting", root)
	}
	return nil
}

func isBPFFS(path string) (bool, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return false, fmt.Errorf("statfs %s: %w", path, err)
	}
	return st.Type == unix.BPF_FS_MAGIC, nil
}
