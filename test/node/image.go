// Package node runs a real single-node Kubernetes on this machine for the
// tests: kube-apiserver and etcd (test/k8s/kapi), containerd and runc from
// Debian, the kubelet and kube-proxy built at the same Kubernetes version
// (test/k8s/build.sh), and images built here, without a registry.
package node

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
	"time"
)

// Image is a one-layer image built from files on this machine.
type Image struct {
	Ref        string            // e.g. registry.k8s.io/pause:3.10
	Files      map[string]string // path in the image -> file on the host (copied, mode kept)
	Entrypoint []string
	Cmd        []string
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
			"Env":        []string{"PATH=/bin:/usr/bin:/sbin:/usr/sbin"},
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

// layer is the image's filesystem as a tar, with every parent directory.
func (img Image) layer() ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	dirs := map[string]bool{}
	paths := make([]string, 0, len(img.Files))
	for p := range img.Files {
		paths = append(paths, p)
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
		src := img.Files[p]
		data, err := os.ReadFile(src)
		if err != nil {
			return nil, fmt.Errorf("image %s: %w", img.Ref, err)
		}
		fi, err := os.Stat(src)
		if err != nil {
			return nil, err
		}
		if err := writeFile(tw, path.Clean(p), int64(fi.Mode().Perm()), data); err != nil {
			return nil, err
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
