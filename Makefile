# underpass — see README.md. Everything runs as root (eBPF, netns).
GO        ?= go
CLANG     ?= clang-14
# The clang the committed objects were built with; `make generate` refuses others
# so that regenerating on another machine gives the same bytes.
CLANG_VERSION := 14.0.6
BIN       := bin
PKGS      := ./...
TESTFLAGS ?= -count=1 -timeout 20m

.PHONY: all generate check-generate build test test-unit bench demo test-kernels clean

all: build

generate:
	@$(CLANG) --version | grep -q "version $(CLANG_VERSION)" || { echo "make generate needs $(CLANG) $(CLANG_VERSION) (apt-get install clang-14)"; exit 1; }
	cd loader && BPF2GO_CC=$(CLANG) $(GO) generate ./...

# Fails when the committed bpf2go output does not match the C sources.
check-generate: generate
	@git diff --exit-code --stat -- loader/ || { echo "committed bpf2go output is stale: run 'make generate' and commit loader/*_bpfel.*"; exit 1; }

build:
	CGO_ENABLED=0 $(GO) build -trimpath -o $(BIN)/ ./cmd/...

# All tiers that run on this kernel; the VM matrix is test-kernels.
test: check-generate
	$(GO) vet $(PKGS)
	$(GO) test $(TESTFLAGS) -p 1 $(PKGS)

# Figures side by side, never asserted: ns/packet per program path
# (prog.Benchmark), then TCP throughput and request/response rate through the
# hairpin vs a veth pair vs macvlan slave<->slave.
bench:
	$(GO) test -run '^$$' -bench . -benchtime 20x ./loader/
	$(GO) test -run '^$$' -bench Paths -benchtime 1x ./test/bench/

test-kernels:
	./test/vm/run.sh

clean:
	rm -rf $(BIN)
