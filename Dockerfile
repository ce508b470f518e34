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
# (internal/loader/*_bpfel.o, embedded by bpf2go), so no clang is needed here; they are
# little-endian, like every platform above.
#
# The final stage is FROM scratch: the three binaries, CA certificates,
# /etc/passwd and one static busybox (~2 MB): the DaemonSet's init
# containers are a few lines of sh (mount the host's bpffs if missing;
# install the plugin binary and conflist idempotently with cmp/cp/mv).
# underpassd, the plugin and underpassctl never use it. `make image` writes
# the same image without Docker.

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

# The final image has exactly what `make image` writes without a Docker
# daemon (internal/release; test/deploy holds the two to the same list):
# Debian bookworm's static busybox with the applets below, Debian's CA
# bundle, a root entry in /etc/passwd and /etc/group, and the three
# binaries. The packages are downloaded for the target architecture and
# unpacked on the build platform, so a multi-platform build needs no
# emulation: no stage runs target-platform code.
FROM --platform=$BUILDPLATFORM debian:bookworm-slim AS rootfs
ARG TARGETARCH
RUN dpkg --add-architecture $TARGETARCH \
 && apt-get update \
 && cd /tmp \
 && apt-get download busybox-static:$TARGETARCH ca-certificates \
 && dpkg-deb -x busybox-static_*_$TARGETARCH.deb /tmp/bb \
 && apt-get install -y --no-install-recommends ca-certificates \
 && mkdir -p /out/bin /out/etc/ssl/certs \
 && cp /tmp/bb/bin/busybox /out/bin/busybox \
 && for a in sh basename cat chmod cmp cp dirname echo grep ls mkdir mount mv rm test; do \
      ln -s busybox /out/bin/$a; \
    done \
 && cp /etc/ssl/certs/ca-certificates.crt /out/etc/ssl/certs/ca-certificates.crt \
 && printf 'root:x:0:0:root:/root:/sbin/nologin\n' > /out/etc/passwd \
 && printf 'root:x:0:\n' > /out/etc/group

FROM scratch
LABEL org.opencontainers.image.title="underpass" \
      org.opencontainers.image.description="eBPF datapath companion for macvlan/ipvlan container networking: underpassd, the underpass CNI plugin, underpassctl" \
      org.opencontainers.image.source="https://github.com/underpass-cni/underpass"
COPY --from=rootfs /out/ /
COPY --from=build /src/bin/underpass /src/bin/underpassd /src/bin/underpassctl /usr/local/bin/
# Root: loading eBPF programs, attaching them and entering network namespaces
# need capabilities (the DaemonSet adds BPF, NET_ADMIN and SYS_ADMIN).
USER 0:0
ENTRYPOINT ["/usr/local/bin/underpassd"]
CMD ["--config", "/etc/underpass/underpass.yaml"]
