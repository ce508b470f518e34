// Package netwatch follows the interfaces and addresses of the agent's
// network namespace (the host's) through rtnetlink, and lists the node's
// addresses.
package netwatch

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"time"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Kind says what an Event is about.
type Kind int

const (
	// LinkChanged: an interface was created or changed (up/down, MAC, name).
	LinkChanged Kind = iota
	// LinkDeleted: an interface went away.
	LinkDeleted
	// AddrChanged: an address was added or removed somewhere.
	AddrChanged
	// Resync: events may have been lost (socket overrun, resubscribe):
	// re-read everything.
	Resync
)

func (k Kind) String() string {
	return [...]string{"link-changed", "link-deleted", "addr-changed", "resync"}[k]
}

// Event is one change. Link fields are set for link events.
type Event struct {
	Kind  Kind
	Index int
	Name  string
	MAC   net.HardwareAddr
	Up    bool // administratively up and with carrier
}

// Watch subscribes to link and address changes and sends them to out until
// ctx is done. A subscription that fails (the kernel drops messages when the
// socket overruns: ENOBUFS) is renewed and followed by a Resync event, so
// the receiver never acts on a partial picture for long.
func Watch(ctx context.Context, out chan<- Event, log *slog.Logger) {
	for ctx.Err() == nil {
		err := watchOnce(ctx, out)
		if ctx.Err() != nil {
			return
		}
		log.Warn("netlink subscription ended; resubscribing", "error", err)
		select {
		case <-ctx.Done():
			return
		case <-time.After(100 * time.Millisecond):
		}
		send(ctx, out, Event{Kind: Resync})
	}
}

func watchOnce(ctx context.Context, out chan<- Event) error {
	done := make(chan struct{})
	links := make(chan netlink.LinkUpdate, 256)
	addrs := make(chan netlink.AddrUpdate, 256)
	var linksOn, addrsOn bool
	defer func() {
		close(done)
		// The library's receivers send without watching done: one blocked
		// on a full channel would never see its socket close, and stay,
		// with its queue, for good. Drained, they end and close them.
		if linksOn {
			go func() {
				for range links {
				}
			}()
		}
		if addrsOn {
			go func() {
				for range addrs {
				}
			}()
		}
	}()
	errc := make(chan error, 2)
	onErr := func(err error) {
		select {
		case errc <- err:
		default:
		}
	}
	if err := netlink.LinkSubscribeWithOptions(links, done, netlink.LinkSubscribeOptions{ErrorCallback: onErr}); err != nil {
		return fmt.Errorf("subscribe to links: %w", err)
	}
	linksOn = true
	if err := netlink.AddrSubscribeWithOptions(addrs, done, netlink.AddrSubscribeOptions{ErrorCallback: onErr}); err != nil {
		return fmt.Errorf("subscribe to addresses: %w", err)
	}
	addrsOn = true
	for {
		select {
		case <-ctx.Done():
			return nil
		case err := <-errc:
			return err
		case u, ok := <-links:
			if !ok {
				return fmt.Errorf("link subscription closed")
			}
			a := u.Attrs()
			ev := Event{Kind: LinkChanged, Index: a.Index, Name: a.Name, MAC: a.HardwareAddr,
				Up: a.Flags&net.FlagUp != 0 && a.OperState != netlink.OperDown}
			if u.Header.Type == unix.RTM_DELLINK {
				ev.Kind = LinkDeleted
			}
			send(ctx, out, ev)
		case _, ok := <-addrs:
			if !ok {
				return fmt.Errorf("address subscription closed")
			}
			send(ctx, out, Event{Kind: AddrChanged})
		}
	}
}

func send(ctx context.Context, out chan<- Event, ev Event) {
	select {
	case out <- ev:
	case <-ctx.Done():
	}
}

// Addrs lists the addresses of the namespace's interfaces, with their prefix
// length, leaving out loopback.
func Addrs() ([]netip.Prefix, error) {
	// netlinksafe retries a dump interrupted by address churn.
	list, err := netlinksafe.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return nil, fmt.Errorf("list node addresses: %w", err)
	}
	var out []netip.Prefix
	for _, a := range list {
		ip, ok := netip.AddrFromSlice(a.IP)
		if !ok {
			continue
		}
		ip = ip.Unmap()
		if ip.IsLoopback() {
			continue
		}
		bits, _ := a.Mask.Size()
		out = append(out, netip.PrefixFrom(ip, bits))
	}
	return out, nil
}
