// Command vmtest runs the project's Go tests inside qemu on Debian's 6.1 and
// 6.12 kernels (the kernel matrix, tier 3 in docs/architecture.md).
//
// It compiles each package into a static test binary, boots each kernel with
// a cached busybox initramfs plus a small second cpio holding the binaries,
// and parses the result lines the VM prints on its serial console.
//
//	go run ./test/vm/cmd/vmtest -kernel all -pkgs ./test/vm/selftest -run 'Ipvlan|TC'
package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/underpass-cni/underpass/internal/testutil"
	"github.com/underpass-cni/underpass/test/vm"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "vmtest:", err)
		os.Exit(1)
	}
}

// listFlag is a repeatable flag that also takes comma-separated values.
type listFlag []string

func (l *listFlag) String() string { return strings.Join(*l, ",") }
func (l *listFlag) Set(s string) error {
	*l = append(*l, splitList(s)...)
	return nil
}

func splitList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

func defaultCache() string {
	if d := os.Getenv("UNDERPASS_VM_CACHE"); d != "" {
		return d
	}
	home, err := os.UserHomeDir()
	if err != nil {
		home = os.TempDir()
	}
	return filepath.Join(home, ".cache", "underpass", "vm")
}

type options struct {
	kernels  []string
	pkgs     []string
	run      string
	timeout  time.Duration
	modules  []string
	bins     []string
	files    []string
	env      []string
	args     []string
	cache    string
	verbose  bool
	show     *regexp.Regexp
	memory   string
	cpus     int
	logf     vm.Logf
	modRoot  string
	workDir  string
	started  time.Time
	accelDoc string
}

