// Package loader loads the underpass datapath into the kernel and pins it
// in a bpffs, or opens what is pinned; it holds the writer lock and the map
// layouts. Putting the programs on interfaces is internal/attach's job:
// EgressTarget, XDPTarget and EndpointTarget fill its options from the
// Objects.
package loader

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/underpass-cni/underpass/internal/attach"
)

// ErrNotLoaded means there is no pinned datapath: underpassd has not run.
var ErrNotLoaded = errors.New("datapath not loaded")

// Maps are the pinned maps: the bpf2go-generated struct, whose ebpf tags
// are the map names (the C names, and the pin names). Who writes which is
// in docs/architecture.md ("Who owns what"): in short, the agent writes
// config, the CIDR sets, prefilter, live_svcs and ep_progs; the endpoint
// registry (ep_names, endpoints, ep_by_mac, ep_by_ip, ep_stats) is written
// by the plugin (ADD, DEL, GC) and by the agent (its GC, a re-created
// parent), always under Lock, through internal/datapath; parents by both
// (the plugin registers a parent its pod needs while the agent restarts);
// the programs write the counters, learnt addresses (ep_by_ip,
// endpoints.learned), wire_addrs, svc_flows and events.
type Maps = bpfMaps

// Programs are the programs shared by all attachments, as bpf2go generated
// them. EndpointIngress and EndpointEgress are what every endpoint's
// filters run; they tail-call the bodies (EpIngressBody, EpEgressBody)
// through ep_progs.
type Programs = bpfPrograms

// Objects are a loaded (or opened) datapath: its maps and programs, pinned
// in Dir. ("The datapath" is the whole: these objects, the typed API over
// them in internal/datapath, and the attachments internal/attach makes.)
type Objects struct {
	Dir      string
	Maps     Maps
	Programs Programs
}

// Options tune Load; the zero value is what underpassd uses.
type Options struct {
	// Trace records every redirect decision in the trace map (tests).
	Trace bool
	// Spec replaces the embedded program build (tests of upgrades).
	Spec *ebpf.CollectionSpec
}

const (
	progDir = "progs"
	linkDir = attach.LinkDir
)

// parsedSpec parses the embedded ELF once per process. Only Load needs it:
// the CNI plugin and underpassctl never parse it (Open checks the pins
// against mapABI).
var parsedSpec = sync.OnceValues(loadBpf)

// Spec returns a copy of the embedded collection spec, free to modify.
func Spec() (*ebpf.CollectionSpec, error) {
	spec, err := parsedSpec()
	if err != nil {
		return nil, fmt.Errorf("parse embedded datapath: %w", err)
	}
	return spec.Copy(), nil
}

// Load loads the programs, adopting maps already pinned in dir so that
// state survives restarts and upgrades, pins whatever is new, and replaces
// the pinned programs. A first load pins into a temporary directory that is
// renamed into place, so nobody ever sees half a datapath.
func Load(dir string, opts Options) (_ *Objects, err error) {
	if err := EnsureBPFFS(dir); err != nil {
		return nil, err
	}
	spec, err := loadSpec(opts)
	if err != nil {
		return nil, err
	}
	replacements, err := pinnedMaps(dir, spec)
	defer func() {
		for _, m := range replacements {
			m.Close()
		}
	}()
	if err != nil {
		return nil, err
	}

	coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{MapReplacements: replacements})
	if err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			return nil, fmt.Errorf("load datapath: %+v", ve)
		}
		return nil, fmt.Errorf("load datapath: %w", err)
	}
	defer coll.Close()

	// Assign takes the objects out of coll: from here dp closes them.
	dp := &Objects{Dir: dir}
	defer func() {
		if err != nil {
			dp.Close()
		}
	}()
	if err := coll.Assign(&dp.Maps); err != nil {
		return nil, fmt.Errorf("load datapath: %w", err)
	}
	if err := coll.Assign(&dp.Programs); err != nil {
		return nil, fmt.Errorf("load datapath: %w", err)
	}
	// Into an adopted ep_progs this is the upgrade of every endpoint at
	// once: their filters reach the new bodies from the next packet on.
	if err := dp.RestoreEndpointPrograms(); err != nil {
		return nil, err
	}

	if _, statErr := os.Stat(dir); errors.Is(statErr, fs.ErrNotExist) {
		if err := dp.pinFresh(dir); err != nil {
			return nil, err
		}
		return dp, nil
	}
	if err := dp.pinInto(dir, replacements); err != nil {
		return nil, err
	}
	return dp, nil
}

// loadSpec is the collection spec to load: the embedded one or opts.Spec,
// with tracing switched on when asked.
func loadSpec(opts Options) (*ebpf.CollectionSpec, error) {
	spec := opts.Spec
	if spec == nil {
		var err error
		if spec, err = Spec(); err != nil {
			return nil, err
		}
	} else {
		spec = spec.Copy()
	}
	if opts.Trace {
		if err := spec.Variables["trace_redirects"].Set(uint8(1)); err != nil {
			return nil, fmt.Errorf("enable trace: %w", err)
		}
	}
	return spec, nil
}

