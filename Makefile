# underpass — see README.md. Everything runs as root (eBPF, netns).
GO        ?= go
CLANG     ?= clang-14
# The clang the committed objects were built with; `make generate` refuses others
# so that regenerating on another machine gives the same bytes.
CLANG_VERSION := 14.0.6
BIN       := bin
PKGS      := ./...
TESTFLAGS ?= -count=1 -timeout 45m

.PHONY: all generate check-generate generated check-deps lint build image deps test test-unit bench bench-node fuzz demo demo-docker test-kernels vm-cni-bins vm-agent-bins clean

all: build

generate:
	@$(CLANG) --version | grep -q "version $(CLANG_VERSION)" || { echo "make generate needs $(CLANG) $(CLANG_VERSION) (apt-get install clang-14)"; exit 1; }
	cd internal/loader && BPF2GO_CC=$(CLANG) $(GO) generate ./...

# Fails when the committed bpf2go output does not match the C sources.
check-generate: generate
	@git diff --exit-code --stat -- 'internal/loader/*_bpfel.go' 'internal/loader/*_bpfel.o' || { echo "committed bpf2go output is stale: run 'make generate' and commit internal/loader/*_bpfel.*"; exit 1; }

build:
	CGO_ENABLED=0 $(GO) build -trimpath -o $(BIN)/ ./cmd/...

# The release image, the same as the Dockerfile's, as a docker-archive
# without a Docker daemon: load it with docker load -i, podman load -i or
# ctr -n k8s.io images import. Needs busybox-static and ca-certificates.
IMAGE ?= ghcr.io/underpass-cni/underpass:dev
image: build
	$(GO) run ./internal/cmd/mkimage --bin $(BIN) --out $(BIN)/underpass-image.tar --ref $(IMAGE)

# All tiers that run on this kernel; the VM matrix is test-kernels. Missing
# Debian packages are named before they are installed (on a terminal it
# asks; make deps installs them on its own). It builds the Kubernetes binaries (etcd, kube-apiserver,
# -controller-manager, -scheduler, -proxy, kubelet, kubectl, agnhost,
# e2e.test), helm and CoreDNS from the Go module proxy (cached by version).
# The committed bpf2go output is checked when the pinned clang is here.
test: check-deps generated
	UNDERPASS_K8S_BIN=$$(test/k8s/build.sh) UNDERPASS_HELM=$$(test/helm.sh) UNDERPASS_COREDNS=$$(test/coredns.sh) $(GO) test $(TESTFLAGS) -p 1 $(PKGS)

# What `make test` needs that is not Go: the missing Debian packages
# installed (as root), and the Kubernetes binaries, helm and CoreDNS built
# (cached), on their own.
deps:
	test/deps.sh >/dev/null

check-deps:
	@test/deps.sh --ask >/dev/null

# check-generate with the pinned clang; with another one (or none) it says
# so and goes on: only regenerating needs that exact version.
generated:
	@if $(CLANG) --version 2>/dev/null | grep -q "version $(CLANG_VERSION)"; then \
		$(MAKE) --no-print-directory check-generate; \
	else \
		echo "make test: the committed bpf2go output is not checked: that needs $(CLANG) $(CLANG_VERSION) (make deps installs it; CI checks it)"; \
	fi

# gofmt, go vet and staticcheck (built from the Go module proxy, cached
# like the other tools).
STATICCHECK_VERSION := v0.8.2
lint:
	@bad=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$bad" ]; then echo "not gofmt-formatted (run gofmt -w):"; echo "$$bad"; exit 1; fi
	$(GO) vet $(PKGS)
	$$(test/gobin.sh staticcheck honnef.co/go/tools/cmd/staticcheck $(STATICCHECK_VERSION)) $(PKGS)

# Figures side by side, never asserted: ns/packet per program path
# (prog.Benchmark), then TCP throughput and request/response rate through the
# hairpin vs a veth pair vs macvlan slave<->slave, then pod -> ClusterIP -> pod
# through services.mode ebpf vs the real kube-proxy (iptables, nftables) vs
# pod -> pod direct, with a real apiserver and agent (test/agent
# BenchmarkServicePaths, ~6 min for the default 5 rounds).
bench:
	$(GO) test -run '^$$' -bench . -benchtime 20x ./internal/loader/
	$(GO) test -run '^$$' -bench Paths -benchtime 1x ./test/bench/
	UNDERPASS_K8S_BIN=$$(test/k8s/build.sh) $(GO) test -run '^$$' -bench ServicePaths -benchtime 1x -timeout 30m ./test/agent/