func run() error {
	o := &options{started: time.Now()}
	var kernel, pkgs, modules, bins, args, show string
	var files, env listFlag
	flag.StringVar(&kernel, "kernel", "all", "kernels: 6.1, 6.12, all, a comma list, or a linux-image-… package name")
	flag.StringVar(&pkgs, "pkgs", "./test/vm/selftest", "comma-separated packages (patterns like ./test/... work) to compile into test binaries")
	flag.StringVar(&o.run, "run", "", "run only tests matching this regexp (passed as -test.run)")
	flag.DurationVar(&o.timeout, "timeout", 5*time.Minute, "per kernel: the VM is killed and the run fails after this")
	flag.StringVar(&modules, "modules", "", "more kernel modules to load at boot, comma-separated (added to "+strings.Join(vm.DefaultModules, ",")+")")
	flag.StringVar(&bins, "bins", "", "comma-separated main packages built statically into /usr/local/bin in the VM (e.g. ./cmd/underpass)")
	flag.Var(&files, "file", "host[:guest] file to add to the VM (repeatable; default guest path /usr/local/bin/<name>); a dynamically linked ELF brings its interpreter and libraries (ldd), a directory is copied as a tree (default guest path: the host path)")
	flag.Var(&env, "env", "KEY=VALUE set for the test binaries in the VM (repeatable)")
	flag.StringVar(&args, "args", "", "more flags for every test binary, space-separated (e.g. '-test.count=1 -test.failfast')")
	flag.StringVar(&o.cache, "cache", defaultCache(), "cache for kernels and initramfs ($UNDERPASS_VM_CACHE)")
	flag.BoolVar(&o.verbose, "v", false, "stream the serial console and print every package's output, not only failing ones")
	flag.StringVar(&show, "show", "", "print the output lines matching this regexp of every package, passing ones too (e.g. 'verifier: ' for the verifier table)")
	flag.StringVar(&o.memory, "m", "2G", "VM memory")
	flag.IntVar(&o.cpus, "smp", 2, "VM CPUs")
	flag.Parse()
	if flag.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", flag.Args())
	}
	for _, k := range splitList(kernel) {
		if k == "all" {
			o.kernels = append(o.kernels, vm.SeriesOrder...)
		} else {
			o.kernels = append(o.kernels, k)
		}
	}
	o.pkgs, o.bins, o.files, o.env = splitList(pkgs), splitList(bins), files, env
	o.modules = append(append([]string(nil), vm.DefaultModules...), splitList(modules)...)
	o.args = strings.Fields(args)
	if show != "" {
		re, err := regexp.Compile(show)
		if err != nil {
			return fmt.Errorf("-show: %w", err)
		}
		o.show = re
	}
	if len(o.kernels) == 0 || len(o.pkgs) == 0 {
		return errors.New("need -kernel and -pkgs")
	}
	o.logf = func(format string, a ...any) {
		fmt.Printf("vmtest: [%5.1fs] %s\n", time.Since(o.started).Seconds(), fmt.Sprintf(format, a...))
	}
	if err := checkTools(); err != nil {
		return err
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	root, err := moduleRoot(ctx)
	if err != nil {
		return err
	}
	o.modRoot = root
	if err := os.MkdirAll(o.cache, 0o755); err != nil {
		return err
	}
	o.workDir, err = os.MkdirTemp(o.cache, "run-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(o.workDir)
	_, o.accelDoc = vm.Accel()

	// 1. Test binaries and extra files (once, shared by all kernels).
	t0 := time.Now()
	tests, extras, err := buildTests(ctx, o)
	if err != nil {
		return err
	}
	testsCPIO := filepath.Join(o.workDir, "tests.cpio")
	if err := vm.TestsInitramfs(testsCPIO, tests, extras, nil); err != nil {
		return fmt.Errorf("tests cpio: %w", err)
	}
	o.logf("built %d test binar(y/ies) in %.1fs", len(tests), time.Since(t0).Seconds())

	// 2. One VM per kernel, one after the other (2 cores here).
	resolved, rerr := vm.ResolvePackages(ctx, o.cache, o.kernels)
	var runs []*kernelRun
	for _, series := range o.kernels {
		r, ok := resolved[series]
		if rerr != nil || !ok {
			k, cerr := vm.CachedKernel(o.cache, series)
			if cerr != nil {
				runs = append(runs, &kernelRun{series: series, err: fmt.Errorf("%v (and %v)", rerr, cerr)})
				continue
			}
			o.logf("%s: %v; using cached %s %s", series, rerr, k.Package, k.Version)
			r = vm.Resolved{Package: k.Package, Version: k.Version}
		}
		kr := runKernel(ctx, o, series, r, tests, testsCPIO)
		runs = append(runs, kr)
		if ctx.Err() != nil {
			break
		}
	}
	return summarize(o, tests, runs)
}

func checkTools() error {
	var missing []string
	for _, t := range [][2]string{
		{"qemu-system-x86_64", "qemu-system-x86"},
		{"apt-get", "apt"},
		{"dpkg", "dpkg"},
		{"xz", "xz-utils"},
		{"zstd", "zstd"},
		{"go", "golang"},
	} {
		if _, err := exec.LookPath(t[0]); err != nil {
			missing = append(missing, t[1])
		}
	}
	if _, err := os.Stat("/sbin/depmod"); err != nil {
		if _, err := exec.LookPath("depmod"); err != nil {
			missing = append(missing, "kmod")
		}
	}
	if _, err := os.Stat("/bin/busybox"); err != nil {
		missing = append(missing, "busybox-static")
	}
	if len(missing) > 0 {
		return fmt.Errorf("missing tools: apt-get install %s (test/vm/run.sh does this)", strings.Join(missing, " "))
	}
	return nil
}

func moduleRoot(ctx context.Context) (string, error) {
	out, err := exec.CommandContext(ctx, "go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	gomod := strings.TrimSpace(string(out))
	if gomod == "" || gomod == os.DevNull {
		return "", errors.New("run vmtest inside the underpass module")
	}
	return filepath.Dir(gomod), nil
}

type goPackage struct {
	ImportPath, Dir, Rel string
}

func listPackages(ctx context.Context, o *options) ([]goPackage, error) {
	args := append([]string{"list", "-f", "{{.ImportPath}}\t{{.Dir}}\t{{len .TestGoFiles}}\t{{len .XTestGoFiles}}\t{{.Module.Path}}"}, o.pkgs...)
	cmd := exec.CommandContext(ctx, "go", args...)
	cmd.Dir = o.modRoot
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("go list %s: %v\n%s", strings.Join(o.pkgs, " "), err, stderr.String())
	}
	var pkgs []goPackage
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		f := strings.Split(line, "\t")
		if len(f) != 5 {
			continue
		}
		if f[2] == "0" && f[3] == "0" {
			continue // no tests
		}
		rel := strings.TrimPrefix(strings.TrimPrefix(f[0], f[4]), "/")
		if rel == "" {
			rel = "root"
		}
		pkgs = append(pkgs, goPackage{ImportPath: f[0], Dir: f[1], Rel: rel})
	}
	if len(pkgs) == 0 {
		return nil, fmt.Errorf("no packages with tests in %s", strings.Join(o.pkgs, ","))
	}
	return pkgs, nil
}

