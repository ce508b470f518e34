//go:build linux

// Package kapi starts a real etcd and kube-apiserver on loopback for tests
// that need a Kubernetes API (informers, watches, RBAC), not the fake
// clientset. The binaries are built from the Go module proxy by
// test/k8s/build.sh (versions in test/k8s/build/go.mod) and cached under
// $HOME/.cache/underpass/k8s/<k8s-version>-<etcd-version>/.
//
// Start runs no controller-manager or scheduler: nothing creates
// EndpointSlices, ServiceAccounts or default tokens unless the test starts
// them (test/node does), so tests write the objects they need themselves.
// The ServiceAccount admission plugin is off so that Pods can be created
// without a default ServiceAccount. StartWith an Address is the apiserver of
// a real node instead (test/node): reachable on that address and through the
// kubernetes Service, with ServiceAccount tokens in pods.
package kapi

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/underpass-cni/underpass/internal/testutil"
)

const (
	// ServiceCIDRv4 and ServiceCIDRv6 are the apiserver's
	// --service-cluster-ip-range (dual stack, IPv4 primary).
	ServiceCIDRv4 = "10.96.0.0/16"
	ServiceCIDRv6 = "fd00:96::/108"

	// AdminUser is the user the Cluster's clients authenticate as (token
	// auth); it is in group system:masters, so RBAC allows everything.
	AdminUser = "underpass-admin"

	// EnvBin names a directory holding the etcd and kube-apiserver binaries;
	// it overrides the cache directory derived from test/k8s/build/go.mod.
	EnvBin = "UNDERPASS_K8S_BIN"
	// EnvCache overrides $HOME/.cache/underpass/k8s (same as build.sh).
	EnvCache = "UNDERPASS_K8S_CACHE"
)

// startTimeout bounds the apiserver's start: 90 s, and 4 min in the kernel
// matrix's VMs (UNDERPASS_IN_VM=1), where TCG emulation makes it take
// about 70 s.
func startTimeout() time.Duration {
	if os.Getenv("UNDERPASS_IN_VM") == "1" {
		return 4 * time.Minute
	}
	return 90 * time.Second
}

// Cluster is a running etcd + kube-apiserver pair; it is torn down by the
// testing.TB's Cleanup.
type Cluster struct {
	// Kubeconfig is the path of a kubeconfig file for the admin user
	// (context "underpass-test").
	Kubeconfig string
	// RestConfig is the admin user's client config. Callers may Copy it.
	RestConfig *rest.Config
	// Client is a clientset built from RestConfig.
	Client kubernetes.Interface
	// URL is the apiserver's https URL, Dir the cluster's temp directory
	// (certificates, etcd data, logs *.log).
	URL, Dir string
	// CAFile is the PEM CA that signed the apiserver's serving cert (and
	// the client CA, see CAKeyFile); Token the admin bearer token.
	CAFile, CAKeyFile, Token string
	// SAKeyFile is the service-account token signing key (for a
	// kube-controller-manager's token controller).
	SAKeyFile string
}

// As returns a copy of RestConfig that impersonates user (with groups):
// e.g. As("system:serviceaccount:kube-system:underpass") to test the RBAC
// rules in deploy/. The impersonated identity is subject to RBAC.
func (c *Cluster) As(user string, groups ...string) *rest.Config {
	cfg := rest.CopyConfig(c.RestConfig)
	cfg.Impersonate = rest.ImpersonationConfig{UserName: user, Groups: groups}
	return cfg
}

// Start starts etcd and kube-apiserver on free loopback ports, waits until
// the apiserver's /readyz is ok and returns the Cluster. It fails tb (with
// the processes' logs) if the binaries are missing or start-up fails. Each
// call is a separate cluster; start-up takes a few seconds, so share one per
// package (e.g. from TestMain via a helper) when many tests need it.
func Start(tb testing.TB) *Cluster {
	tb.Helper()
	return StartWith(tb, Options{})
}

// Options change what Start does.
type Options struct {
	// Address, when set, is where the apiserver listens and what it
	// advertises (a node's address): the kubernetes Service then has it as
	// its endpoint, so pods with in-cluster credentials (a DaemonSet) reach
	// the API through kube-proxy as on a real cluster, and the
	// ServiceAccount admission plugin mounts their tokens (a
	// controller-manager must run: it makes the ServiceAccounts and the
	// kube-root-ca.crt ConfigMap). The serving certificate names it.
	Address netip.Addr
}

// StartWith is Start with options.
func StartWith(tb testing.TB, o Options) *Cluster {
	tb.Helper()
	bin, err := BinDir()
	if err != nil {
		tb.Fatalf("kapi: %v", err)
	}
	begin := time.Now()
	s := newStarter(tb, bin)
	c := &Cluster{Dir: s.dir}
	pki, tokens := s.credentials(c, o.Address)
	etcdURL := s.startEtcd()
	s.startAPIServer(c, o.Address, etcdURL, pki, tokens)
	s.connect(c, pki)
	tb.Logf("kapi: cluster at %s ready in %v (dir %s)", c.URL, time.Since(begin).Round(time.Millisecond), s.dir)
	return c
}

