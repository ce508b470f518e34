package loader_test

import (
	"io/fs"
	"path/filepath"
	"testing"

	"github.com/underpass-cni/underpass/internal/attach"
)

// The pins give whoever can open them control of the datapath (the config
// word, the endpoint registry): only root may, directories 0700, pins 0600.
func TestPinsAreRootOnly(t *testing.T) {
	r := newRig(t)
	if _, err := attach.XDP(r.dp.XDPTarget(parentIfindex, attach.XDPGeneric)); err != nil {
		t.Fatal(err)
	}
	defer attach.DetachXDP(r.dp.XDPTarget(parentIfindex, ""))
	n := 0
	err := filepath.WalkDir(r.dp.Dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		want := fs.FileMode(0o600)
		if d.IsDir() {
			want = 0o700
		}
		if info.Mode().Perm() != want {
			t.Errorf("%s: mode %v, want %v", path, info.Mode().Perm(), want)
		}
		n++
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if n < 15 {
		t.Fatalf("walked only %d pins: the test checked nothing", n)
	}
}
