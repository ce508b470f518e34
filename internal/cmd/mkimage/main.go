// Command mkimage writes the release image (internal/release) as a
// docker-archive tarball, without a Docker daemon: `make image`. Load it
// with `docker load`, `podman load` or `ctr -n k8s.io images import`.
package main

import (
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/underpass-cni/underpass/internal/release"
)

func main() {
	if err := run(os.Args[1:], os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "mkimage:", err)
		os.Exit(1)
	}
}

func run(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("mkimage", flag.ContinueOnError)
	fs.SetOutput(stderr)
	bin := fs.String("bin", "bin", "directory with the static binaries of `make build`")
	out := fs.String("out", "bin/underpass-image.tar", "the docker-archive to write")
	ref := fs.String("ref", "ghcr.io/underpass-cni/underpass:dev", "the image's name and tag")
	busybox := fs.String("busybox", "/bin/busybox", "a static busybox (Debian: busybox-static)")
	ca := fs.String("ca-bundle", "/etc/ssl/certs/ca-certificates.crt", "the CA bundle (Debian: ca-certificates)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	in := release.DefaultInputs(*bin)
	in.Busybox, in.CABundle = *busybox, *ca
	img, err := release.Image(*ref, in)
	if err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(*out), ".mkimage-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if err := img.WriteDockerArchive(tmp); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Chmod(tmp.Name(), 0o644); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), *out); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "wrote %s (%s): load it with docker load -i, podman load -i or ctr -n k8s.io images import\n", *out, *ref)
	return nil
}
