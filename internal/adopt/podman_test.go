package adopt

import (
	"os"
	"strings"
	"testing"
)

func TestConmonName(t *testing.T) {
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"/usr/bin/conmon", "--api-version", "1", "-c", "f763a7", "-u", "f763a7", "-r", "/usr/bin/runc", "-n", "web-1", "--exit-dir", "/x"}, "web-1"},
		{[]string{"conmon", "--name", "web-2"}, "web-2"},
		{[]string{"conmon", "--name=web-3", "-n", "other"}, "web-3"},
		{[]string{"conmon", "-c", "id"}, ""},
		{[]string{"conmon", "-n"}, ""},
		{[]string{"conmon", "-n", strings.Repeat("x", 128)}, ""},
	} {
		if got := conmonName(c.args); got != c.want {
			t.Errorf("conmonName(%q) = %q, want %q", c.args, got, c.want)
		}
	}
}

func TestPodmanNameNotConmon(t *testing.T) {
	// This test's own process: its parent is go test, not conmon.
	if n := PodmanName(os.Getpid()); n != "" {
		t.Errorf("PodmanName(own pid) = %q, want none", n)
	}
	if n := PodmanName(0); n != "" {
		t.Errorf("PodmanName(0) = %q", n)
	}
}
