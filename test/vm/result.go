package vm

import (
	"bytes"
	"fmt"
	"regexp"
	"strconv"
	"strings"
)

// PackageResult is one test binary's run inside the VM.
type PackageResult struct {
	Name                    string
	Status                  string // pass, fail, or "crash" when the END line is missing
	Exit                    int
	Secs                    float64
	Passed, Failed, Skipped int // from -test.v "--- PASS:" lines (subtests included)
	Output                  []string
}

// Result is what the serial log says.
type Result struct {
	Kernel         string // uname -r
	Pass, Fail     int
	ModFail        int
	Complete       bool // the UNDERPASS-VM-RESULT line was seen
	Panicked       bool // the kernel panicked (oops=panic: any oops)
	Int3           bool // the oops was an int3 trap (live code patching under TCG)
	Packages       []*PackageResult
	ModuleFailures []string
	Dmesg          []string
}

var (
	reResult = regexp.MustCompile(`UNDERPASS-VM-RESULT kernel=(\S+) pass=(\d+) fail=(\d+)(?: modfail=(\d+))?`)
	reBegin  = regexp.MustCompile(`UNDERPASS-VM-BEGIN pkg=(\S+)`)
	reEnd    = regexp.MustCompile(`UNDERPASS-VM-END pkg=(\S+) status=(\S+) exit=(-?\d+) secs=([0-9.]+)`)
	reModF   = regexp.MustCompile(`UNDERPASS-VM-MODULE-FAILED (\S+)`)
	reTest   = regexp.MustCompile(`--- (PASS|FAIL|SKIP): \S+`)
)

var reEscape = regexp.MustCompile(`\x1b(\[[0-9;?]*[A-Za-z]|[A-Za-z])`)

// CleanLog strips carriage returns (the serial console writes \r\n) and
// terminal escapes (a BIOS clears the screen).
func CleanLog(b []byte) []byte {
	return reEscape.ReplaceAll(bytes.ReplaceAll(b, []byte("\r"), nil), nil)
}

// ParseLog reads a serial console log. Markers are searched anywhere in a
// line: a kernel message may be printed in front of them.
func ParseLog(log []byte) *Result {
	r := &Result{}
	var cur *PackageResult
	inDmesg := false
	for _, line := range strings.Split(string(CleanLog(log)), "\n") {
		if strings.Contains(line, "UNDERPASS-VM-DMESG-BEGIN") {
			inDmesg = true
			continue
		}
		if strings.Contains(line, "UNDERPASS-VM-DMESG-END") {
			inDmesg = false
			continue
		}
		if inDmesg {
			r.Dmesg = append(r.Dmesg, line)
			continue
		}
		if strings.Contains(line, "Kernel panic - not syncing") {
			r.Panicked = true
		}
		if strings.Contains(line, "Oops: int3") {
			r.Int3 = true
		}
		if m := reResult.FindStringSubmatch(line); m != nil {
			r.Complete = true
			r.Kernel = m[1]
			r.Pass, _ = strconv.Atoi(m[2])
			r.Fail, _ = strconv.Atoi(m[3])
			if m[4] != "" {
				r.ModFail, _ = strconv.Atoi(m[4])
			}
			continue
		}
		if m := reModF.FindStringSubmatch(line); m != nil {
			r.ModuleFailures = append(r.ModuleFailures, m[1])
			continue
		}
		if m := reBegin.FindStringSubmatch(line); m != nil {
			cur = &PackageResult{Name: m[1], Status: "crash", Exit: -1}
			r.Packages = append(r.Packages, cur)
			continue
		}
		if m := reEnd.FindStringSubmatch(line); m != nil {
			if cur == nil || cur.Name != m[1] {
				cur = &PackageResult{Name: m[1]}
				r.Packages = append(r.Packages, cur)
			}
			cur.Status = m[2]
			cur.Exit, _ = strconv.Atoi(m[3])
			cur.Secs, _ = strconv.ParseFloat(m[4], 64)
			cur = nil
			continue
		}
		if cur != nil {
			cur.Output = append(cur.Output, line)
			if m := reTest.FindStringSubmatch(line); m != nil {
				switch m[1] {
				case "PASS":
					cur.Passed++
				case "FAIL":
					cur.Failed++
				case "SKIP":
					cur.Skipped++
				}
			}
		}
	}
	return r
}

// BootCrashed says the kernel panicked before any test binary started:
// nothing of ours had run yet. Under TCG a stock kernel now and then oopses
// while it boots (an int3 from live code patching racing the other vCPU,
// seen on 6.12); such a run is worth booting again, a crash during the
// tests never is.
func (r *Result) BootCrashed() bool {
	return r.Panicked && !r.Complete && len(r.Packages) == 0
}

// Int3Crashed says the run ended in an int3 oops: a trap on a site the
// kernel was live-patching (a static key, a jump label) that the other
// vCPU hit mid-patch. Under TCG this races now and then in stock kernels,
// at boot (BootCrashed) and, more rarely, in the middle of the tests
// (6.12: once in 7 runs of the VLAN test, in inet_getpeer; a qemu flake of
// the same shape: multipath-tcp/mptcp_net-next#471). The whole kernel run
// is worth one more boot; a second such crash, or any other crash, is a
// failure.
func (r *Result) Int3Crashed() bool {
	return r.Panicked && r.Int3 && !r.Complete
}

// Err says why a run failed, or nil.
func (r *Result) Err() error {
	switch {
	case !r.Complete:
		return fmt.Errorf("no UNDERPASS-VM-RESULT line: the VM crashed, hung or was killed")
	case r.ModFail > 0:
		return fmt.Errorf("%d module(s) failed to load: %s", r.ModFail, strings.Join(r.ModuleFailures, " "))
	case r.Fail > 0:
		return fmt.Errorf("%d test binar(y/ies) failed", r.Fail)
	case r.Pass == 0:
		return fmt.Errorf("no test binary ran")
	}
	return nil
}

// Tail returns the last n lines of a log, \r stripped.
func Tail(log []byte, n int) string {
	lines := strings.Split(strings.TrimRight(string(CleanLog(log)), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
