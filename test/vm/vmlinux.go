package vm

import (
	"bytes"
	"compress/gzip"
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
)

// compressors the Debian kernels use for the bzImage payload (6.1: xz,
// 6.12: zstd), plus gzip for good measure. Order matters little: each
// candidate offset is tried and only a complete ELF image is accepted.
var compressors = []struct {
	name  string
	magic []byte
	cmd   []string // nil: decompressed in Go
}{
	{"zstd", []byte{0x28, 0xb5, 0x2f, 0xfd}, []string{"zstd", "-dcq"}},
	{"xz", []byte{0xfd, '7', 'z', 'X', 'Z', 0x00}, []string{"xz", "-dcq"}},
	{"gzip", []byte{0x1f, 0x8b, 0x08}, nil},
}

// ExtractVmlinux finds the compressed kernel inside a bzImage and writes the
// uncompressed ELF vmlinux to dst, the logic of the kernel's
// scripts/extract-vmlinux. Booting the ELF (PVH entry) skips the in-guest
// decompression, which is slow under TCG.
func ExtractVmlinux(bzImage, dst string) error {
	data, err := os.ReadFile(bzImage)
	if err != nil {
		return err
	}
	if isELF(data) {
		return os.WriteFile(dst, data, 0o644)
	}
	var tried []string
	for _, c := range compressors {
		for off := 0; ; {
			i := bytes.Index(data[off:], c.magic)
			if i < 0 {
				break
			}
			pos := off + i
			off = pos + 1
			out, err := decompress(c.name, c.cmd, data[pos:])
			if err != nil {
				tried = append(tried, fmt.Sprintf("%s@%d: %v", c.name, pos, err))
				continue
			}
			if err := checkELF(out); err != nil {
				tried = append(tried, fmt.Sprintf("%s@%d: %v", c.name, pos, err))
				continue
			}
			tmp := dst + ".tmp"
			if err := os.WriteFile(tmp, out, 0o644); err != nil {
				return err
			}
			return os.Rename(tmp, dst)
		}
	}
	if len(tried) == 0 {
		return fmt.Errorf("%s: no known compressed payload", bzImage)
	}
	return fmt.Errorf("%s: no payload decompressed to an ELF image: %v", bzImage, tried)
}

func decompress(name string, argv []string, in []byte) ([]byte, error) {
	if argv == nil {
		zr, err := gzip.NewReader(bytes.NewReader(in))
		if err != nil {
			return nil, err
		}
		zr.Multistream(false)
		out, err := io.ReadAll(zr)
		if len(out) > 0 {
			return out, nil // trailing data after the payload is expected
		}
		return nil, err
	}
	if _, err := exec.LookPath(argv[0]); err != nil {
		return nil, fmt.Errorf("%s not installed", argv[0])
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdin = bytes.NewReader(in)
	var out bytes.Buffer
	cmd.Stdout = &out
	err := cmd.Run()
	// The decompressor complains about the bzImage tail after the payload:
	// judge by the output, not the exit code.
	if out.Len() == 0 {
		if err == nil {
			err = errors.New("empty output")
		}
		return nil, err
	}
	return out.Bytes(), nil
}

func isELF(b []byte) bool { return len(b) > 4 && string(b[:4]) == "\x7fELF" }

// checkELF accepts a complete x86-64 ELF image: every loadable segment lies
// inside the data (a truncated decompression is rejected).
func checkELF(b []byte) error {
	if !isELF(b) {
		return errors.New("not ELF")
	}
	f, err := elf.NewFile(bytes.NewReader(b))
	if err != nil {
		return err
	}
	if f.Machine != elf.EM_X86_64 {
		return fmt.Errorf("machine %v", f.Machine)
	}
	for _, p := range f.Progs {
		if p.Off+p.Filesz > uint64(len(b)) {
			return errors.New("truncated")
		}
	}
	return nil
}