# Pod start at scale on the real node (test/node BenchmarkPodStart: 100 pods,
# macvlan vs ptp vs underpass, 3 interleaved rounds; ~15 min on 2 cores).
bench-node: deps
	UNDERPASS_K8S_BIN=$$(test/k8s/build.sh) UNDERPASS_COREDNS=$$(test/coredns.sh) $(GO) test -run '^$$' -bench PodStart -benchtime 1x -timeout 90m -v ./test/node/

# Fuzzing, beyond the seed corpora that `make test` runs: every target for
# FUZZTIME each (test/fuzz.sh: a failure is a written reproducer; Go 1.26's
# spurious "context deadline exceeded" at the fuzztime boundary is reported,
# not failed). As root: the map encoders are checked against the kernel's
# maps.
FUZZTIME ?= 30s
FUZZPKGS := ./internal/cni ./internal/config ./internal/datapath ./internal/loader
fuzz:
	FUZZTIME=$(FUZZTIME) GO=$(GO) test/fuzz.sh $(FUZZPKGS)

# A node in network namespaces with the real underpassd, the real plugin and
# two pods, shown step by step (as root; see test/demo). It waits for Ctrl-C
# and then removes everything; DEMO_ONCE=1 exits after the steps. The
# host-local IPAM plugin comes from containernetworking/plugins at go.mod's
# version, cached like test/cni does.
demo: build
	@set -e; \
	v=$$($(GO) list -m -f '{{.Version}}' github.com/containernetworking/plugins); \
	cni=$$HOME/.cache/underpass/cni-plugins-$$v; \
	if [ ! -x $$cni/host-local ]; then \
		echo "installing host-local $$v into $$cni"; \
		(cd / && GOBIN=$$cni CGO_ENABLED=0 $(GO) install github.com/containernetworking/plugins/plugins/ipam/host-local@$$v); \
	fi; \
	CGO_ENABLED=0 $(GO) build -trimpath -o $(BIN)/demo/underpass-demo ./test/demo/cmd/demo; \
	exec $(BIN)/demo/underpass-demo --bin $(BIN) --cni-path $$cni

# The same node with Docker instead of Kubernetes (as root; see
# test/demo/docker): its own dockerd in the node netns (own data-root,
# exec-root and socket, no iptables, no bridge; Debian's docker.io, an image
# imported from busybox-static, nothing pulled), a macvlan network, the
# baseline without the agent, then underpassd following the engine
# (adopt.docker): docker run, node <-> container, underpassctl endpoints and
# stats, /metrics per container, docker rm. Exits after the steps and
# removes everything (DEMO_WAIT=1 waits for Ctrl-C first).
demo-docker: build
	@CGO_ENABLED=0 $(GO) build -trimpath -o $(BIN)/demo/underpass-demo-docker ./test/demo/docker/cmd/demo-docker
	@exec $(BIN)/demo/underpass-demo-docker --bin $(BIN)

