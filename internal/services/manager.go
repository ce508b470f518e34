package services

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"sync"
)

// Store is where live service IPs go: the live_svcs map in production
// (MapStore), a plain map in unit tests.
type Store interface {
	Add(netip.Addr) error
	Delete(netip.Addr) error
	List() (map[netip.Addr]bool, error)
}

// Manager keeps a Store equal to static ∪ Kubernetes. Every change is applied
// as a difference (never flush and refill), additions first, so an IP that
// stays live is never missing for a moment.
//
// Until the Kubernetes source has synced once, Manager only adds: the map
// adopted from the previous run holds the services of a moment ago, which is
// a far better guess than "nothing is live" while the informers list.
type Manager struct {
	mu    sync.Mutex
	store Store
	log   *slog.Logger

	static map[netip.Addr]bool
	kube   map[string][]netip.Addr // by namespace/name
	refs   map[netip.Addr]int      // how many sources want an IP live
	have   map[netip.Addr]bool     // mirror of the store

	kubeEnabled bool
	kubeSynced  bool
}

// NewManager adopts what the store holds.
func NewManager(store Store, log *slog.Logger) (*Manager, error) {
	have, err := store.List()
	if err != nil {
		return nil, err
	}
	return &Manager{
		store:  store,
		log:    log,
		static: map[netip.Addr]bool{},
		kube:   map[string][]netip.Addr{},
		refs:   map[netip.Addr]int{},
		have:   have,
	}, nil
}

// SetStatic replaces the static list (services.static).
func (m *Manager) SetStatic(addrs []netip.Addr) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	want := map[netip.Addr]bool{}
	for _, a := range addrs {
		want[a.Unmap()] = true
	}
	var added, removed []netip.Addr
	for a := range want {
		if !m.static[a] {
			added = append(added, a)
		}
	}
	for a := range m.static {
		if !want[a] {
			removed = append(removed, a)
		}
	}
	m.static = want
	return m.change(added, removed)
}

// SetKubernetes says whether a Kubernetes source feeds the manager. Turning
// it on (or on again, for a restarted source) stops removals until the next
// KubeReplace, keeping what is known meanwhile; turning it off forgets every
// Kubernetes IP and prunes the store to the static list.
func (m *Manager) SetKubernetes(enabled bool) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if enabled {
		m.kubeEnabled, m.kubeSynced = true, false
		return nil
	}
	if !m.kubeEnabled {
		return nil
	}
	m.kubeEnabled, m.kubeSynced = false, false
	for k, ips := range m.kube {
		for _, a := range ips {
			m.refs[a]--
		}
		delete(m.kube, k)
	}
	return m.fullSync()
}

// KubeReplace installs the complete Kubernetes view after an informer
// (re)sync and prunes the store to static ∪ that view.
func (m *Manager) KubeReplace(all map[string][]netip.Addr) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.kube = map[string][]netip.Addr{}
	for k, ips := range all {
		if len(ips) > 0 {
			m.kube[k] = dedup(ips)
		}
	}
	m.kubeSynced = true
	return m.fullSync()
}

// KubeUpdate sets the IPs one Service contributes (nil: deleted or stale).
func (m *Manager) KubeUpdate(key string, ips []netip.Addr) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if !m.kubeEnabled {
		return nil
	}
	ips = dedup(ips)
	old := m.kube[key]
	if slices.Equal(old, ips) {
		return nil
	}
	if len(ips) == 0 {
		delete(m.kube, key)
	} else {
		m.kube[key] = ips
	}
	var added, removed []netip.Addr
	for _, a := range ips {
		if !slices.Contains(old, a) {
			added = append(added, a)
		}
	}
	for _, a := range old {
		if !slices.Contains(ips, a) {
			removed = append(removed, a)
		}
	}
	return m.change(added, removed)
}

// Synced reports whether the store reflects every configured source.
func (m *Manager) Synced() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.synced()
}

func (m *Manager) synced() bool { return !m.kubeEnabled || m.kubeSynced }

// Kubernetes says whether a Kubernetes source feeds the manager
// (SetKubernetes).
func (m *Manager) Kubernetes() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.kubeEnabled
}

// Len is the number of live IPs in the store.
func (m *Manager) Len() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.have)
}

// Reconcile re-reads the store and repairs any difference (a failed write,
// someone editing the map with bpftool).
func (m *Manager) Reconcile() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	have, err := m.store.List()
	if err != nil {
		return err
	}
	m.have = have
	if !m.synced() {
		return m.addMissing()
	}
	return m.fullSync()
}

// change bumps reference counts and writes the IPs whose liveness flipped:
// additions first.
func (m *Manager) change(added, removed []netip.Addr) error {
	var errs []error
	for _, a := range added {
		m.refs[a]++
		if !m.have[a] {
			errs = append(errs, m.add(a))
		}
	}
	for _, a := range removed {
		if m.refs[a]--; m.refs[a] <= 0 {
			delete(m.refs, a)
			if m.have[a] && m.synced() {
				errs = append(errs, m.del(a))
			}
		}
	}
	return m.result(errs)
}

// fullSync makes the store equal to the wanted set (recomputing the
// reference counts), additions first.
func (m *Manager) fullSync() error {
	m.refs = map[netip.Addr]int{}
	for a := range m.static {
		m.refs[a]++
	}
	for _, ips := range m.kube {
		for _, a := range ips {
			m.refs[a]++
		}
	}
	if err := m.addMissing(); err != nil {
		return err
	}
	if !m.synced() {
		return nil
	}
	var errs []error
	for a := range m.have {
		if m.refs[a] == 0 {
			errs = append(errs, m.del(a))
		}
	}
	return m.result(errs)
}

func (m *Manager) addMissing() error {
	var errs []error
	for a := range m.refs {
		if !m.have[a] {
			errs = append(errs, m.add(a))
		}
	}
	return m.result(errs)
}

func (m *Manager) add(a netip.Addr) error {
	if err := m.store.Add(a); err != nil {
		return err
	}
	m.have[a] = true
	m.log.Debug("service live", "ip", a)
	return nil
}

func (m *Manager) del(a netip.Addr) error {
	if err := m.store.Delete(a); err != nil {
		return err
	}
	delete(m.have, a)
	m.log.Debug("service stale", "ip", a)
	return nil
}

func (m *Manager) result(errs []error) error {
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("update live services: %w", err)
	}
	return nil
}

func dedup(ips []netip.Addr) []netip.Addr {
	if len(ips) == 0 {
		return nil
	}
	out := make([]netip.Addr, 0, len(ips))
	for _, a := range ips {
		a = a.Unmap()
		if !slices.Contains(out, a) {
			out = append(out, a)
		}
	}
	slices.SortFunc(out, func(a, b netip.Addr) int { return a.Compare(b) })
	return out
}
