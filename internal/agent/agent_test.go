package agent

import (
	"context"
	"errors"
	"slices"
	"testing"

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
