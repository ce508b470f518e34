package vm

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"path"
	"sort"
	"strings"
)

// cpioWriter writes a "newc" (SVR4, no CRC) cpio archive, the format the
// kernel's initramfs unpacker reads. Archives may be concatenated: the kernel
// unpacks each in turn, later entries overwriting earlier ones.
type cpioWriter struct {
	w    *bufio.Writer
	n    int64  // bytes written, for padding
	ino  uint32 // next inode number
	dirs map[string]bool
	err  error
}

// newCPIOWriter starts an archive. firstIno keeps inode numbers of archives
// that are concatenated apart (only nlink > 1 entries would care, but be tidy).
func newCPIOWriter(w io.Writer, firstIno uint32) *cpioWriter {
	return &cpioWriter{w: bufio.NewWriterSize(w, 1<<20), ino: firstIno, dirs: map[string]bool{"": true, ".": true, "/": true}}
}

const (
	modeDir  = 0o040000
	modeFile = 0o100000
	modeLink = 0o120000
	modeChr  = 0o020000
)

func (c *cpioWriter) write(p []byte) {
	if c.err != nil {
		return
	}
	n, err := c.w.Write(p)
	c.n += int64(n)
	c.err = err
}

func (c *cpioWriter) pad() {
	if r := c.n % 4; r != 0 {
		c.write(make([]byte, 4-r))
	}
}

func (c *cpioWriter) header(name string, mode uint32, size int64, rdevMajor, rdevMinor uint32) {
	name = strings.TrimPrefix(path.Clean("/"+name), "/")
	if name == "" {
		name = "."
	}
	nlink := uint32(1)
	if mode&0o170000 == modeDir {
		nlink = 2
	}
	c.ino++
	hdr := fmt.Sprintf("070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		c.ino, mode, 0, 0, nlink, 0, uint32(size), 0, 0, rdevMajor, rdevMinor, len(name)+1, 0)
	c.write([]byte(hdr))
	c.write([]byte(name))
	c.write([]byte{0})
	c.pad()
}

// Dir adds a directory and its missing parents.
func (c *cpioWriter) Dir(name string, perm uint32) {
	name = strings.TrimPrefix(path.Clean("/"+name), "/")
	if c.dirs[name] {
		return
	}
	c.Dir(path.Dir(name), 0o755)
	c.dirs[name] = true
	c.header(name, modeDir|perm, 0, 0, 0)
}

func (c *cpioWriter) parent(name string) {
	c.Dir(path.Dir(strings.TrimPrefix(path.Clean("/"+name), "/")), 0o755)
}

// Bytes adds a regular file with the given content.
func (c *cpioWriter) Bytes(name string, perm uint32, data []byte) {
	c.parent(name)
	c.header(name, modeFile|perm, int64(len(data)), 0, 0)
	c.write(data)
	c.pad()
}

// File adds a regular file copied from the host. perm 0 keeps the host mode.
func (c *cpioWriter) File(name, src string, perm uint32) {
	if c.err != nil {
		return
	}
	f, err := os.Open(src)
	if err != nil {
		c.err = err
		return
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		c.err = err
		return
	}
	if st.Size() > 0xffffffff {
		c.err = fmt.Errorf("%s: too large for cpio", src)
		return
	}
	if perm == 0 {
		perm = uint32(st.Mode().Perm())
	}
	c.parent(name)
	c.header(name, modeFile|perm, st.Size(), 0, 0)
	if c.err != nil {
		return
	}
	n, err := io.Copy(c.w, f)
	c.n += n
	if err != nil {
		c.err = err
		return
	}
	if n != st.Size() {
		c.err = fmt.Errorf("%s: changed while reading", src)
		return
	}
	c.pad()
}

// Tree adds the regular files, directories and symlinks under src at dst.
func (c *cpioWriter) Tree(dst, src string) {
	var names []string
	var walk func(rel string)
	walk = func(rel string) {
		ents, err := os.ReadDir(path.Join(src, rel))
		if err != nil {
			if c.err == nil {
				c.err = err
			}
			return
		}
		for _, e := range ents {
			r := path.Join(rel, e.Name())
			names = append(names, r)
			if e.IsDir() {
				walk(r)
			}
		}
	}
	walk("")
	sort.Strings(names)
	c.Dir(dst, 0o755)
	for _, r := range names {
		p := path.Join(src, r)
		st, err := os.Lstat(p)
		if err != nil {
			c.err = err
			return
		}
		switch {
		case st.IsDir():
			c.Dir(path.Join(dst, r), uint32(st.Mode().Perm()))
		case st.Mode()&os.ModeSymlink != 0:
			target, err := os.Readlink(p)
			if err != nil {
				c.err = err
				return
			}
			c.Symlink(path.Join(dst, r), target)
		case st.Mode().IsRegular():
			c.File(path.Join(dst, r), p, 0)
		}
	}
}

// Symlink adds a symbolic link.
func (c *cpioWriter) Symlink(name, target string) {
	c.parent(name)
	c.header(name, modeLink|0o777, int64(len(target)), 0, 0)
	c.write([]byte(target))
	c.pad()
}

// CharDev adds a character device node (no root needed to write it).
func (c *cpioWriter) CharDev(name string, perm, major, minor uint32) {
	c.parent(name)
	c.header(name, modeChr|perm, 0, major, minor)
}

// Close writes the trailer and flushes. It does not close the underlying writer.
func (c *cpioWriter) Close() error {
	c.header("TRAILER!!!", 0, 0, 0, 0)
	// Pad to 512 bytes like GNU cpio, so a concatenated archive starts aligned.
	if r := c.n % 512; r != 0 {
		c.write(make([]byte, 512-r))
	}
	if c.err != nil {
		return c.err
	}
	return c.w.Flush()
}
