package vm

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
)

// Series maps the short kernel names of the matrix to Debian package names.
// The number in the name (the 6.1 ABI, the 6.12 patch level) changes with
// every security update, so the newest one apt knows is looked up each run.
var Series = map[string]*regexp.Regexp{
	"6.1":  regexp.MustCompile(`^linux-image-6\.1\.0-([0-9]+)-amd64-unsigned$`),
	"6.12": regexp.MustCompile(`^linux-image-6\.12\.([0-9]+)\+deb12-amd64-unsigned$`),
}

// SeriesOrder is the order of -kernel all.
var SeriesOrder = []string{"6.1", "6.12"}

// DefaultModules are the modules loaded at boot (their dependencies are
// added in load order). nft_chain_nat and nft_nat are test/cni's stand-in
// for kube-proxy (a DNAT of the live VIP on the node).
var DefaultModules = []string{"veth", "dummy", "macvlan", "ipvlan", "bridge", "8021q", "sch_ingress", "cls_bpf", "act_bpf", "nft_chain_nat", "nft_nat"}

// moduleParams are fixed options (the host's /etc/modprobe.d is ignored).
var moduleParams = map[string]string{
	"dummy": "numdummies=0", // tests create their own dummies
}

// Kernel is a prepared kernel in the cache.
type Kernel struct {
	Series  string `json:"series"`
	Package string `json:"package"`
	Version string `json:"version"`
	Release string `json:"release"` // uname -r
	Dir     string `json:"-"`
}

// Image is what qemu boots: the uncompressed vmlinux when it could be
// extracted, the bzImage otherwise.
func (k *Kernel) Image() string {
	if p := filepath.Join(k.Dir, "vmlinux"); exists(p) {
		return p
	}
	return filepath.Join(k.Dir, "vmlinuz")
}

// Module is one module to insmod, in order.
type Module struct {
	Name   string // e.g. ipvlan
	Rel    string // path under /lib/modules/<release>/, uncompressed .ko
	Params string
}

// Logf reports progress.
type Logf func(format string, args ...any)

func exists(p string) bool { _, err := os.Stat(p); return err == nil }

// Resolved is the package apt would download for a kernel series.
type Resolved struct {
	Package string `json:"package"`
	Version string `json:"version"`
}