func goBuild(ctx context.Context, o *options, args ...string) error {
	cmd := exec.CommandContext(ctx, "go", args...)
	cmd.Dir = o.modRoot
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("go %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return nil
}

func buildTests(ctx context.Context, o *options) ([]vm.TestBinary, []vm.Extra, error) {
	pkgs, err := listPackages(ctx, o)
	if err != nil {
		return nil, nil, err
	}
	binDir := filepath.Join(o.workDir, "bin")
	if err := os.MkdirAll(binDir, 0o755); err != nil {
		return nil, nil, err
	}
	testArgs := []string{"-test.v"}
	if o.run != "" {
		testArgs = append(testArgs, "-test.run", o.run)
	}
	if o.timeout > 30*time.Second {
		// The binary's own timeout panics with a goroutine dump, more useful
		// than the VM being killed.
		testArgs = append(testArgs, "-test.timeout", (o.timeout - 15*time.Second).String())
	}
	testArgs = append(testArgs, o.args...)
	var tests []vm.TestBinary
	for _, p := range pkgs {
		name := strings.ReplaceAll(p.Rel, "/", "_")
		bin := filepath.Join(binDir, name+".test")
		if err := goBuild(ctx, o, "test", "-c", "-o", bin, "-ldflags=-s -w", p.ImportPath); err != nil {
			return nil, nil, err
		}
		if _, err := os.Stat(bin); err != nil {
			return nil, nil, fmt.Errorf("go test -c %s wrote no binary", p.ImportPath)
		}
		t := vm.TestBinary{Name: name, Path: bin, Args: testArgs}
		if st, err := os.Stat(filepath.Join(p.Dir, "testdata")); err == nil && st.IsDir() {
			t.Testdat = filepath.Join(p.Dir, "testdata")
		}
		tests = append(tests, t)
	}
	var extras []vm.Extra
	for _, b := range o.bins {
		name := filepath.Base(b)
		out := filepath.Join(binDir, "cmd", name)
		if err := goBuild(ctx, o, "build", "-o", out, "-ldflags=-s -w", b); err != nil {
			return nil, nil, err
		}
		extras = append(extras, vm.Extra{Src: out, Dst: "/usr/local/bin/" + name})
	}
	for _, f := range o.files {
		src, dst, ok := strings.Cut(f, ":")
		st, err := os.Stat(src)
		if err != nil {
			return nil, nil, fmt.Errorf("-file: %w", err)
		}
		switch {
		case ok:
		case st.IsDir():
			dst = src // dlopened plugins are looked for where they were built to be
		default:
			dst = "/usr/local/bin/" + filepath.Base(src)
		}
		extras = append(extras, vm.Extra{Src: src, Dst: dst})
	}
	return tests, extras, nil
}

type kernelRun struct {
	series  string
	kernel  *vm.Kernel
	result  *vm.Result
	err     error
	prepare time.Duration // download, unpack, base initramfs (0 when cached)
	wall    time.Duration // qemu, boot to power off
	log     string
}

func runKernel(ctx context.Context, o *options, series string, r vm.Resolved, tests []vm.TestBinary, testsCPIO string) *kernelRun {
	kr := &kernelRun{series: series}
	t0 := time.Now()
	pkg, version := r.Package, r.Version
	k, err := vm.PrepareKernel(ctx, o.cache, series, pkg, version, o.modules, o.logf)
	if err != nil {
		kr.err = err
		return kr
	}
	kr.kernel = k
	base, err := vm.BaseInitramfs(k, o.modules)
	if err != nil {
		kr.err = err
		return kr
	}
	envCPIO := filepath.Join(o.workDir, "env-"+series+".cpio")
	env := map[string]string{
		"UNDERPASS_VM_KERNEL":  series,           // 6.1, 6.12 (or the package name)
		"UNDERPASS_VM_PACKAGE": pkg,              // the Debian package booted
		"UNDERPASS_VM_BINDIR":  "/usr/local/bin", // where -bins and -file put binaries
		// Both kernels have ipvlan and 8021q (VLAN links, loaded at boot):
		// a test that would skip for want of them fails here instead
		// (testutil.SkipIfNotSupported). -env overrides.
		testutil.RequireFeaturesEnv: "ipvlan,vlan",
	}
	for _, e := range o.env {
		kv, v, _ := strings.Cut(e, "=")
		env[kv] = v
	}
	if err := vm.TestsInitramfs(envCPIO, nil, nil, env); err != nil {
		kr.err = err
		return kr
	}
	// The env cpio has an empty /tests/run.sh: put the tests cpio after it.
	initrd := filepath.Join(o.workDir, "initrd-"+series+".cpio")
	if err := vm.Concat(initrd, base, envCPIO, testsCPIO); err != nil {
		kr.err = err
		return kr
	}
	kr.prepare = time.Since(t0)

	// qemu writes into this run's own directory (runs may overlap); the
	// cleaned log is kept as logs/serial-<kernel>.log.
	serial := filepath.Join(o.workDir, "serial-"+series+".log")
	logDir := filepath.Join(o.cache, "logs")
	_ = os.MkdirAll(logDir, 0o755)
	kr.log = filepath.Join(logDir, "serial-"+series+".log")
	o.logf("booting %s (%s, %s) with %d test binar(y/ies), %s", series, k.Release, filepath.Base(k.Image()), len(tests), o.accelDoc)
	var stopFollow func()
	if o.verbose {
		stopFollow = follow(serial, "["+series+"] ")
	}
	var raw []byte
	int3Retried := false
	for attempt := 1; ; attempt++ {
		kr.wall, kr.err = vm.Boot(ctx, vm.BootOptions{
			Kernel: k.Image(), Initrd: initrd, Log: serial,
			Memory: o.memory, CPUs: o.cpus, Timeout: o.timeout,
		})
		raw, _ = os.ReadFile(serial)
		kr.result = vm.ParseLog(raw)
		if kr.result.BootCrashed() && attempt < bootAttempts {
			fmt.Printf("vmtest: %s: the kernel panicked while booting, before any test ran (attempt %d of %d); last lines:\n%s\nvmtest: %s: booting again\n",
				series, attempt, bootAttempts, indent(vm.Tail(raw, 12)), series)
			continue
		}
		if !kr.result.BootCrashed() && kr.result.Int3Crashed() && !int3Retried {
			// Once per kernel, loudly: a crash of ours would come back.
			int3Retried = true
			fmt.Printf("vmtest: %s: WARNING: the kernel oopsed on an int3 (live code patching under TCG, see vm.Result.Int3Crashed) during the tests; last lines:\n%s\nvmtest: %s: running the whole kernel again, once\n",
				series, indent(vm.Tail(raw, 30)), series)
			continue
		}
		break
	}
	if stopFollow != nil {
		stopFollow()
	}
	tmp := kr.log + fmt.Sprintf(".%d", os.Getpid())
	if os.WriteFile(tmp, vm.CleanLog(raw), 0o644) == nil {
		_ = os.Rename(tmp, kr.log)
	}
	if kr.err == nil {
		kr.err = kr.result.Err()
	}
	if !kr.result.Complete {
		fmt.Printf("vmtest: %s: %v; last lines of %s:\n%s\n", series, kr.err, kr.log, indent(vm.Tail(raw, 40)))
	}
	o.logf("%s done in %.1fs (prepare %.1fs)", series, kr.wall.Seconds(), kr.prepare.Seconds())
	return kr
}

// bootAttempts bounds the boots of one kernel that panic before any test
// ran (vm.Result.BootCrashed).
const bootAttempts = 3

// follow prints complete new lines of a growing file until stopped.
func follow(path, prefix string) func() {
	done := make(chan struct{})
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		var off int64
		var partial []byte
		flush := func() {
			f, err := os.Open(path)
			if err != nil {
				return
			}
			defer f.Close()
			if _, err := f.Seek(off, io.SeekStart); err != nil {
				return
			}
			b, _ := io.ReadAll(f)
			off += int64(len(b))
			partial = append(partial, vm.CleanLog(b)...)
			for {
				i := bytes.IndexByte(partial, '\n')
				if i < 0 {
					break
				}
				fmt.Printf("%s%s\n", prefix, partial[:i])
				partial = partial[i+1:]
			}
		}
		t := time.NewTicker(200 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-done:
				flush()
				if len(partial) > 0 {
					fmt.Printf("%s%s\n", prefix, partial)
				}
				return
			case <-t.C:
				flush()
			}
		}
	}()
	return func() { close(done); <-finished }
}