// starter is what StartWith has started: the processes, stopped in reverse
// order when tb ends, whose logs are printed once if tb fails.
type starter struct {
	tb       testing.TB
	bin, dir string
	procs    []*proc // in the order started
	printed  bool    // fail has printed the logs
}

func newStarter(tb testing.TB, bin string) *starter {
	s := &starter{tb: tb, bin: bin, dir: tb.TempDir()}
	tb.Cleanup(func() {
		for i := len(s.procs) - 1; i >= 0; i-- {
			s.procs[i].stop()
		}
		if tb.Failed() && !s.printed {
			for _, p := range s.procs {
				tb.Logf("kapi: %s", p.logTail())
			}
		}
	})
	return s
}

// fail prints the processes' logs and fails tb at once.
func (s *starter) fail(format string, args ...any) {
	s.tb.Helper()
	for _, p := range s.procs {
		s.tb.Logf("kapi: %s", p.logTail())
	}
	s.printed = true // the processes are still stopped by the cleanup
	s.tb.Fatalf("kapi: "+format, args...)
}

// credentials writes the certificates (the serving one also naming addr,
// if valid) and the admin token into c's files and returns the PKI and the
// apiserver's token file.
func (s *starter) credentials(c *Cluster, addr netip.Addr) (*pki, string) {
	s.tb.Helper()
	pki, err := writePKI(s.dir, addr)
	if err != nil {
		s.fail("certificates: %v", err)
	}
	c.CAFile, c.CAKeyFile, c.SAKeyFile = pki.caFile, pki.caKeyFile, pki.saKeyFile
	c.Token = randomToken()
	tokens := filepath.Join(s.dir, "tokens.csv")
	if err := os.WriteFile(tokens, []byte(fmt.Sprintf("%s,%s,%s,\"system:masters\"\n", c.Token, AdminUser, AdminUser)), 0o600); err != nil {
		s.fail("%v", err)
	}
	return pki, tokens
}

// start starts the binary name on nPorts free ports (args makes its
// arguments from them), logging to <name>.<attempt>.log, and waits for
// ready. Free ports are found by binding :0 and closing; another process
// may grab one in between, so a start that fails with "address already in
// use" is retried on new ports (after reset), three attempts in all. It
// fails with failure and the error otherwise.
func (s *starter) start(name, failure string, nPorts int, args func(ports []int) []string, ready func(*proc) error, reset func()) {
	s.tb.Helper()
	for attempt := 1; ; attempt++ {
		ports, err := freePorts(nPorts)
		if err != nil {
			s.fail("%v", err)
		}
		p, err := startProc(filepath.Join(s.bin, name), filepath.Join(s.dir, fmt.Sprintf("%s.%d.log", name, attempt)), args(ports)...)
		if err != nil {
			s.fail("%v", err)
		}
		s.procs = append(s.procs, p)
		err = ready(p)
		if err == nil {
			return
		}
		if attempt < 3 && p.exitedWithPortInUse() {
			p.stop()
			reset()
			continue
		}
		s.fail("%s: %v", failure, err)
	}
}

// startEtcd starts etcd and returns its client URL.
func (s *starter) startEtcd() (etcdURL string) {
	s.tb.Helper()
	data := filepath.Join(s.dir, "etcd")
	s.start("etcd", "etcd did not start", 2, func(ports []int) []string {
		etcdURL = "http://127.0.0.1:" + strconv.Itoa(ports[0])
		peerURL := "http://127.0.0.1:" + strconv.Itoa(ports[1])
		return []string{
			"--name=kapi",
			"--data-dir=" + data,
			"--listen-client-urls=" + etcdURL,
			"--advertise-client-urls=" + etcdURL,
			"--listen-peer-urls=" + peerURL,
			"--initial-advertise-peer-urls=" + peerURL,
			"--initial-cluster=kapi=" + peerURL,
			"--initial-cluster-state=new",
			"--unsafe-no-fsync", // test data; much faster on slow disks
			"--log-level=warn",
		}
	}, func(p *proc) error {
		return p.waitReady(30*time.Second, plainGet(etcdURL+"/health", `"health":"true"`))
	}, func() { os.RemoveAll(data) })
	return etcdURL
}

