package vm

import (
	"bytes"
	"compress/gzip"
	"debug/elf"
	"encoding/binary"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

type cpioEntry struct {
	name string
	mode uint32
	rdev [2]uint32
	data string
}

// readNewc is an independent newc reader for the tests.
func readNewc(t *testing.T, b []byte) []cpioEntry {
	t.Helper()
	var out []cpioEntry
	off := 0
	align := func(n int) int { return (n + 3) &^ 3 }
	for {
		for off < len(b) && b[off] == 0 { // padding between archives
			off++
		}
		if off >= len(b) {
			return out
		}
		if len(b)-off < 110 || string(b[off:off+6]) != "070701" {
			t.Fatalf("bad magic at %d: %q", off, b[off:min(off+6, len(b))])
		}
		field := func(i int) uint32 {
			v, err := strconv.ParseUint(string(b[off+6+8*i:off+14+8*i]), 16, 32)
			if err != nil {
				t.Fatal(err)
			}
			return uint32(v)
		}
		mode, size, namesize := field(1), field(6), field(11)
		e := cpioEntry{mode: mode, rdev: [2]uint32{field(9), field(10)}}
		nameStart := off + 110
		e.name = string(b[nameStart : nameStart+int(namesize)-1])
		dataStart := align(nameStart + int(namesize))
		e.data = string(b[dataStart : dataStart+int(size)])
		off = align(dataStart + int(size))
		if e.name != "TRAILER!!!" {
			out = append(out, e)
		}
	}
}

func TestCPIORoundTrip(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	if err := os.MkdirAll(filepath.Join(src, "sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(src, "sub", "a.txt"), []byte("abc"), 0o640)
	os.Symlink("sub/a.txt", filepath.Join(src, "link"))
	host := filepath.Join(dir, "host.bin")
	os.WriteFile(host, []byte("12345"), 0o755)

	var buf bytes.Buffer
	c := newCPIOWriter(&buf, 0)
	c.Bytes("/init", 0o755, []byte("#!/bin/sh\n"))
	c.File("bin/tool", host, 0)
	c.Symlink("bin/sh", "/bin/busybox")
	c.CharDev("dev/console", 0o600, 5, 1)
	c.Tree("/tests/x/testdata", src)
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	first := buf.Len()
	if first%512 != 0 {
		t.Errorf("archive length %d not padded to 512", first)
	}
	c2 := newCPIOWriter(&buf, 1<<20)
	c2.Bytes("etc/second", 0o644, []byte("2"))
	if err := c2.Close(); err != nil {
		t.Fatal(err)
	}

	got := map[string]cpioEntry{}
	var order []string
	for _, e := range readNewc(t, buf.Bytes()) {
		got[e.name] = e
		order = append(order, e.name)
	}
	want := map[string]struct {
		mode uint32
		data string
	}{
		"init":                       {modeFile | 0o755, "#!/bin/sh\n"},
		"bin":                        {modeDir | 0o755, ""},
		"bin/tool":                   {modeFile | 0o755, "12345"},
		"bin/sh":                     {modeLink | 0o777, "/bin/busybox"},
		"dev/console":                {modeChr | 0o600, ""},
		"tests/x/testdata/sub/a.txt": {modeFile | 0o640, "abc"},
		"tests/x/testdata/link":      {modeLink | 0o777, "sub/a.txt"},
		"tests/x/testdata/sub":       {modeDir | 0o755, ""},
		"etc/second":                 {modeFile | 0o644, "2"},
	}
	for name, w := range want {
		e, ok := got[name]
		if !ok {
			t.Errorf("missing %s (have %v)", name, order)
			continue
		}
		if e.mode != w.mode || e.data != w.data {
			t.Errorf("%s: mode %o data %q, want %o %q", name, e.mode, e.data, w.mode, w.data)
		}
	}
	if e := got["dev/console"]; e.rdev != [2]uint32{5, 1} {
		t.Errorf("dev/console rdev %v", e.rdev)
	}
	// Parents come before children.
	pos := map[string]int{}
	for i, n := range order {
		pos[n] = i
	}
	for _, n := range order {
		if p := filepath.Dir(n); p != "." && pos[p] > pos[n] {
			t.Errorf("%s listed before its directory %s", n, p)
		}
	}

	// An independent reader agrees (busybox cpio reads concatenated
	// archives only up to the first trailer, so check the first one).
	if _, err := os.Stat("/bin/busybox"); err == nil {
		cmd := exec.Command("/bin/busybox", "cpio", "-t")
		cmd.Stdin = bytes.NewReader(buf.Bytes()[:first])
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("busybox cpio -t: %v\n%s", err, out)
		}
		for _, n := range []string{"init", "bin/tool", "tests/x/testdata/sub/a.txt"} {
			if !strings.Contains(string(out), n+"\n") {
				t.Errorf("busybox cpio -t does not list %s:\n%s", n, out)
			}
		}
	}
}

func TestParseLog(t *testing.T) {
	log := "\x1bc\x1b[?7l\x1b[2JSeaBIOS\r\nBooting from ROM..UNDERPASS-VM-BEGIN pkg=a\r\n" +
		"=== RUN   TestX\r\n--- PASS: TestX (0.01s)\r\n    --- SKIP: TestX/sub (0.00s)\r\n" +
		"[    1.2] ipvlan: some kernel line --- FAIL: TestY (0.02s)\r\n" +
		"UNDERPASS-VM-END pkg=a status=fail exit=1 secs=0.52\r\n" +
		"UNDERPASS-VM-BEGIN pkg=b\r\n--- PASS: TestZ (0.00s)\r\nUNDERPASS-VM-END pkg=b status=pass exit=0 secs=1.00\r\n" +
		"UNDERPASS-VM-MODULE-FAILED bridge\r\n" +
		"UNDERPASS-VM-DMESG-BEGIN\r\n[ 1.0] boom\r\nUNDERPASS-VM-DMESG-END\r\n" +
		"UNDERPASS-VM-RESULT kernel=6.1.0-56-amd64 pass=1 fail=1 modfail=1\r\n" +
		"[    3.4] UNDERPASS-VM-RESULT kernel=6.1.0-56-amd64 pass=1 fail=1 modfail=1\r\n"
	r := ParseLog([]byte(log))
	if !r.Complete || r.Kernel != "6.1.0-56-amd64" || r.Pass != 1 || r.Fail != 1 || r.ModFail != 1 {
		t.Fatalf("result %+v", r)
	}
	if len(r.Packages) != 2 {
		t.Fatalf("packages %+v", r.Packages)
	}
	a, b := r.Packages[0], r.Packages[1]
	if a.Name != "a" || a.Status != "fail" || a.Exit != 1 || a.Secs != 0.52 || a.Passed != 1 || a.Failed != 1 || a.Skipped != 1 {
		t.Errorf("a = %+v", a)
	}
	if b.Name != "b" || b.Status != "pass" || b.Passed != 1 {
		t.Errorf("b = %+v", b)
	}
	if len(r.ModuleFailures) != 1 || r.ModuleFailures[0] != "bridge" || len(r.Dmesg) != 1 {
		t.Errorf("module failures %v dmesg %v", r.ModuleFailures, r.Dmesg)
	}
	if r.Err() == nil || !strings.Contains(r.Err().Error(), "module") {
		t.Errorf("Err() = %v", r.Err())
	}
	for _, l := range strings.Split(strings.Join(a.Output, "\n"), "\n") {
		if strings.Contains(l, "\r") {
			t.Error("\\r not stripped")
		}
	}

	crashed := ParseLog([]byte("UNDERPASS-VM-BEGIN pkg=a\n=== RUN TestX\n[ 2.0] Kernel panic - not syncing\n"))
	if crashed.Complete || crashed.Err() == nil || crashed.Packages[0].Status != "crash" {
		t.Errorf("crashed log parsed as %+v", crashed)
	}
	if !crashed.Panicked || crashed.BootCrashed() {
		t.Errorf("a panic during the tests counts as a boot crash: %+v", crashed)
	}
	if crashed.Int3Crashed() {
		t.Errorf("a panic that is no int3 oops counts as the TCG flake: %+v", crashed)
	}
	int3 := ParseLog([]byte("UNDERPASS-VM-BEGIN pkg=a\n=== RUN TestX\n[ 9.0] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI\n[ 9.1] RIP: 0010:inet_getpeer+0x41/0x1d0\n[ 9.2] Kernel panic - not syncing: Fatal exception in interrupt\n"))
	if !int3.Int3Crashed() || int3.BootCrashed() || int3.Err() == nil {
		t.Errorf("an int3 oops during the tests: %+v", int3)
	}
	atBoot := ParseLog([]byte("[ 1.2] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI\n[ 1.3] Kernel panic - not syncing: Fatal exception in interrupt\n"))
	if !atBoot.BootCrashed() || atBoot.Err() == nil {
		t.Errorf("a panic while booting is not a boot crash: %+v", atBoot)
	}
	ok := ParseLog([]byte("UNDERPASS-VM-BEGIN pkg=a\nUNDERPASS-VM-END pkg=a status=pass exit=0 secs=0.1\nUNDERPASS-VM-RESULT kernel=x pass=1 fail=0\n"))
	if ok.Err() != nil {
		t.Errorf("good log: %v", ok.Err())
	}
	if got := string(CleanLog([]byte("\x1bc\x1b[?7l\x1b[2J\x1b[0mSeaBIOS\r\n"))); got != "SeaBIOS\n" {
		t.Errorf("CleanLog = %q", got)
	}
	if Tail([]byte("1\r\n2\r\n3\r\n"), 2) != "2\n3" {
		t.Errorf("Tail = %q", Tail([]byte("1\r\n2\r\n3\r\n"), 2))
	}
}

func TestShQuote(t *testing.T) {
	for in, want := range map[string]string{
		"-test.v":        "-test.v",
		"TestA|TestB":    "'TestA|TestB'",
		"it's":           `'it'\''s'`,
		"":               "''",
		"-test.run=^X$":  "'-test.run=^X$'",
		"/tests/a_b.c-d": "/tests/a_b.c-d",
	} {
		if got := shQuote(in); got != want {
			t.Errorf("shQuote(%q) = %s, want %s", in, got, want)
		}
	}
}

// minimalELF builds a tiny x86-64 ELF executable with one PT_LOAD.
func minimalELF() []byte {
	var b bytes.Buffer
	h := elf.Header64{
		Type: uint16(elf.ET_EXEC), Machine: uint16(elf.EM_X86_64), Version: 1,
		Phoff: 64, Ehsize: 64, Phentsize: 56, Phnum: 1,
	}
	copy(h.Ident[:], elf.ELFMAG)
	h.Ident[elf.EI_CLASS] = byte(elf.ELFCLASS64)
	h.Ident[elf.EI_DATA] = byte(elf.ELFDATA2LSB)
	h.Ident[elf.EI_VERSION] = byte(elf.EV_CURRENT)
	binary.Write(&b, binary.LittleEndian, h)
	binary.Write(&b, binary.LittleEndian, elf.Prog64{Type: uint32(elf.PT_LOAD), Off: 0, Filesz: 200, Memsz: 200})
	b.Write(make([]byte, 200-b.Len()))
	return b.Bytes()
}

func TestExtractVmlinux(t *testing.T) {
	img := minimalELF()
	var z bytes.Buffer
	zw := gzip.NewWriter(&z)
	zw.Write(img)
	zw.Close()
	// A fake bzImage: setup code, a false gzip magic, the payload, a tail.
	bz := append([]byte("MZ setup code \x1f\x8b\x08 not really"), z.Bytes()...)
	bz = append(bz, []byte("trailing data after the payload")...)
	dir := t.TempDir()
	src, dst := filepath.Join(dir, "vmlinuz"), filepath.Join(dir, "vmlinux")
	os.WriteFile(src, bz, 0o644)
	if err := ExtractVmlinux(src, dst); err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(dst)
	if !bytes.Equal(got, img) {
		t.Fatalf("extracted %d bytes, want %d", len(got), len(img))
	}
	// A truncated payload is not an image.
	os.WriteFile(src, append([]byte("MZ"), z.Bytes()[:z.Len()/2]...), 0o644)
	if err := ExtractVmlinux(src, dst+"2"); err == nil {
		t.Fatal("truncated payload accepted")
	}
}

func TestModuleNames(t *testing.T) {
	if got := uncompressedName("kernel/net/8021q/8021q.ko.xz"); got != "kernel/net/8021q/8021q.ko" {
		t.Error(got)
	}
	if got := modName("kernel/net/sched/sch-ingress.ko.zst"); got != "sch_ingress" {
		t.Error(got)
	}
	if !Series["6.1"].MatchString("linux-image-6.1.0-56-amd64-unsigned") ||
		Series["6.1"].MatchString("linux-image-6.1.0-56-cloud-amd64-unsigned") ||
		!Series["6.12"].MatchString("linux-image-6.12.117+deb12-amd64-unsigned") ||
		Series["6.12"].MatchString("linux-image-6.12.117+deb12-rt-amd64-unsigned") {
		t.Error("series patterns")
	}
}

func TestParseLdd(t *testing.T) {
	out := "/usr/sbin/ipset:\n" +
		"\tlinux-vdso.so.1 (0x00007ffd1a3f2000)\n" +
		"\tlibipset.so.13 => /lib/x86_64-linux-gnu/libipset.so.13 (0x00007fda082cb000)\n" +
		"\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007fda080e9000)\n" +
		"\t/lib64/ld-linux-x86-64.so.2 (0x00007fda0831b000)\n" +
		"/usr/lib/x86_64-linux-gnu/xtables/libxt_set.so:\n" +
		"\tlibxtables.so.12 => /lib/x86_64-linux-gnu/libxtables.so.12 (0x00007f0e1c3a5000)\n" +
		"\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f0e1c1c3000)\n" +
		"\t/lib64/ld-linux-x86-64.so.2 (0x00007f0e1c3c9000)\n" +
		"/opt/static:\n" +
		"\tstatically linked\n"
	got, err := parseLdd(out)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"/lib/x86_64-linux-gnu/libc.so.6", "/lib/x86_64-linux-gnu/libipset.so.13",
		"/lib/x86_64-linux-gnu/libxtables.so.12", "/lib64/ld-linux-x86-64.so.2"}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Fatalf("parseLdd = %q, want %q", got, want)
	}
	if _, err := parseLdd("/x:\n\tlibgone.so.1 => not found\n"); err == nil || !strings.Contains(err.Error(), "libgone.so.1") {
		t.Fatalf("a missing library: err = %v", err)
	}
}