// pinnedMaps opens the maps pinned in dir that spec has, to be adopted
// (state survives restarts and upgrades); one whose layout does not fit
// this build is an error. The caller closes what it returns, also on error.
func pinnedMaps(dir string, spec *ebpf.CollectionSpec) (map[string]*ebpf.Map, error) {
	out := map[string]*ebpf.Map{}
	for name, ms := range spec.Maps {
		if strings.HasPrefix(name, ".") {
			continue
		}
		m, err := ebpf.LoadPinnedMap(filepath.Join(dir, name), nil)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return out, fmt.Errorf("open pinned map %s: %w", name, err)
		}
		if err := ms.Compatible(m); err != nil {
			m.Close()
			return out, fmt.Errorf("pinned map %s does not fit this build (%w): remove it with underpassd --uninstall, or restore the previous version", name, err)
		}
		out[name] = m
	}
	return out, nil
}

// pinFresh pins everything into a sibling temp dir and renames it to dir.
func (dp *Objects) pinFresh(dir string) error {
	if err := os.MkdirAll(filepath.Dir(dir), 0o700); err != nil {
		return fmt.Errorf("create %s: %w", filepath.Dir(dir), err)
	}
	// bpffs refuses names with a dot, so temp names use underscores.
	tmp, err := os.MkdirTemp(filepath.Dir(dir), filepath.Base(dir)+"_loading_")
	if err != nil {
		return fmt.Errorf("create temp pin dir: %w", err)
	}
	defer os.RemoveAll(tmp) // a no-op after the rename
	if err := dp.pinInto(tmp, nil); err != nil {
		return err
	}
	if err := os.Rename(tmp, dir); err != nil {
		if errors.Is(err, fs.ErrExist) || errors.Is(err, unix.ENOTEMPTY) {
			return fmt.Errorf("pin datapath: %s appeared while loading: another underpassd is starting", dir)
		}
		return fmt.Errorf("pin datapath: rename %s to %s: %w", tmp, dir, err)
	}
	dp.Dir = dir
	return nil
}

// pinInto pins maps not pinned yet (adopted ones stay as they are) and
// replaces the program pins atomically.
func (dp *Objects) pinInto(dir string, adopted map[string]*ebpf.Map) error {
	if err := os.MkdirAll(filepath.Join(dir, progDir), 0o700); err != nil {
		return fmt.Errorf("create %s: %w", progDir, err)
	}
	if err := os.MkdirAll(filepath.Join(dir, linkDir), 0o700); err != nil {
		return fmt.Errorf("create %s: %w", linkDir, err)
	}
	for name, m := range dp.maps() {
		if _, ok := adopted[name]; ok {
			continue
		}
		if err := pinAtomic(filepath.Join(dir, name), m.Pin); err != nil {
			return fmt.Errorf("pin map %s: %w", name, err)
		}
	}
	for name, p := range dp.programs() {
		if err := pinAtomic(filepath.Join(dir, progDir, name), p.Pin); err != nil {
			return fmt.Errorf("pin program %s: %w", name, err)
		}
	}
	return nil
}

// pinAtomic pins to a temporary name and renames over path, so readers see
// the old object or the new one, never none. Objects are re-pinned by path,
// so the Go object is unpinned afterwards and does not track path.
func pinAtomic(path string, pin func(string) error) error {
	tmp := filepath.Join(filepath.Dir(path), filepath.Base(path)+"_tmp")
	_ = os.Remove(tmp)
	if err := pin(tmp); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return err
	}
	return nil
}

// Open opens a pinned datapath without loading anything: what
// underpassctl and the agent's --uninstall do. It fails with ErrNotLoaded
// when nothing is pinned in dir.
func Open(dir string) (*Objects, error) {
	return open(dir, nil)
}

// forEndpoints are the objects the CNI plugin works on: the endpoint maps
// it writes its endpoint's entries in, parents (registered, with the
// parent's link, when the agent has not yet), svc_cidrs (read), ep_progs
// (checked) and the programs it attaches.
var forEndpoints = map[string]bool{
	"parents": true, "ep_by_mac": true, "ep_by_ip": true, "endpoints": true, "ep_stats": true,
	"svc_cidrs": true, "ep_progs": true, "ep_names": true,
	"parent_egress": true, "endpoint_ingress": true, "endpoint_egress": true,
}

// OpenForEndpoints is Open for the CNI plugin: only the objects it uses
// are opened (forEndpoints), the others stay nil. A third of the objects,
// so a third of the syscalls, on every pod start.
func OpenForEndpoints(dir string) (*Objects, error) {
	return open(dir, forEndpoints)
}

