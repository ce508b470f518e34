package cni

import (
	"errors"
	"fmt"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/ipam"
)

// The delegated IPAM plugin is another process starting: the largest part
// of ADD and DEL. For IPAM types that never look at the interface it runs
// while the plugin does its own work (ADD: creating the slave; DEL:
// deleting it and the registration), which keeps underpass as fast as the
// reference macvlan plugin. Anything else (dhcp talks through the
// interface, unknown plugins might) runs in the reference plugins' order:
// its ADD once the slave exists, its DEL (and a failed ADD's release)
// before the slave goes.
var overlapIPAM = map[string]bool{"host-local": true, "static": true, "whereabouts": true}

// background runs fn once, on another goroutine, from the first start or
// wait.
type background struct {
	fn   func() error
	done chan struct{}
	err  error
}

func (b *background) start() {
	if b.done != nil {
		return
	}
	b.done = make(chan struct{})
	go func() {
		defer close(b.done)
		b.err = b.fn()
	}()
}

func (b *background) started() bool { return b.done != nil }

func (b *background) wait() error {
	b.start()
	<-b.done
	return b.err
}

// ipamCall is the IPAM ADD of one plugin ADD.
type ipamCall struct {
	typ      string
	stdin    []byte
	res      types.Result
	add      background
	released bool // joinRelease ran
}

func newIPAMCall(typ string, stdin []byte) *ipamCall {
	c := &ipamCall{typ: typ, stdin: stdin}
	c.add.fn = func() (err error) {
		c.res, err = ipam.ExecAdd(typ, stdin)
		return err
	}
	return c
}

// start runs the ADD in the background.
func (c *ipamCall) start() { c.add.start() }

// result waits for the ADD (starting it if it was not) and converts what
// it returned.
func (c *ipamCall) result() (*current.Result, error) {
	if err := c.add.wait(); err != nil {
		return nil, fmt.Errorf("ipam %s: %w", c.typ, err)
	}
	r, err := current.NewResultFromResult(c.res)
	if err != nil {
		return nil, fmt.Errorf("ipam %s result: %w", c.typ, err)
	}
	if len(r.IPs) == 0 {
		return nil, fmt.Errorf("ipam %s returned no address: check its ranges", c.typ)
	}
	return r, nil
}

// joinRelease undoes a started ADD (once), for a failed plugin ADD: it waits for
// the IPAM plugin and tells it to release the address, also when its ADD
// failed: a failed ADD may still have allocated (skel checks the netns
// after the verb has run), and IPAM DEL of nothing is a no-op. A failed
// release joins err.
func (c *ipamCall) joinRelease(err error) error {
	if !c.add.started() || c.released {
		return err
	}
	c.released = true
	_ = c.add.wait() // its error, if any, is already in err or beside the point
	if derr := ipam.ExecDel(c.typ, c.stdin); derr != nil {
		return errors.Join(err, fmt.Errorf("roll back: release the address (ipam %s): %w", c.typ, derr))
	}
	return err
}

// newIPAMDel is the IPAM DEL of one plugin DEL.
func newIPAMDel(typ string, stdin []byte) *background {
	return &background{fn: func() error {
		if err := ipam.ExecDel(typ, stdin); err != nil {
			return fmt.Errorf("ipam %s: %w", typ, err)
		}
		return nil
	}}
}
