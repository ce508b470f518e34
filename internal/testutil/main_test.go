package testutil

import (
	"errors"
	"os"
	"strings"
	"testing"
)

type fakeM struct{ ran bool }

func (f *fakeM) Run() int { f.ran = true; return 7 }

func TestRunMain(t *testing.T) {
	RequireRoot(t)
	var dir string
	m := &fakeM{}
	if code := runMain(m, "test/x", func(tmp string) error { dir = tmp; return nil }); code != 7 || !m.ran {
		t.Fatalf("runMain = %d, ran %v; want the tests' 7, ran", code, m.ran)
	}
	if !strings.Contains(dir, "underpass-x-test-") {
		t.Errorf("setup's directory %q", dir)
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("%s left after the tests: %v", dir, err)
	}
	m = &fakeM{}
	if code := runMain(m, "test/x", func(string) error { return errors.New("setup failed (expected)") }); code != 1 || m.ran {
		t.Fatalf("runMain after a failed setup = %d, ran %v; want 1, not run", code, m.ran)
	}
}