// ResolvePackages turns series ("6.1", "6.12") or full package names into
// the package names and candidate versions apt would download. Each
// apt-cache run costs ~0.5 s here (no pkgcache.bin), so the answer is kept in
// the cache until apt's package lists change.
func ResolvePackages(ctx context.Context, cache string, series []string) (map[string]Resolved, error) {
	stamp := aptListsStamp()
	memo := filepath.Join(cache, "resolved.json")
	var saved struct {
		Stamp string              `json:"stamp"`
		Map   map[string]Resolved `json:"map"`
	}
	if b, err := os.ReadFile(memo); err == nil && json.Unmarshal(b, &saved) == nil && saved.Stamp == stamp && stamp != "" {
		out := map[string]Resolved{}
		for _, s := range series {
			if r, ok := saved.Map[s]; ok {
				out[s] = r
			}
		}
		if len(out) == len(series) {
			return out, nil
		}
	}

	pkgs := map[string]string{} // series -> package
	var needSearch []string
	for _, s := range series {
		if strings.HasPrefix(s, "linux-image-") {
			pkgs[s] = s
			continue
		}
		if _, ok := Series[s]; !ok {
			return nil, fmt.Errorf("unknown kernel %q (want %s, all, or a linux-image-… package name)", s, strings.Join(SeriesOrder, ", "))
		}
		needSearch = append(needSearch, s)
	}
	if len(needSearch) > 0 {
		out, err := exec.CommandContext(ctx, "apt-cache", "pkgnames", "linux-image-6.").Output()
		if err != nil {
			return nil, fmt.Errorf("apt-cache pkgnames: %w", err)
		}
		for _, s := range needSearch {
			re, best := Series[s], -1
			for _, name := range strings.Fields(string(out)) {
				m := re.FindStringSubmatch(name)
				if m == nil {
					continue
				}
				if n, _ := strconv.Atoi(m[1]); n > best {
					best, pkgs[s] = n, name
				}
			}
			if best < 0 {
				return nil, fmt.Errorf("apt knows no package for kernel %s (run apt-get update)", s)
			}
		}
	}
	var names []string
	for _, s := range series {
		names = append(names, pkgs[s])
	}
	out, err := exec.CommandContext(ctx, "apt-cache", append([]string{"show", "--no-all-versions"}, names...)...).Output()
	if err != nil {
		return nil, fmt.Errorf("apt-cache show %s: %w", strings.Join(names, " "), err)
	}
	versions := map[string]string{}
	var cur string
	for _, line := range strings.Split(string(out), "\n") {
		if v, ok := strings.CutPrefix(line, "Package: "); ok {
			cur = strings.TrimSpace(v)
		}
		if v, ok := strings.CutPrefix(line, "Version: "); ok && cur != "" {
			versions[cur] = strings.TrimSpace(v)
		}
	}
	res := map[string]Resolved{}
	for _, s := range series {
		v, ok := versions[pkgs[s]]
		if !ok {
			return nil, fmt.Errorf("apt-cache show %s: no version", pkgs[s])
		}
		res[s] = Resolved{Package: pkgs[s], Version: v}
	}
	if stamp != "" {
		if saved.Stamp != stamp || saved.Map == nil {
			saved.Stamp, saved.Map = stamp, map[string]Resolved{}
		}
		for s, r := range res {
			saved.Map[s] = r
		}
		if b, err := json.Marshal(saved); err == nil {
			_ = os.MkdirAll(cache, 0o755)
			tmp := memo + ".tmp"
			if os.WriteFile(tmp, b, 0o644) == nil {
				_ = os.Rename(tmp, memo)
			}
		}
	}
	return res, nil
}

// aptListsStamp changes whenever apt-get update changes the package lists.
func aptListsStamp() string {
	files, _ := filepath.Glob("/var/lib/apt/lists/*_Packages*")
	var b strings.Builder
	for _, f := range files {
		if st, err := os.Stat(f); err == nil {
			fmt.Fprintf(&b, "%s %d %d\n", filepath.Base(f), st.Size(), st.ModTime().UnixNano())
		}
	}
	if b.Len() == 0 {
		return ""
	}
	return hashStrings(b.String())
}

// CachedKernel finds the newest prepared kernel of a series in the cache, for
// machines whose apt lists are gone.
func CachedKernel(cache, series string) (*Kernel, error) {
	re, ok := Series[series]
	if !ok {
		re = regexp.MustCompile("^" + regexp.QuoteMeta(series) + "$")
	}
	metas, _ := filepath.Glob(filepath.Join(cache, "kernels", "*", "meta.json"))
	var best *Kernel
	bestN := -1
	for _, m := range metas {
		k, err := readMeta(filepath.Dir(m))
		if err != nil {
			continue
		}
		sm := re.FindStringSubmatch(k.Package)
		if sm == nil {
			continue
		}
		n := 0
		if len(sm) > 1 {
			n, _ = strconv.Atoi(sm[1])
		}
		if n > bestN {
			best, bestN = k, n
		}
	}
	if best == nil {
		return nil, fmt.Errorf("no cached kernel for %s", series)
	}
	best.Series = series
	return best, nil
}

func readMeta(dir string) (*Kernel, error) {
	b, err := os.ReadFile(filepath.Join(dir, "meta.json"))
	if err != nil {
		return nil, err
	}
	var k Kernel
	if err := json.Unmarshal(b, &k); err != nil {
		return nil, err
	}
	k.Dir = dir
	return &k, nil
}

func safeName(s string) string {
	return strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '-' || r == '_' || r == '+' {
			return r
		}
		return '_'
	}, s)
}

