// Package release describes the release image: what `make image` writes
// (internal/cmd/mkimage) and what the Dockerfile builds. A test holds the
// two to the same contents.
package release

import (
	"debug/elf"
	"fmt"
	"os"
	"path/filepath"

	"github.com/underpass-cni/underpass/internal/ociimage"
)

// Binaries are the static binaries `make build` writes, installed in
// /usr/local/bin.
var Binaries = []string{"underpass", "underpassd", "underpassctl"}

// Applets are the busybox applets the DaemonSet's init containers use (a
// few lines of sh: mount the host's bpffs if missing, install the plugin
// and the conflist idempotently). underpassd, the plugin and underpassctl
// never use them.
var Applets = []string{"sh", "basename", "cat", "chmod", "cmp", "cp", "dirname", "echo", "grep", "ls", "mkdir", "mount", "mv", "rm", "test"}

// Entrypoint and Cmd are the image's: the agent with the DaemonSet's
// config path.
var (
	Entrypoint = []string{"/usr/local/bin/underpassd"}
	Cmd        = []string{"--config", "/etc/underpass/underpass.yaml"}
)

// Inputs are the files the image is made of on the build machine.
type Inputs struct {
	BinDir   string // `make build` output
	Busybox  string // a static busybox (Debian: busybox-static, /bin/busybox)
	CABundle string // Debian: ca-certificates, /etc/ssl/certs/ca-certificates.crt
}

// DefaultInputs are the Debian paths.
func DefaultInputs(binDir string) Inputs {
	return Inputs{BinDir: binDir, Busybox: "/bin/busybox", CABundle: "/etc/ssl/certs/ca-certificates.crt"}
}

// Image is the release image named ref.
func Image(ref string, in Inputs) (ociimage.Image, error) {
	img := ociimage.Image{
		Ref:   ref,
		Files: map[string]string{"bin/busybox": in.Busybox, "etc/ssl/certs/ca-certificates.crt": in.CABundle},
		Data: map[string]string{
			"etc/passwd": "root:x:0:0:root:/root:/sbin/nologin\n",
			"etc/group":  "root:x:0:\n",
		},
		Links:      map[string]string{},
		Entrypoint: Entrypoint,
		Cmd:        Cmd,
		User:       "0:0",
		Labels: map[string]string{
			"org.opencontainers.image.title":       "underpass",
			"org.opencontainers.image.description": "eBPF datapath companion for macvlan/ipvlan container networking: underpassd, the underpass CNI plugin, underpassctl",
			"org.opencontainers.image.source":      "https://github.com/underpass-cni/underpass",
		},
	}
	for _, b := range Binaries {
		img.Files["usr/local/bin/"+b] = filepath.Join(in.BinDir, b)
	}
	for _, a := range Applets {
		img.Links["bin/"+a] = "busybox"
	}
	for _, f := range img.Files {
		if _, err := os.Stat(f); err != nil {
			return img, fmt.Errorf("release image: %w (make build writes the binaries; apt-get install busybox-static ca-certificates)", err)
		}
	}
	// The image has no libc and no dynamic loader.
	for _, f := range append([]string{in.Busybox}, binPaths(in.BinDir)...) {
		if err := static(f); err != nil {
			return img, fmt.Errorf("release image: %w", err)
		}
	}
	return img, nil
}

func binPaths(dir string) []string {
	var out []string
	for _, b := range Binaries {
		out = append(out, filepath.Join(dir, b))
	}
	return out
}

// static fails for a dynamically linked ELF file (one with an interpreter).
func static(path string) error {
	f, err := elf.Open(path)
	if err != nil {
		return nil // not ELF (the tests' stand-ins): nothing to load
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return fmt.Errorf("%s is dynamically linked: build it static (CGO_ENABLED=0, as make build does)", path)
		}
	}
	return nil
}
