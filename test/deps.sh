#!/usr/bin/env bash
# Installs what `make test` needs on a Debian bookworm machine (as root, only
# the packages that are missing) and builds etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, kube-proxy, the kubelet and
# kubectl and agnhost that the informer, manifest, kube-proxy and real-node
# tests run (test/k8s/build.sh), helm for the chart (test/helm.sh) and
# CoreDNS for the real node's cluster DNS (test/coredns.sh), all cached by
# version.
# Prints the k8s binary directory on stdout; progress goes to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."

pkgs=(clang-14 llvm-14 libbpf-dev bpftool iproute2 iperf3 tcpdump kmod busybox-static cpio xz-utils zstd prometheus iptables ipset nftables conntrack containerd runc ca-certificates)
missing=()
for p in "${pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	if [ "$(id -u)" != 0 ]; then
		echo "test/deps.sh: missing ${missing[*]}: run as root, or apt-get install them" >&2
		exit 1
	fi
	echo "test/deps.sh: installing ${missing[*]}" >&2
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq >&2
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
test/helm.sh >/dev/null
test/coredns.sh >/dev/null
test/k8s/build.sh
