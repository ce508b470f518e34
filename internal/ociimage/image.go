// Package ociimage writes one-layer container images as docker-archive
// tarballs (what `docker save` writes, and `docker load`, `podman load` and
// `ctr images import` read) from files on this machine, without a daemon
// or a registry: `make image` builds the release image with it, and the
// real-node tests their images.
package ociimage

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path"
	"runtime"
	"sort"
	"strings"
	"time"
)

// Image is a one-layer image built from files on this machine.
type Image struct {
	Ref        string            // e.g. registry.k8s.io/pause:3.10
	Files      map[string]string // path in the image -> file on the host (copied, mode kept)
	Data       map[string]string // path in the image -> contents (mode 0644)
	Links      map[string]string // path in the image -> symlink target
	Entrypoint []string
	Cmd        []string
	Labels     map[string]string
	User       string
}

// WriteDockerArchive writes img as a docker-archive tarball (what `docker
// save` writes and `ctr images import` reads) to w.
func (img Image) WriteDockerArchive(w io.Writer) error {
	layer, err := img.layer()
	if err != nil {
		return err
	}
	sum := sha256.Sum256(layer)
	diffID := "sha256:" + hex.EncodeToString(sum[:])
	cfg, err := json.Marshal(map[string]any{
		"architecture": runtime.GOARCH, // the binaries are this machine's
		"os":           "linux",
		"created":      time.Unix(0, 0).UTC().Format(time.RFC3339),
		"config": map[string]any{
			"Entrypoint": img.Entrypoint,
			"Cmd":        img.Cmd,
			"Env":        []string{"PATH=/usr/local/bin:/bin:/usr/bin:/sbin:/usr/sbin"},
			"Labels":     img.Labels,
			"User":       img.User,
		},
		"rootfs": map[string]any{"type": "layers", "diff_ids": []string{diffID}},
	})
	if err != nil {
		return err
	}
	cfgSum := sha256.Sum256(cfg)
	cfgName := hex.EncodeToString(cfgSum[:]) + ".json"
	layerName := hex.EncodeToString(sum[:]) + "/layer.tar"
	manifest, err := json.Marshal([]map[string]any{{"Config": cfgName, "RepoTags": []string{img.Ref}, "Layers": []string{layerName}}})
	if err != nil {
		return err
	}
	tw := tar.NewWriter(w)
	for _, f := range []struct {
		name string
		data []byte
	}{{cfgName, cfg}, {layerName, layer}, {"manifest.json", manifest}} {
		if err := writeFile(tw, f.name, 0o644, f.data); err != nil {
			return err
		}
	}
	return tw.Close()
}

// layer is the image's filesystem as a tar, with every parent directory,
// in a fixed order (the same inputs give the same bytes).
func (img Image) layer() ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	dirs := map[string]bool{}
	var paths []string
	for _, m := range []map[string]string{img.Files, img.Data, img.Links} {
		for p := range m {
			paths = append(paths, p)
		}
	}
	sort.Strings(paths)
	for _, p := range paths {
		for d := path.Dir(path.Clean("/" + p)); d != "/"; d = path.Dir(d) {
			dirs[d[1:]] = true
		}
	}
	dirList := make([]string, 0, len(dirs))
	for d := range dirs {
		dirList = append(dirList, d)
	}
	sort.Strings(dirList)
	for _, d := range dirList {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d + "/", Mode: 0o755, ModTime: time.Unix(0, 0)}); err != nil {
			return nil, err
		}
	}
	for _, p := range paths {
		name := strings.TrimPrefix(path.Clean("/"+p), "/")
		switch {
		case img.Links[p] != "":
			if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeSymlink, Name: name, Linkname: img.Links[p], Mode: 0o777, ModTime: time.Unix(0, 0)}); err != nil {
				return nil, err
			}
		case img.Files[p] != "":
			src := img.Files[p]
			data, err := os.ReadFile(src)
			if err != nil {
				return nil, fmt.Errorf("image %s: %w", img.Ref, err)
			}
			fi, err := os.Stat(src)
			if err != nil {
				return nil, err
			}
			if err := writeFile(tw, name, int64(fi.Mode().Perm()), data); err != nil {
				return nil, err
			}
		default:
			if err := writeFile(tw, name, 0o644, []byte(img.Data[p])); err != nil {
				return nil, err
			}
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

func writeFile(tw *tar.Writer, name string, mode int64, data []byte) error {
	if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: mode, Size: int64(len(data)), ModTime: time.Unix(0, 0)}); err != nil {
		return err
	}
	_, err := tw.Write(data)
	return err
}