# Tier 3, the kernel matrix: the program tests (./internal/loader), the netns
# end-to-end tests (./test/datapath), the lab and the harness' own checks in
# qemu (TCG) on Debian's 6.1 (no tcx: legacy clsact) and 6.12 kernels, where
# ipvlan and VLAN links (8021q) are required (test/vm/README.md, results in test/vm/RESULTS.md); then
# the plugin through libcni, and the real kube-proxy in IPVS mode (which
# this host's kernel lacks) with the real agent, apiserver and etcd.
# Not part of `make test`: it takes minutes; CI runs it. Prints per-kernel
# wall time and the verifier table of each kernel. More vmtest flags:
# make test-kernels VMTEST='-v -run Ipvlan'.
test-kernels: vm-cni-bins vm-agent-bins
	./test/vm/run.sh -kernel all -pkgs ./internal/loader,./test/datapath,./test/netenv,./test/vm/selftest -timeout 10m -show 'verifier: ' $(VMTEST)
	./test/vm/run.sh -kernel all -pkgs ./test/cni -timeout 10m -run '$(VMCNI_RUN)' \
		-env UNDERPASS_CNI_BINS=/opt/underpass-cni $(VMTEST) \
		$$(cd $(VMCNI) && for f in */*; do printf -- '-file %s:/opt/underpass-cni/%s ' "$$PWD/$$f" "$$f"; done)
	@for t in $(VMKP_TOOLS); do command -v $$t >/dev/null || { echo "test-kernels: no $$t on this host (make deps installs it)"; exit 1; }; done
	@test/k8s/build.sh >/dev/null
	./test/vm/run.sh -kernel all -pkgs ./test/agent -timeout 10m -m 3G -run '$(VMKP_RUN)' \
		-modules $(VMKP_IPVS),$(VMKP_NF),$(VMKP_XT) -env UNDERPASS_REQUIRE_FEATURES=ipvlan,ip_vs \
		-env UNDERPASS_K8S_BIN=/opt/k8s -env UNDERPASS_AGENT_BINS=/opt/underpass-agent $(VMTEST) \
		$$(k8s=$$(test/k8s/build.sh) && for b in etcd kube-apiserver kube-proxy; do printf -- '-file %s:/opt/k8s/%s ' "$$k8s/$$b" "$$b"; done) \
		$$(cd $(VMAGENT) && for f in *; do printf -- '-file %s:/opt/underpass-agent/%s ' "$$PWD/$$f" "$$f"; done) \
		$$(for t in $(VMKP_TOOLS); do printf -- '-file %s ' "$$(command -v $$t)"; done) \
		-file /usr/lib/x86_64-linux-gnu/xtables -file /etc/protocols:/etc/protocols

# kube-proxy in IPVS mode in the VMs (test/agent), with the Debian tools it
# and the test run: dynamically linked, so they come with their libraries and
# iptables' dlopened extensions (xtables/); ipset needs /etc/protocols. The
# modules: IPVS with kube-proxy's default scheduler, the ipset types and
# iptables (nft backend) matches it uses, and what the agent's table needs.
# ip_vs is a required feature there (the test cannot skip); underpassd comes
# prebuilt (UNDERPASS_AGENT_BINS) like the plugin below.
VMAGENT      := $(BIN)/vm-agent
VMKP_RUN     := (TestServiceToPodBackendThroughKubeProxy|TestHostReachabilityOffKeepsPodBackedServices|TestAdoptIpvlan)/ipvs
VMKP_TOOLS   := iptables iptables-save iptables-restore ip6tables ip6tables-save ip6tables-restore ipset nft conntrack
VMKP_IPVS    := ip_vs,ip_vs_rr,ip_set,ip_set_hash_ip,ip_set_hash_ipport,ip_set_hash_ipportip,ip_set_hash_ipportnet,ip_set_hash_net,ip_set_bitmap_port
VMKP_NF      := nf_conntrack,nf_conntrack_netlink,nf_nat,nf_tables,nft_compat,nft_ct,nft_masq,nft_fib_inet
VMKP_XT      := xt_set,xt_comment,xt_addrtype,xt_conntrack,xt_mark,xt_MASQUERADE,xt_ipvs,ipt_REJECT,ip6t_REJECT
vm-agent-bins:
	@set -e; rm -rf $(VMAGENT); mkdir -p $(VMAGENT); \
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags='-s -w' -o $(VMAGENT)/underpassd ./cmd/underpassd; \
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags='-s -w' -tags underpass_upgradetest -o $(VMAGENT)/underpassd-upgrade ./cmd/underpassd

# The plugin through libcni in the VMs: ipvlan (which this host lacks), and
# main, chained and crash paths on the 6.1 legacy-TC parents. The VMs have no
# Go toolchain, so the binaries test/cni would build come prebuilt.
VMCNI     := $(BIN)/vm-cni
VMCNI_RUN := TestIpvlan|TestMainMode|TestChainedMode|TestKilledMidAdd$$|TestGC$$|TestCheckDrift|TestDelAfterNetnsDeleted
vm-cni-bins:
	@set -e; rm -rf $(VMCNI); mkdir -p $(VMCNI)/release $(VMCNI)/failpoints $(VMCNI)/ref; \
	CGO_ENABLED=0 $(GO) build -trimpath -o $(VMCNI)/release/underpass ./cmd/underpass; \
	CGO_ENABLED=0 $(GO) build -trimpath -tags underpass_failpoints -o $(VMCNI)/failpoints/underpass ./cmd/underpass; \
	v=$$($(GO) list -m -f '{{.Version}}' github.com/containernetworking/plugins); \
	cd / && GOBIN=$(CURDIR)/$(VMCNI)/ref CGO_ENABLED=0 $(GO) install \
		github.com/containernetworking/plugins/plugins/main/macvlan@$$v \
		github.com/containernetworking/plugins/plugins/main/ipvlan@$$v \
		github.com/containernetworking/plugins/plugins/main/ptp@$$v \
		github.com/containernetworking/plugins/plugins/ipam/host-local@$$v \
		github.com/containernetworking/plugins/plugins/ipam/static@$$v

clean:
	rm -rf $(BIN)
