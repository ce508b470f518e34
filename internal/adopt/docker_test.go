package adopt

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/underpass-cni/underpass/internal/attach"
)

// fakeEngine serves the part of the Engine API the Docker source reads.
type fakeEngine struct {
	mu         sync.Mutex
	containers map[string]string // id -> name, running on network "mv" (macvlan)
	events     chan string
	srv        *http.Server
}

func (f *fakeEngine) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	path, ok := strings.CutPrefix(r.URL.Path, "/"+DockerAPI)
	if !ok {
		http.Error(w, "bad version", http.StatusBadRequest)
		return
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	switch {
	case path == "/events":
		if r.URL.Query().Get("filters") == "" {
			http.Error(w, "no filters", http.StatusBadRequest)
			return
		}
		w.WriteHeader(http.StatusOK)
		w.(http.Flusher).Flush()
		events := f.events
		f.mu.Unlock()
		defer f.mu.Lock()
		for {
			select {
			case ev := <-events:
				fmt.Fprintln(w, ev)
				w.(http.Flusher).Flush()
			case <-r.Context().Done():
				return
			}
		}
	case path == "/networks":
		fmt.Fprint(w, `[{"Id":"mvid","Driver":"macvlan"},{"Id":"brid","Driver":"bridge"}]`)
	case path == "/containers/json":
		var list []map[string]string
		for id := range f.containers {
			list = append(list, map[string]string{"Id": id})
		}
		_ = json.NewEncoder(w).Encode(list)
	case strings.HasPrefix(path, "/containers/"):
		id := strings.TrimSuffix(strings.TrimPrefix(path, "/containers/"), "/json")
		name, ok := f.containers[id]
		if !ok {
			http.Error(w, `{"message":"No such container"}`, http.StatusNotFound)
			return
		}
		fmt.Fprintf(w, `{"Name":"/%s","State":{"Running":true,"Pid":1},"NetworkSettings":{"SandboxKey":"/proc/self/ns/net",
			"Networks":{"mv":{"NetworkID":"mvid","IPAddress":"192.0.2.64","MacAddress":"02:42:c0:00:02:40"}}}}`, name)
	default:
		http.NotFound(w, r)
	}
}

func (f *fakeEngine) serve(t *testing.T, socket string) {
	t.Helper()
	ln, err := net.Listen("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	f.srv = &http.Server{Handler: f}
	go func() { _ = f.srv.Serve(ln) }()
}

func (f *fakeEngine) set(id, name string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if name == "" {
		delete(f.containers, id)
	} else {
		f.containers[id] = name
	}
}

func waitName(t *testing.T, d *Docker, s *Slave, want string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		name, ok := d.Lookup(s)
		if (want == "" && !ok) || (ok && name == want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("Lookup: %q, %v; want %q", name, ok, want)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// The source lists the running containers when it connects, follows the
// events (calling Changed), and after the engine restarts lists again.
func TestDocker(t *testing.T) {
	socket := filepath.Join(t.TempDir(), "docker.sock")
	f := &fakeEngine{containers: map[string]string{"c1": "web-1"}, events: make(chan string, 10)}
	changed := make(chan struct{}, 100)
	d := &Docker{Socket: socket, Log: slog.New(slog.DiscardHandler), Changed: func() { changed <- struct{}{} }}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); d.Run(ctx) }()
	defer func() { cancel(); <-done }()

	// The engine is not there yet: no name, retried.
	self, err := attach.NetnsID("/proc/self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	slave := &Slave{Netns: "/somewhere/else", NetnsID: self}
	time.Sleep(300 * time.Millisecond)
	if _, ok := d.Lookup(slave); ok {
		t.Fatal("a name before the engine answered")
	}
	f.serve(t, socket)
	waitName(t, d, slave, "web-1")
	if got := d.Dirs(); len(got) != 1 || got[0] != "/proc/self/ns" {
		t.Errorf("Dirs: %v", got)
	}
	byPath := &Slave{Netns: "/proc/self/ns/net"}
	if name, ok := d.Lookup(byPath); !ok || name != "web-1" {
		t.Errorf("Lookup by the sandbox path: %q %v", name, ok)
	}

	// A container connects to the macvlan network: named, Changed called.
	drain(changed)
	f.set("c1", "")
	f.set("c2", "web-2")
	f.events <- `{"Type":"container","Action":"destroy","Actor":{"ID":"c1"}}`
	f.events <- `{"Type":"network","Action":"connect","Actor":{"ID":"mvid","Attributes":{"container":"c2","type":"macvlan"}}}`
	waitName(t, d, slave, "web-2")
	select {
	case <-changed:
	case <-time.After(time.Second):
		t.Fatal("Changed not called on a connect")
	}
	// A bridge connect is none of its business.
	f.events <- `{"Type":"network","Action":"connect","Actor":{"ID":"brid","Attributes":{"container":"c9","type":"bridge"}}}`
	// Gone at its disconnect (inspect: no such container).
	f.set("c2", "")
	f.events <- `{"Type":"network","Action":"disconnect","Actor":{"ID":"mvid","Attributes":{"container":"c2","type":"macvlan"}}}`
	waitName(t, d, slave, "")

	// The engine restarts with a container running: listed again.
	f.set("c3", "web-3")
	ctxShut, cancelShut := context.WithTimeout(context.Background(), 100*time.Millisecond)
	_ = f.srv.Shutdown(ctxShut) // the events stream stays open: Close below
	cancelShut()
	_ = f.srv.Close()
	f.serve(t, socket)
	waitName(t, d, slave, "web-3")
}

func drain(ch chan struct{}) {
	for {
		select {
		case <-ch:
		default:
			return
		}
	}
}
