package adopt

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/underpass-cni/underpass/internal/attach"
)

// DockerAPI is the Engine API version the Docker source speaks: Docker
// 20.10 (Debian bookworm's docker.io) and every later engine serve it, and
// pinning it keeps a newer engine's answers in the shape parsed here.
const DockerAPI = "v1.41"

// Docker follows a Docker engine so that the slaves Docker makes on
// macvlan and ipvlan networks are adopted at once and named after their
// container: it lists the running containers when it (re)connects and then
// watches the engine's events; a container that joins or leaves such a
// network (connect, start, disconnect, destroy; rename too) makes it call
// Changed, so that the caller scans without waiting for its next tick. It
// never registers anything itself: the scan finds the slaves, Lookup names
// them. Container events are followed as well as network ones: at a
// connect the container is not running yet, at its start it is.
//
// A socket that goes away (the engine restarts) is dialed again with
// backoff; the names it knew are kept until the re-list replaces them.
// It speaks plain HTTP over the unix socket (Engine API DockerAPI).
type Docker struct {
	// Socket is the engine's unix socket.
	Socket string
	// Quiet: a missing socket is not worth a warning (adopt.docker: auto
	// on a host without Docker).
	Quiet bool
	Log   *slog.Logger
	// Changed is called (from Run's goroutine) when the containers on
	// macvlan/ipvlan networks changed; it must not block.
	Changed func()

	mu         sync.Mutex
	containers map[string]dockerContainer // running, on a macvlan/ipvlan network, by id
	drivers    map[string]string          // network driver by network id
	client     *http.Client
}

type dockerContainer struct {
	name       string // without Docker's leading '/'
	sandboxKey string // the netns pin: <exec-root>/netns/<sandbox>
	netnsID    string // the namespace's device and inode, as Slave.NetnsID
	pid        int
}

// adoptableDriver says Docker's network driver makes slaves a scan adopts.
func adoptableDriver(d string) bool { return d == "macvlan" || d == "ipvlan" }

// Lookup is the name of the container whose namespace s is in.
func (d *Docker) Lookup(s *Slave) (string, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	pid := procPid(s.Netns)
	for _, c := range d.containers {
		if (c.netnsID != "" && c.netnsID == s.NetnsID) || (c.sandboxKey != "" && c.sandboxKey == s.Netns) || (pid > 0 && c.pid == pid) {
			return c.name, true
		}
	}
	return "", false
}

// Dirs are the directories the engine pins its containers' namespaces in
// (its exec-root's netns/), as far as it has told: a scan should read them.
func (d *Docker) Dirs() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []string
	for _, c := range d.containers {
		if c.sandboxKey == "" {
			continue
		}
		if dir := filepath.Dir(c.sandboxKey); !slices.Contains(out, dir) {
			out = append(out, dir)
		}
	}
	slices.Sort(out)
	return out
}

// procPid is the pid in /proc/<pid>/ns/net, or 0.
func procPid(path string) int {
	rest, ok := strings.CutPrefix(path, "/proc/")
	if !ok {
		return 0
	}
	pid, ok := strings.CutSuffix(rest, "/ns/net")
	if !ok {
		return 0
	}
	n, _ := strconv.Atoi(pid)
	return n
}

// Run follows the engine until ctx is done.
func (d *Docker) Run(ctx context.Context) {
	if d.Log == nil {
		d.Log = slog.Default()
	}
	d.client = &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var dl net.Dialer
			return dl.DialContext(ctx, "unix", d.Socket)
		},
		DisableCompression: true,
	}}
	defer d.client.CloseIdleConnections()
	d.mu.Lock()
	d.containers, d.drivers = map[string]dockerContainer{}, map[string]string{}
	d.mu.Unlock()
	const minBackoff, maxBackoff = 250 * time.Millisecond, 5 * time.Second
	backoff := minBackoff
	down := false // logged as unreachable, not yet reconnected
	for {
		connected, err := d.session(ctx, func() {
			if down {
				d.Log.Info("docker: engine reachable again", "socket", d.Socket)
			} else {
				d.Log.Info("docker: following the engine", "socket", d.Socket)
			}
			down = false
			backoff = minBackoff
		})
		if ctx.Err() != nil {
			return
		}
		if !down && (connected || !(d.Quiet && errors.Is(err, os.ErrNotExist))) {
			d.Log.Warn("docker: engine unreachable; retrying with backoff, names of containers already known are kept",
				"socket", d.Socket, "error", err)
			down = true
		} else {
			d.Log.Debug("docker: engine unreachable", "socket", d.Socket, "error", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, maxBackoff)
	}
}

// dockerEvent is the part of an engine event read here.
type dockerEvent struct {
	Type   string
	Action string
	Actor  struct {
		ID         string
		Attributes map[string]string
	}
}