func hashStrings(ss ...string) string {
	h := sha256.New()
	for _, s := range ss {
		h.Write([]byte(s))
		h.Write([]byte{0})
	}
	return hex.EncodeToString(h.Sum(nil))[:12]
}

// modsDir is where the module set for a list of wanted modules is kept.
func (k *Kernel) modsDir(modules []string) string {
	m := append([]string(nil), modules...)
	sort.Strings(m)
	return filepath.Join(k.Dir, "mods-"+hashStrings(m...))
}

// Modules reads the prepared module load order.
func (k *Kernel) Modules(modules []string) ([]Module, string, error) {
	dir := k.modsDir(modules)
	f, err := os.Open(filepath.Join(dir, "order.txt"))
	if err != nil {
		return nil, "", err
	}
	defer f.Close()
	var mods []Module
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.SplitN(sc.Text(), " ", 3)
		if len(fields) < 2 {
			continue
		}
		m := Module{Name: fields[0], Rel: fields[1]}
		if len(fields) == 3 {
			m.Params = fields[2]
		}
		mods = append(mods, m)
	}
	return mods, dir, sc.Err()
}

// PrepareKernel makes sure the cache holds the kernel image and the wanted
// modules of pkg at version: apt-get download, dpkg -x, depmod -b, modprobe
// --show-depends for the load order, modules copied uncompressed.
func PrepareKernel(ctx context.Context, cache, series, pkg, version string, modules []string, logf Logf) (*Kernel, error) {
	dir := filepath.Join(cache, "kernels", safeName(pkg+"_"+version))
	k := &Kernel{Series: series, Package: pkg, Version: version, Dir: dir}
	if km, err := readMeta(dir); err == nil {
		k.Release = km.Release
		if exists(filepath.Join(k.modsDir(modules), "order.txt")) {
			return k, nil
		}
	}
	if err := os.MkdirAll(filepath.Join(cache, "kernels"), 0o755); err != nil {
		return nil, err
	}
	work, err := os.MkdirTemp(filepath.Join(cache, "kernels"), ".work-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(work)

	logf("downloading %s %s", pkg, version)
	dl := exec.CommandContext(ctx, "apt-get", "download", "-q", pkg+"="+version)
	dl.Dir = work
	if out, err := dl.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("apt-get download %s=%s: %v\n%s", pkg, version, err, out)
	}
	debs, _ := filepath.Glob(filepath.Join(work, "*.deb"))
	if len(debs) != 1 {
		return nil, fmt.Errorf("apt-get download %s: got %d .deb files", pkg, len(debs))
	}
	root := filepath.Join(work, "root")
	logf("unpacking %s", filepath.Base(debs[0]))
	if out, err := exec.CommandContext(ctx, "dpkg", "-x", debs[0], root).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("dpkg -x: %v\n%s", err, out)
	}
	os.Remove(debs[0])
	rels, _ := filepath.Glob(filepath.Join(root, "lib", "modules", "*"))
	if len(rels) != 1 {
		return nil, fmt.Errorf("%s: expected one /lib/modules/<release>, found %d", pkg, len(rels))
	}
	k.Release = filepath.Base(rels[0])
	vmlinuz := filepath.Join(root, "boot", "vmlinuz-"+k.Release)

	// Kernel image (only if not already there from an earlier module set).
	if _, err := readMeta(dir); err != nil {
		kdir := filepath.Join(work, "kernel")
		if err := os.MkdirAll(kdir, 0o755); err != nil {
			return nil, err
		}
		if err := copyFile(vmlinuz, filepath.Join(kdir, "vmlinuz")); err != nil {
			return nil, err
		}
		if err := ExtractVmlinux(vmlinuz, filepath.Join(kdir, "vmlinux")); err != nil {
			logf("cannot extract vmlinux (booting the bzImage, slower): %v", err)
		}
		for _, f := range []string{"config-", "System.map-"} {
			_ = copyFile(filepath.Join(root, "boot", f+k.Release), filepath.Join(kdir, strings.TrimSuffix(f, "-")))
		}
		meta, _ := json.MarshalIndent(k, "", "  ")
		if err := os.WriteFile(filepath.Join(kdir, "meta.json"), append(meta, '\n'), 0o644); err != nil {
			return nil, err
		}
		if err := os.Rename(kdir, dir); err != nil && !exists(filepath.Join(dir, "meta.json")) {
			return nil, err
		}
	}

	// Modules: Debian's debs ship no modules.dep.
	depmod := "/sbin/depmod"
	if !exists(depmod) {
		depmod = "depmod"
	}
	if out, err := exec.CommandContext(ctx, depmod, "-b", root, k.Release).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("depmod -b: %v\n%s", err, out)
	}
	modprobe := "/sbin/modprobe"
	if !exists(modprobe) {
		modprobe = "modprobe"
	}
	mroot := filepath.Join(root, "lib", "modules", k.Release)
	mwork := filepath.Join(work, "mods")
	seen := map[string]bool{}
	var order bytes.Buffer
	for _, want := range modules {
		out, err := exec.CommandContext(ctx, modprobe, "-C", "/dev/null", "-d", root, "-S", k.Release, "--show-depends", want).CombinedOutput()
		if err != nil {
			return nil, fmt.Errorf("modprobe --show-depends %s on %s: %v\n%s", want, k.Release, err, out)
		}
		for _, line := range strings.Split(string(out), "\n") {
			f := strings.Fields(line)
			if len(f) < 2 || f[0] != "insmod" {
				continue // "builtin x"
			}
			rel, err := filepath.Rel(mroot, f[1])
			if err != nil || strings.HasPrefix(rel, "..") {
				return nil, fmt.Errorf("modprobe: unexpected path %s", f[1])
			}
			name := modName(rel)
			if seen[name] {
				continue
			}
			seen[name] = true
			dstRel := uncompressedName(rel)
			if err := copyModule(f[1], filepath.Join(mwork, dstRel)); err != nil {
				return nil, fmt.Errorf("module %s: %w", rel, err)
			}
			fmt.Fprintf(&order, "%s %s", name, dstRel)
			if p := moduleParams[name]; p != "" {
				fmt.Fprintf(&order, " %s", p)
			}
			order.WriteByte('\n')
		}
	}
	if err := os.MkdirAll(mwork, 0o755); err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(mwork, "order.txt"), order.Bytes(), 0o644); err != nil {
		return nil, err
	}
	md := k.modsDir(modules)
	if err := os.Rename(mwork, md); err != nil && !exists(filepath.Join(md, "order.txt")) {
		return nil, err
	}
	return k, nil
}

func modName(rel string) string {
	b := filepath.Base(uncompressedName(rel))
	return strings.ReplaceAll(strings.TrimSuffix(b, ".ko"), "-", "_")
}

func uncompressedName(rel string) string {
	for _, ext := range []string{".xz", ".zst", ".gz"} {
		if strings.HasSuffix(rel, ".ko"+ext) {
			return strings.TrimSuffix(rel, ext)
		}
	}
	return rel
}

// copyModule copies a .ko, decompressing .ko.xz/.zst/.gz (busybox insmod
// uses init_module, which wants the plain ELF).
func copyModule(src, dst string) error {
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	var tool string
	switch filepath.Ext(src) {
	case ".ko":
		return copyFile(src, dst)
	case ".xz":
		tool = "xz"
	case ".zst":
		tool = "zstd"
	case ".gz":
		tool = "gzip"
	default:
		return fmt.Errorf("unknown module format %s", src)
	}
	out, err := os.Create(dst)
	if err != nil {
		return err
	}
	cmd := exec.Command(tool, "-dc", src)
	cmd.Stdout = out
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	err = cmd.Run()
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("%s -dc %s: %v %s", tool, src, err, stderr.String())
	}
	return nil
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}