// open opens the pinned objects named in only, all of them when only is nil.
func open(dir string, only map[string]bool) (_ *Objects, err error) {
	if _, err := os.Stat(filepath.Join(dir, progDir)); errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w: nothing pinned in %s: start underpassd", ErrNotLoaded, dir)
	}
	want := func(name string) bool { return only == nil || only[name] }
	dp := &Objects{Dir: dir}
	defer func() {
		if err != nil {
			dp.Close()
		}
	}()
	var openErr error
	dp.eachMap(func(name string, ptr **ebpf.Map) {
		if openErr != nil || !want(name) {
			return
		}
		m, err := ebpf.LoadPinnedMap(filepath.Join(dir, name), nil)
		if err != nil {
			openErr = pinnedErr("map", name, dir, err)
			return
		}
		*ptr = m
		if err := checkABI(name, m); err != nil {
			openErr = fmt.Errorf("pinned map %s was made by another underpass version (%w): use the plugin that matches the running underpassd", name, err)
		}
	})
	if openErr != nil {
		return nil, openErr
	}
	dp.eachProgram(func(name string, ptr **ebpf.Program) {
		if openErr != nil || !want(name) {
			return
		}
		p, err := ebpf.LoadPinnedProgram(filepath.Join(dir, progDir, name), nil)
		if err != nil {
			openErr = pinnedErr("program", name, dir, err)
			return
		}
		*ptr = p
	})
	if openErr != nil {
		return nil, openErr
	}
	return dp, nil
}

// pinnedErr says why the pinned kind (map, program) name would not open.
func pinnedErr(kind, name, dir string, err error) error {
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("%w: %s %s missing in %s: restart underpassd", ErrNotLoaded, kind, name, dir)
	}
	return fmt.Errorf("open pinned %s %s: %w", kind, name, err)
}

// Close releases file descriptors; pinned objects stay in the kernel.
func (dp *Objects) Close() error {
	for _, m := range dp.maps() {
		m.Close()
	}
	for _, p := range dp.programs() {
		p.Close()
	}
	return nil
}

// eachMap and eachProgram walk the generated structs: their ebpf tags are
// the only list of object names.
func (dp *Objects) eachMap(fn func(string, **ebpf.Map)) { eachField(&dp.Maps, fn) }

func (dp *Objects) eachProgram(fn func(string, **ebpf.Program)) { eachField(&dp.Programs, fn) }

// eachField calls fn with the ebpf tag and the address of every field of
// type T in the struct s points to.
func eachField[T any](s any, fn func(name string, ptr *T)) {
	v := reflect.ValueOf(s).Elem()
	for i := range v.NumField() {
		name := v.Type().Field(i).Tag.Get("ebpf")
		if p, ok := v.Field(i).Addr().Interface().(*T); ok && name != "" {
			fn(name, p)
		}
	}
}

// ErrNoEndpointPrograms means ep_progs lacks an endpoint program body: the
// filters on the slaves let traffic through unchecked and uncounted.
var ErrNoEndpointPrograms = errors.New("endpoint programs missing from ep_progs")

// endpointBody is an ep_progs slot and this datapath's program for it.
type endpointBody struct {
	slot EpProg
	prog *ebpf.Program
}

func (dp *Objects) endpointBodies() []endpointBody {
	return []endpointBody{{EpProgIngress, dp.Programs.EpIngressBody}, {EpProgEgress, dp.Programs.EpEgressBody}}
}

// CheckEndpointPrograms says whether both ep_progs slots hold a program.
func (dp *Objects) CheckEndpointPrograms() error {
	for _, b := range dp.endpointBodies() {
		var id uint32
		if err := dp.Maps.EpProgs.Lookup(uint32(b.slot), &id); err != nil {
			if errors.Is(err, ebpf.ErrKeyNotExist) {
				return fmt.Errorf("%w: slot %d is empty", ErrNoEndpointPrograms, b.slot)
			}
			return fmt.Errorf("read ep_progs slot %d: %w", b.slot, err)
		}
	}
	return nil
}

// RestoreEndpointPrograms points the ep_progs slots at this datapath's
// endpoint program bodies.
func (dp *Objects) RestoreEndpointPrograms() error {
	for _, b := range dp.endpointBodies() {
		if err := dp.Maps.EpProgs.Put(uint32(b.slot), b.prog); err != nil {
			return fmt.Errorf("put endpoint program %d into ep_progs: %w", b.slot, err)
		}
	}
	return nil
}

// maps and programs are the open objects by name.
func (dp *Objects) maps() map[string]*ebpf.Map { return byName[*ebpf.Map](&dp.Maps) }

func (dp *Objects) programs() map[string]*ebpf.Program { return byName[*ebpf.Program](&dp.Programs) }

func byName[T comparable](s any) map[string]T {
	out := map[string]T{}
	var zero T
	eachField(s, func(name string, p *T) {
		if *p != zero {
			out[name] = *p
		}
	})
	return out
}

// Unload removes every pin under dir: programs stay attached only through
// links, so detach first (attach.DetachEgress, DetachXDP, DetachEndpoint) or the
// attachments go with them.
func Unload(dir string) error {
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("remove pins in %s: %w", dir, err)
	}
	return nil
}
