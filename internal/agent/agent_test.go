package agent

import (
	"context"
	"errors"
	"net"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/underpass-cni/underpass/internal/config"
)

func TestChangedKeys(t *testing.T) {
	old, err := config.Parse([]byte("hostReachability: true\nstaleServices: {cidrs: [10.96.0.0/16]}\n"))
	if err != nil {
		t.Fatal(err)
	}
	c, err := config.Parse([]byte("hostReachability: false\nstaleServices: {cidrs: [10.96.0.0/16], action: reject}\nuplinks: [eth1]\n"))
	if err != nil {
		t.Fatal(err)
	}
	if got := changedKeys(old, c); !slices.Equal(got, []string{"hostReachability", "staleServices", "uplinks"}) {
		t.Fatalf("changed %v", got)
	}
	if got := changedKeys(c, c); len(got) != 0 {
		t.Fatalf("no change reported as %v", got)
	}
	// services.mode and adopt.parents are changes too (a mode switch was
	// logged as changed=[]).
	d, err := config.Parse([]byte("hostReachability: false\nstaleServices: {cidrs: [10.96.0.0/16], action: reject}\nuplinks: [eth1]\nservices: {mode: ebpf, kubernetes: \"true\"}\nadopt: {parents: [eth0]}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if got := changedKeys(c, d); !slices.Equal(got, []string{"services", "adopt"}) {
		t.Fatalf("changed %v, want [services adopt]", got)
	}
}

func TestSendLatest(t *testing.T) {
	ch := make(chan int, 1)
	ctx := context.Background()
	sendLatest(ctx, ch, 1)
	sendLatest(ctx, ch, 2) // replaces the unread 1
	if v := <-ch; v != 2 {
		t.Fatalf("got %d, want the latest", v)
	}
}

func TestOneLine(t *testing.T) {
	err := errors.Join(errors.New("a: x"), errors.New("b: y"))
	if got := oneLine(err); got != "a: x; b: y" {
		t.Fatalf("%q", got)
	}
}

func TestNotifyReady(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", "")
	if err := notifyReady(); err != nil {
		t.Fatalf("with no NOTIFY_SOCKET: %v", err)
	}
	path := filepath.Join(t.TempDir(), "notify")
	l, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	t.Setenv("NOTIFY_SOCKET", path)
	if err := notifyReady(); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64)
	if err := l.SetReadDeadline(time.Now().Add(5 * time.Second)); err != nil {
		t.Fatal(err)
	}
	n, err := l.Read(buf)
	if err != nil || string(buf[:n]) != "READY=1" {
		t.Fatalf("systemd got %q (%v), want READY=1", buf[:n], err)
	}
}
