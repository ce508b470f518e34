package release

import (
	"archive/tar"
	"bytes"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

// The archive `make image` writes, read back as `docker load` or `ctr
// images import` would: one tag, one layer with the binaries, busybox and
// its applet links, the CA bundle and /etc/passwd, and the entrypoint.
func TestReleaseImage(t *testing.T) {
	dir := t.TempDir()
	write := func(name, data string, mode os.FileMode) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(data), mode); err != nil {
			t.Fatal(err)
		}
		return p
	}
	for _, b := range Binaries {
		write(b, "binary "+b, 0o755)
	}
	in := Inputs{BinDir: dir, Busybox: write("busybox", "busybox", 0o755), CABundle: write("ca.crt", "certs", 0o644)}
	img, err := Image("example.test/underpass:1", in)
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := img.WriteDockerArchive(&buf); err != nil {
		t.Fatal(err)
	}
	files := readTar(t, buf.Bytes())
	var manifest []struct {
		Config   string
		RepoTags []string
		Layers   []string
	}
	if err := json.Unmarshal(files["manifest.json"].data, &manifest); err != nil || len(manifest) != 1 || len(manifest[0].Layers) != 1 {
		t.Fatalf("manifest.json: %+v, %v", manifest, err)
	}
	if !slices.Equal(manifest[0].RepoTags, []string{"example.test/underpass:1"}) {
		t.Fatalf("tags %v", manifest[0].RepoTags)
	}
	var cfg struct {
		Architecture string
		Config       struct {
			Entrypoint, Cmd []string
			User            string
		}
	}
	if err := json.Unmarshal(files[manifest[0].Config].data, &cfg); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(cfg.Config.Entrypoint, Entrypoint) || !slices.Equal(cfg.Config.Cmd, Cmd) || cfg.Config.User != "0:0" || cfg.Architecture == "" {
		t.Fatalf("image config %+v", cfg)
	}
	layer := readTar(t, files[manifest[0].Layers[0]].data)
	for _, b := range Binaries {
		f, ok := layer["usr/local/bin/"+b]
		if !ok || string(f.data) != "binary "+b || f.mode&0o111 == 0 {
			t.Errorf("/usr/local/bin/%s: %+v", b, f)
		}
	}
	for _, a := range Applets {
		if f := layer["bin/"+a]; f.link != "busybox" {
			t.Errorf("/bin/%s links to %q, want busybox", a, f.link)
		}
	}
	for name, want := range map[string]string{"bin/busybox": "busybox", "etc/ssl/certs/ca-certificates.crt": "certs", "etc/passwd": "root:x:0:0:root:/root:/sbin/nologin\n"} {
		if string(layer[name].data) != want {
			t.Errorf("/%s = %q, want %q", name, layer[name].data, want)
		}
	}
	// The same inputs give the same bytes.
	var again bytes.Buffer
	if err := img.WriteDockerArchive(&again); err != nil || !bytes.Equal(again.Bytes(), buf.Bytes()) {
		t.Errorf("a second write differs (%v)", err)
	}
}

type entry struct {
	data []byte
	link string
	mode int64
}

func readTar(t *testing.T, b []byte) map[string]entry {
	t.Helper()
	out := map[string]entry{}
	tr := tar.NewReader(bytes.NewReader(b))
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		data, _ := io.ReadAll(tr)
		out[h.Name] = entry{data: data, link: h.Linkname, mode: h.Mode}
	}
}
