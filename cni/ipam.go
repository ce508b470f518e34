package cni

import (
	"errors"
	"fmt"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/ipam"
)

// ipamCall is the delegated IPAM ADD of one plugin call. For IPAM plugins
// that never look at the interface it runs while ADD creates the slave and
// loads the endpoint programs: it is mostly another process starting, the
// largest part of ADD, and hiding the rest behind it keeps underpass's ADD
// as fast as the reference macvlan plugin's.
type ipamCall struct {
	typ   string
	stdin []byte
	done  chan struct{}
	res   types.Result
	err   error
}

// overlapIPAM are the IPAM types known to need nothing of the interface.
// Anything else (dhcp talks through the interface, unknown plugins might)
// runs once the slave exists, as in the reference plugins.
var overlapIPAM = map[string]bool{"host-local": true, "static": true, "whereabouts": true}

func newIPAMCall(typ string, stdin []byte) *ipamCall {
	return &ipamCall{typ: typ, stdin: stdin}
}

// start runs the IPAM ADD on another goroutine; a second start is a no-op.
func (c *ipamCall) start() {
	if c.done != nil {
		return
	}
	c.done = make(chan struct{})
	go func() {
		defer close(c.done)
		c.res, c.err = ipam.ExecAdd(c.typ, c.stdin)
	}()
}

// result waits for the ADD (starting it if it was not) and converts what
// it returned.
func (c *ipamCall) result() (*current.Result, error) {
	c.start()
	<-c.done
	if c.err != nil {
		return nil, fmt.Errorf("ipam %s: %w", c.typ, c.err)
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

// release undoes a started ADD, for a failed plugin ADD: it waits for the
// IPAM plugin and, unless its ADD failed, tells it to release the address.
func (c *ipamCall) release() error {
	if c.done == nil {
		return nil
	}
	<-c.done
	if c.err != nil {
		return nil
	}
	if err := ipam.ExecDel(c.typ, c.stdin); err != nil {
		return fmt.Errorf("roll back: release the address (ipam %s): %w", c.typ, err)
	}
	return nil
}

// joinRelease adds a failed release to err.
func (c *ipamCall) joinRelease(err error) error {
	if rerr := c.release(); rerr != nil {
		return errors.Join(err, rerr)
	}
	return err
}