// startAPIServer starts kube-apiserver on loopback, or on addr if valid,
// with etcd at etcdURL, and sets c.URL.
func (s *starter) startAPIServer(c *Cluster, addr netip.Addr, etcdURL string, pki *pki, tokens string) {
	s.tb.Helper()
	host := "127.0.0.1"
	// Nothing runs the ServiceAccount controller, and loopback addresses
	// are invalid in the kubernetes Service's endpoints.
	node := []string{"--disable-admission-plugins=ServiceAccount", "--endpoint-reconciler-type=none"}
	if addr.IsValid() {
		host, node = addr.String(), nil
	}
	s.start("kube-apiserver", "kube-apiserver did not become ready", 1, func(ports []int) []string {
		c.URL = "https://" + net.JoinHostPort(host, strconv.Itoa(ports[0]))
		return append([]string{
			"--bind-address=" + host,
			"--advertise-address=" + host,
			"--secure-port=" + strconv.Itoa(ports[0]),
			"--etcd-servers=" + etcdURL,
			"--cert-dir=" + filepath.Join(s.dir, "apiserver-certs"),
			"--tls-cert-file=" + pki.serverCertFile,
			"--tls-private-key-file=" + pki.serverKeyFile,
			"--client-ca-file=" + pki.caFile,
			"--token-auth-file=" + tokens,
			"--authorization-mode=RBAC",
			"--anonymous-auth=false",
			"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
			"--service-account-key-file=" + pki.saPubFile,
			"--service-account-signing-key-file=" + pki.saKeyFile,
			"--service-cluster-ip-range=" + ServiceCIDRv4 + "," + ServiceCIDRv6,
			"--allow-privileged=true",
			// The kubelet by the node's address (exec, logs): its hostname
			// would be looked up in this machine's DNS, off the machine.
			"--kubelet-preferred-address-types=InternalIP",
			"--profiling=false",
			"--v=1",
		}, node...)
	}, func(p *proc) error {
		return p.waitReady(startTimeout(), tlsGet(c.URL+"/readyz", pki.caPEM, c.Token, "ok"))
	}, func() {})
}

// connect fills in c's admin client config, clientset and kubeconfig.
func (s *starter) connect(c *Cluster, pki *pki) {
	s.tb.Helper()
	c.RestConfig = &rest.Config{
		Host:            c.URL,
		BearerToken:     c.Token,
		TLSClientConfig: rest.TLSClientConfig{CAData: pki.caPEM},
		QPS:             200,
		Burst:           400,
		Timeout:         30 * time.Second,
	}
	var err error
	c.Client, err = kubernetes.NewForConfig(c.RestConfig)
	if err != nil {
		s.fail("clientset: %v", err)
	}
	c.Kubeconfig = filepath.Join(s.dir, "kubeconfig")
	if err := os.WriteFile(c.Kubeconfig, []byte(kubeconfig(c.URL, pki.caFile, c.Token)), 0o600); err != nil {
		s.fail("%v", err)
	}
}

// BinDir returns the directory with the etcd and kube-apiserver binaries:
// $UNDERPASS_K8S_BIN, or the cache directory build.sh builds into for the
// versions pinned in test/k8s/build/go.mod.
func BinDir() (string, error) {
	const hint = "run test/k8s/build.sh first (it builds etcd, kube-apiserver, kube-proxy, the kubelet and agnhost from the Go module proxy, ~15-20 min cold, then cached) or set " + EnvBin + " to a directory with them"
	dir := os.Getenv(EnvBin)
	if dir == "" {
		_, self, _, ok := runtime.Caller(0)
		if !ok {
			return "", errors.New("cannot locate test/k8s/build/go.mod; " + hint)
		}
		gomod := filepath.Join(filepath.Dir(self), "..", "build", "go.mod")
		k8sVer, etcdVer, err := pinnedVersions(gomod)
		if err != nil {
			return "", fmt.Errorf("%v; %s", err, hint)
		}
		cache := os.Getenv(EnvCache)
		if cache == "" {
			home, err := os.UserHomeDir()
			if err != nil {
				return "", fmt.Errorf("%v; %s", err, hint)
			}
			cache = filepath.Join(home, ".cache", "underpass", "k8s")
		}
		dir = filepath.Join(cache, k8sVer+"-"+etcdVer)
	}
	for _, name := range []string{"etcd", "kube-apiserver"} {
		fi, err := os.Stat(filepath.Join(dir, name))
		if err != nil || fi.IsDir() || fi.Mode()&0o111 == 0 {
			return "", fmt.Errorf("no executable %s in %s: %s", name, dir, hint)
		}
	}
	return dir, nil
}

// NeedBins returns BinDir, failing tb unless the binaries names (built
// there by build.sh beside etcd and kube-apiserver) are in it too.
func NeedBins(tb testing.TB, names ...string) string {
	tb.Helper()
	bin, err := BinDir()
	if err != nil {
		tb.Fatal(err)
	}
	for _, b := range names {
		if _, err := os.Stat(filepath.Join(bin, b)); err != nil {
			tb.Fatalf("no %s in %s: run test/k8s/build.sh", b, bin)
		}
	}
	return bin
}