func indent(s string) string {
	var b strings.Builder
	sc := bufio.NewScanner(strings.NewReader(s))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		b.WriteString("    | " + sc.Text() + "\n")
	}
	return strings.TrimRight(b.String(), "\n")
}

func summarize(o *options, tests []vm.TestBinary, runs []*kernelRun) error {
	passed, failed := 0, 0
	// Output of failing packages (all with -v, where it was streamed already
	// unless it was a failure).
	for _, kr := range runs {
		if kr.result == nil {
			continue
		}
		for _, p := range kr.result.Packages {
			if p.Status != "pass" && !o.verbose {
				fmt.Printf("--- %s %s output:\n%s\n", kr.series, p.Name, indent(strings.Join(p.Output, "\n")))
			}
		}
		if kr.err != nil && len(kr.result.Dmesg) > 0 && !o.verbose {
			fmt.Printf("--- %s dmesg (tail):\n%s\n", kr.series, indent(strings.Join(kr.result.Dmesg, "\n")))
		}
	}
	if o.show != nil && !o.verbose {
		for _, kr := range runs {
			if kr.result == nil {
				continue
			}
			for _, p := range kr.result.Packages {
				var lines []string
				for _, l := range p.Output {
					if o.show.MatchString(l) {
						lines = append(lines, strings.TrimSpace(l))
					}
				}
				if len(lines) > 0 {
					fmt.Printf("--- %s %s (-show %s):\n%s\n", kr.series, p.Name, o.show, indent(strings.Join(lines, "\n")))
				}
			}
		}
	}
	fmt.Println()
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "KERNEL\tRELEASE\tPACKAGE\tRESULT\tTESTS pass/fail/skip\tTIME")
	for _, kr := range runs {
		release := "-"
		if kr.kernel != nil {
			release = kr.kernel.Release
		}
		byName := map[string]*vm.PackageResult{}
		if kr.result != nil {
			for _, p := range kr.result.Packages {
				byName[p.Name] = p
			}
		}
		for _, t := range tests {
			p := byName[t.Name]
			switch {
			case p == nil:
				failed++
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t-\t-\n", kr.series, release, t.Name, "NOT RUN")
			default:
				res := "ok"
				if p.Status != "pass" {
					res = "FAIL"
					if p.Status == "crash" {
						res = "CRASH"
					}
					failed++
				} else {
					passed++
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d/%d/%d\t%.2fs\n", kr.series, release, t.Name, res, p.Passed, p.Failed, p.Skipped, p.Secs)
			}
		}
		status := "ok"
		if kr.err != nil {
			status = "FAIL: " + kr.err.Error()
		}
		fmt.Fprintf(tw, "%s\t%s\t(VM)\t%s\t\tprepare %.1fs, boot+run %.1fs\n", kr.series, release, status, kr.prepare.Seconds(), kr.wall.Seconds())
	}
	tw.Flush()
	for _, kr := range runs {
		if kr.log != "" {
			fmt.Printf("serial log %s: %s\n", kr.series, kr.log)
		}
	}
	fmt.Printf("total %.1fs\n", time.Since(o.started).Seconds())
	var errs []string
	for _, kr := range runs {
		if kr.err != nil {
			errs = append(errs, kr.series+": "+kr.err.Error())
		}
	}
	if len(runs) < len(o.kernels) {
		errs = append(errs, "interrupted")
	}
	// The plain closing line CI reads: package runs, kernels × packages.
	fmt.Printf("vmtest: %d passed, %d failed\n", passed, failed)
	if len(errs) > 0 {
		return errors.New(strings.Join(errs, "; "))
	}
	return nil
}