// A dynamically linked tool (the host's /bin/sh: dash on Debian) comes with
// its interpreter and libc; a directory comes as a tree; static files
// bring nothing.
func TestTestsInitramfsDynamic(t *testing.T) {
	const sh = "/bin/sh"
	if !isDynamic(sh) {
		t.Fatalf("%s is not dynamically linked here: this test wants a dynamic host binary", sh)
	}
	dir := t.TempDir()
	plugins := filepath.Join(dir, "plugins")
	os.MkdirAll(plugins, 0o755)
	os.WriteFile(filepath.Join(plugins, "static.bin"), minimalELF(), 0o755)
	os.Symlink("static.bin", filepath.Join(plugins, "alias.bin"))
	dst := filepath.Join(dir, "t.cpio")
	err := TestsInitramfs(dst, nil, []Extra{{Src: sh, Dst: "/usr/local/bin/dash"}, {Src: plugins, Dst: "/usr/lib/plugins"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(dst)
	names := map[string]cpioEntry{}
	for _, e := range readNewc(t, b) {
		names[e.name] = e
	}
	libs, err := SharedLibs([]string{sh})
	if err != nil {
		t.Fatal(err)
	}
	var interp, libc bool
	for _, l := range libs {
		interp = interp || strings.Contains(l, "/ld-linux")
		libc = libc || strings.HasSuffix(l, "/libc.so.6")
		if _, ok := names[strings.TrimPrefix(l, "/")]; !ok {
			t.Errorf("%s (ldd %s) is not in the archive", l, sh)
		}
	}
	if !interp || !libc {
		t.Errorf("SharedLibs(%s) = %q: no interpreter or libc", sh, libs)
	}
	for _, n := range []string{"usr/local/bin/dash", "usr/lib/plugins/static.bin", "usr/lib/plugins/alias.bin"} {
		if _, ok := names[n]; !ok {
			t.Errorf("%s missing from the archive", n)
		}
	}
	if e := names["usr/lib/plugins/alias.bin"]; e.mode&0o170000 != modeLink || e.data != "static.bin" {
		t.Errorf("alias.bin: mode %o -> %q, want a link to static.bin", e.mode, e.data)
	}
	if _, ok := names["lib64"]; ok {
		t.Error("a lib64 directory would shadow the base archive's lib64 -> lib link")
	}
	if got, _ := SharedLibs([]string{filepath.Join(plugins, "static.bin")}); len(got) != 0 {
		t.Errorf("a static ELF needs %q", got)
	}
}
