# syntax=docker/dockerfile:1
#
# The underpass image: underpassd (the node agent), the underpass CNI plugin
# and underpassctl, as static binaries. deploy/kubernetes runs it as a
# DaemonSet; its install-cni init container copies the plugin to the host's
# /opt/cni/bin.
#
#   docker build -t ghcr.io/underpass-cni/underpass:dev --build-arg VERSION=dev .
#   docker buildx build --platform linux/amd64,linux/arm64 -t … --push .
#
# Stage 1 builds with `make build` (CGO_ENABLED=0 go build -trimpath): static
# binaries, no libc needed at run time. The eBPF objects are committed
# (loader/*_bpfel.o, embedded by bpf2go), so no clang is needed here; they are
# little-endian, like every platform above.
#
# The final stage is gcr.io/distroless/static (CA certificates, /etc/passwd,
# tzdata, no shell, no package manager) plus one static busybox (~1 MB):
# the DaemonSet's init containers are a few lines of sh (mount the host's
# bpffs if missing; install the plugin binary and conflist idempotently with
# cmp/cp/mv). underpassd, the plugin and underpassctl never use it.

ARG GO_VERSION=1.26

FROM --platform=$BUILDPLATFORM golang:${GO_VERSION}-bookworm AS build
WORKDIR /src
# Dependencies first: this layer stays cached until go.mod/go.sum change.
COPY go.mod go.sum ./
RUN --mount=type=cache,target=/go/pkg/mod \
    go mod download
COPY . .
ARG TARGETOS=linux
ARG TARGETARCH
ARG VERSION=dev
# Cross-compiles for the target platform (no cgo, so no cross toolchain).
RUN --mount=type=cache,target=/go/pkg/mod \
    --mount=type=cache,target=/root/.cache/go-build \
    GOOS=$TARGETOS GOARCH=$TARGETARCH \
    GOFLAGS="-buildvcs=false -ldflags=-X=main.version=$VERSION" \
    make build \
 && for b in underpass underpassd underpassctl; do \
      test -x bin/$b || { echo "make build did not produce bin/$b"; exit 1; }; \
      if readelf -l bin/$b | grep -q 'program interpreter'; then echo "bin/$b is not static"; exit 1; fi; \
    done

# busybox:*-musl is statically linked. The applet links are made on the build
# platform (a symlink has no architecture), so a multi-platform build needs
# no emulation: no stage runs target-platform code.
FROM --platform=$BUILDPLATFORM busybox:1.37-musl AS applets
RUN mkdir -p /out/bin \
 && for a in sh basename cat chmod cmp cp dirname echo grep ls mkdir mount mv rm test; do \
      ln -s busybox /out/bin/$a; \
    done

FROM busybox:1.37-musl AS busybox

FROM gcr.io/distroless/static-debian12
LABEL org.opencontainers.image.title="underpass" \
      org.opencontainers.image.description="eBPF datapath companion for macvlan/ipvlan container networking: underpassd, the underpass CNI plugin, underpassctl" \
      org.opencontainers.image.source="https://github.com/underpass-cni/underpass"
COPY --from=busybox /bin/busybox /bin/busybox
COPY --from=applets /out/bin/ /bin/
COPY --from=build /src/bin/underpass /src/bin/underpassd /src/bin/underpassctl /usr/local/bin/
# Root: loading eBPF programs, attaching them and entering network namespaces
# need capabilities (the DaemonSet adds BPF, NET_ADMIN and SYS_ADMIN).
USER 0:0
ENTRYPOINT ["/usr/local/bin/underpassd"]
CMD ["--config", "/etc/underpass/underpass.yaml"]