// session subscribes to the events, lists the running containers and
// follows the events until the stream ends. connected says the engine
// answered.
func (d *Docker) session(ctx context.Context, up func()) (connected bool, err error) {
	if _, err := os.Stat(d.Socket); err != nil {
		return false, err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// Subscribed before the list, so that no change falls in between.
	filters := `{"type":["network","container"]}`
	req, err := http.NewRequestWithContext(ctx, http.MethodGet,
		"http://docker/"+DockerAPI+"/events?filters="+url.QueryEscape(filters), nil)
	if err != nil {
		return false, err
	}
	resp, err := d.client.Do(req)
	if err != nil {
		return false, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return true, fmt.Errorf("events: %s: %s", resp.Status, strings.TrimSpace(string(b)))
	}
	if err := d.relist(ctx); err != nil {
		return true, err
	}
	up()
	d.changed()
	dec := json.NewDecoder(resp.Body)
	for {
		var ev dockerEvent
		if err := dec.Decode(&ev); err != nil {
			return true, fmt.Errorf("events: %w", err)
		}
		d.event(ctx, ev)
	}
}

func (d *Docker) changed() {
	if d.Changed != nil {
		d.Changed()
	}
}

// event updates the containers on one engine event.
func (d *Docker) event(ctx context.Context, ev dockerEvent) {
	var id string
	switch {
	case ev.Type == "network" && (ev.Action == "connect" || ev.Action == "disconnect"):
		driver := ev.Actor.Attributes["type"]
		d.mu.Lock()
		d.drivers[ev.Actor.ID] = driver
		d.mu.Unlock()
		if !adoptableDriver(driver) {
			return
		}
		id = ev.Actor.Attributes["container"]
	case ev.Type == "network" && ev.Action == "destroy":
		d.mu.Lock()
		delete(d.drivers, ev.Actor.ID)
		d.mu.Unlock()
		return
	case ev.Type == "container" && (ev.Action == "start" || ev.Action == "rename"):
		id = ev.Actor.ID
	case ev.Type == "container" && ev.Action == "destroy":
		// Not at die: its slave is still there until the disconnect that
		// follows, and keeps its name until then.
		d.mu.Lock()
		_, known := d.containers[ev.Actor.ID]
		delete(d.containers, ev.Actor.ID)
		d.mu.Unlock()
		if known {
			d.changed()
		}
		return
	default:
		return
	}
	if id == "" {
		return
	}
	c, keep, err := d.inspect(ctx, id)
	if err != nil {
		d.Log.Debug("docker: inspect", "container", id, "error", err)
		return
	}
	d.mu.Lock()
	_, known := d.containers[id]
	if keep {
		d.containers[id] = c
	} else {
		delete(d.containers, id)
	}
	d.mu.Unlock()
	if keep || known {
		d.Log.Debug("docker: container", "event", ev.Type+" "+ev.Action, "name", c.name, "id", id, "netns", c.sandboxKey, "adoptable", keep)
		d.changed()
	}
}

// relist replaces what is known with the running containers.
func (d *Docker) relist(ctx context.Context) error {
	var nets []struct{ ID, Driver string }
	if err := d.get(ctx, "/networks", &nets); err != nil {
		return err
	}
	drivers := map[string]string{}
	for _, n := range nets {
		drivers[n.ID] = n.Driver
	}
	d.mu.Lock()
	d.drivers = drivers
	d.mu.Unlock()
	var list []struct{ ID string }
	if err := d.get(ctx, "/containers/json", &list); err != nil {
		return err
	}
	containers := map[string]dockerContainer{}
	for _, l := range list {
		c, keep, err := d.inspect(ctx, l.ID)
		if err != nil {
			d.Log.Debug("docker: inspect", "container", l.ID, "error", err)
			continue
		}
		if keep {
			containers[l.ID] = c
		}
	}
	d.mu.Lock()
	d.containers = containers
	d.mu.Unlock()
	d.Log.Debug("docker: listed", "running", len(list), "on macvlan/ipvlan", len(containers))
	return nil
}

// containerJSON is the part of /containers/<id>/json read here.
type containerJSON struct {
	Name  string
	State struct {
		Running bool
		Pid     int
	}
	NetworkSettings struct {
		SandboxKey string
		Networks   map[string]struct {
			NetworkID  string
			IPAddress  string
			MacAddress string
		}
	}
}

// inspect reads container id; keep says it runs on a macvlan or ipvlan
// network.
func (d *Docker) inspect(ctx context.Context, id string) (c dockerContainer, keep bool, err error) {
	var j containerJSON
	if err := d.get(ctx, "/containers/"+url.PathEscape(id)+"/json", &j); err != nil {
		var nf *notFoundError
		if errors.As(err, &nf) {
			return c, false, nil // removed since
		}
		return c, false, err
	}
	c = dockerContainer{name: strings.TrimPrefix(j.Name, "/"), sandboxKey: j.NetworkSettings.SandboxKey, pid: j.State.Pid}
	if !j.State.Running {
		return c, false, nil
	}
	for _, n := range j.NetworkSettings.Networks {
		d.mu.Lock()
		driver, ok := d.drivers[n.NetworkID]
		d.mu.Unlock()
		if !ok && n.NetworkID != "" {
			var net struct{ Driver string }
			if err := d.get(ctx, "/networks/"+url.PathEscape(n.NetworkID), &net); err == nil {
				driver = net.Driver
				d.mu.Lock()
				d.drivers[n.NetworkID] = driver
				d.mu.Unlock()
			}
		}
		if adoptableDriver(driver) {
			keep = true
		}
	}
	if c.sandboxKey != "" {
		c.netnsID, _ = attach.NetnsID(c.sandboxKey)
	}
	if c.netnsID == "" && c.pid > 0 {
		c.netnsID, _ = attach.NetnsID(filepath.Join("/proc", strconv.Itoa(c.pid), "ns", "net"))
	}
	return c, keep, nil
}

type notFoundError struct{ path string }

func (e *notFoundError) Error() string { return e.path + ": not found" }

// get decodes the engine's answer to GET path into v.
func (d *Docker) get(ctx context.Context, path string, v any) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://docker/"+DockerAPI+path, nil)
	if err != nil {
		return err
	}
	resp, err := d.client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	switch resp.StatusCode {
	case http.StatusOK:
	case http.StatusNotFound:
		return &notFoundError{path}
	default:
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return fmt.Errorf("GET %s: %s: %s", path, resp.Status, strings.TrimSpace(string(b)))
	}
	if err := json.NewDecoder(resp.Body).Decode(v); err != nil {
		return fmt.Errorf("GET %s: %w", path, err)
	}
	return nil
}