// pinnedVersions reads the k8s.io/kubernetes and go.etcd.io/etcd/server/v3
// versions from the wrapper module's go.mod (the same ones build.sh uses).
func pinnedVersions(gomod string) (k8sVer, etcdVer string, err error) {
	data, err := os.ReadFile(gomod)
	if err != nil {
		return "", "", err
	}
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(strings.TrimPrefix(strings.TrimSpace(line), "require "))
		if len(f) < 2 {
			continue
		}
		switch f[0] {
		case "k8s.io/kubernetes":
			k8sVer = f[1]
		case "go.etcd.io/etcd/server/v3":
			etcdVer = f[1]
		}
	}
	if k8sVer == "" || etcdVer == "" {
		return "", "", fmt.Errorf("%s does not require k8s.io/kubernetes and go.etcd.io/etcd/server/v3", gomod)
	}
	return k8sVer, etcdVer, nil
}

func kubeconfig(url, caFile, token string) string {
	return fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: underpass-test
  cluster:
    server: %s
    certificate-authority: %s
users:
- name: %s
  user:
    token: %s
contexts:
- name: underpass-test
  context:
    cluster: underpass-test
    user: %s
current-context: underpass-test
`, url, caFile, AdminUser, token, AdminUser)
}

func freePorts(n int) ([]int, error) {
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	var ports []int
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("free port: %w", err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// proc is a child process in its own process group, its output in a file.
// proc is one of the cluster's processes.
type proc struct{ *testutil.Proc }

func startProc(path, logFile string, args ...string) (*proc, error) {
	p, err := testutil.StartProc(path, logFile, args...)
	if err != nil {
		return nil, err
	}
	return &proc{p}, nil
}

func (p *proc) exited() bool { return p.Exited() }

// stop sends SIGTERM to the process group, SIGKILL after 10 s.
func (p *proc) stop() { p.Stop(10 * time.Second) }

// waitReady polls check until it succeeds, the process exits or timeout.
func (p *proc) waitReady(timeout time.Duration, check func() error) error {
	deadline := time.Now().Add(timeout)
	last := errors.New("not checked yet")
	for {
		if p.exited() {
			return fmt.Errorf("%s exited: %v (last check: %v)", p.Name, p.Err(), last)
		}
		if last = check(); last == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not ready after %v: %v", p.Name, timeout, last)
		}
		select {
		case <-p.Done():
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func (p *proc) exitedWithPortInUse() bool {
	if !p.exited() {
		return false
	}
	data, _ := os.ReadFile(p.Log)
	return bytes.Contains(data, []byte("address already in use"))
}

// logTail returns the last 64 KiB of the process's log.
func (p *proc) logTail() string {
	const max = 64 << 10
	data, err := os.ReadFile(p.Log)
	if err != nil {
		return fmt.Sprintf("%s log: %v", p.Name, err)
	}
	cut := ""
	if len(data) > max {
		data = data[len(data)-max:]
		if i := bytes.IndexByte(data, '\n'); i >= 0 {
			data = data[i+1:]
		}
		cut = " (last 64 KiB)"
	}
	return fmt.Sprintf("%s log %s%s:\n%s", p.Name, p.Log, cut, data)
}

func plainGet(url, want string) func() error {
	client := &http.Client{Timeout: 2 * time.Second}
	return func() error { return get(client, url, "", want) }
}

func tlsGet(url string, caPEM []byte, token, want string) func() error {
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	client := &http.Client{
		Timeout:   5 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}},
	}
	return func() error { return get(client, url, token, want) }
}

func get(client *http.Client, url, token, want string) error {
	ctx, cancel := context.WithTimeout(context.Background(), client.Timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	var body bytes.Buffer
	_, _ = body.ReadFrom(http.MaxBytesReader(nil, resp.Body, 64<<10))
	if resp.StatusCode != http.StatusOK || !strings.Contains(body.String(), want) {
		return fmt.Errorf("GET %s: %s: %s", url, resp.Status, strings.TrimSpace(body.String()))
	}
	return nil
}

// KubeProxyConfig is a KubeProxyConfiguration for the real kube-proxy in
// mode (iptables, nftables, ipvs: deprecated in v1.37 but on by default,
// feature gate KubeProxyIPVS) with its defaults, except what a test node
// cannot or must not do: conntrack settings are left as they are (the
// maximum is host-wide, the timeouts belong to the host), and its ports are
// on loopback.
func KubeProxyConfig(mode, hostname, kubeconfig string) string {
	return fmt.Sprintf(`apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: %s
hostnameOverride: %s
clientConnection:
  kubeconfig: %s
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 127.0.0.1:10256
conntrack:
  maxPerCore: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
`, mode, hostname, kubeconfig)
}
