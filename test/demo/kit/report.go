//go:build linux

package kit

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/underpass-cni/underpass/test/netenv"
)

// Report prints the steps of a cleanup, each passed or failed with its
// error; OK is false once one has failed.
type Report struct {
	Out io.Writer
	OK  bool
}

// NewReport is a Report to out, OK so far.
func NewReport(out io.Writer) *Report { return &Report{Out: out, OK: true} }

// Note prints a cleanup step: passed if err is nil, else failed with err.
func (r *Report) Note(err error, format string, args ...any) {
	if err != nil {
		r.OK = false
		fmt.Fprintf(r.Out, "  ✗ %s: %v\n", fmt.Sprintf(format, args...), err)
	} else {
		fmt.Fprintf(r.Out, "  ✓ %s\n", fmt.Sprintf(format, args...))
	}
}

// DeleteNamespaces closes the open namespaces (nil ones are skipped) and
// deletes every namespace of the demo, and with them every link in them.
func (n Names) DeleteNamespaces(r *Report, open ...*netenv.NS) {
	for _, ns := range open {
		if ns != nil {
			ns.Close()
		}
	}
	names, err := n.Namespaces()
	if err != nil {
		r.Note(err, "list namespaces")
	}
	var nsErrs []error
	for _, name := range names {
		nsErrs = append(nsErrs, n.DeleteNS(name))
	}
	if len(names) > 0 {
		r.Note(errors.Join(nsErrs...), "delete namespaces %s", strings.Join(names, " "))
	}
}

// RemovePins removes the pin directory and the agent's lock file, what
// underpassd --uninstall did not (or a crashed run left).
func (n Names) RemovePins(r *Report) {
	if Exists(n.BPFFS) {
		r.Note(os.RemoveAll(n.BPFFS), "remove pins %s", n.BPFFS)
	}
	if l := n.AgentLockFile(); Exists(l) {
		r.Note(os.Remove(l), "remove the agent's lock file %s", l)
	}
}

// RemoveStateDir removes the state directory (holding what).
func (n Names) RemoveStateDir(r *Report, what string) {
	if Exists(n.StateDir) {
		r.Note(os.RemoveAll(n.StateDir), "remove %s (%s)", n.StateDir, what)
	}
}

// NothingLeft notes whether left (the demo's leftovers but the lock file
// this run holds) is empty.
func NothingLeft(r *Report, left []string) {
	if len(left) > 0 {
		r.Note(fmt.Errorf("%s", strings.Join(left, "; ")), "nothing left behind")
	} else {
		r.Note(nil, "nothing left behind")
	}
}

// ButLock is left without the lock file (which this run holds).
func (n Names) ButLock(left []string) []string {
	var out []string
	for _, l := range left {
		if l != n.LockFile {
			out = append(out, l)
		}
	}
	return out
}
