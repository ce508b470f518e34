//go:build underpass_failpoints

package cni

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// errFailpoint is what an "error" failpoint returns.
var errFailpoint = errors.New("failpoint")

// failpoint, in test builds, acts on UNDERPASS_FAILPOINTS, a comma-separated
// list of name=action:
//
//	error  the step fails with an error naming the failpoint
//	hang   the plugin writes its pid to $UNDERPASS_FAILPOINT_DIR/<name> and
//	       blocks, so that a test can SIGKILL it at exactly this step
func failpoint(name string) error {
	for _, fp := range strings.Split(os.Getenv("UNDERPASS_FAILPOINTS"), ",") {
		n, action, _ := strings.Cut(fp, "=")
		if n != name {
			continue
		}
		switch action {
		case "error":
			return fmt.Errorf("%w %s", errFailpoint, name)
		case "hang":
			marker := filepath.Join(os.Getenv("UNDERPASS_FAILPOINT_DIR"), name)
			if err := os.WriteFile(marker, fmt.Appendf(nil, "%d", os.Getpid()), 0o600); err != nil {
				return fmt.Errorf("failpoint %s: %w", name, err)
			}
			for { // not select{}: with no other goroutine, that is a fatal deadlock
				time.Sleep(time.Hour)
			}
		}
	}
	return nil
}
