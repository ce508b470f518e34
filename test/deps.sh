#!/usr/bin/env bash
# Installs what `make test` needs on a Debian bookworm machine (as root, only
# the packages that are missing) and builds etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, kube-proxy, the kubelet and
# kubectl and agnhost that the informer, manifest, kube-proxy and real-node
# tests run (test/k8s/build.sh), helm for the chart (test/helm.sh) and
# CoreDNS for the real node's cluster DNS (test/coredns.sh), all cached by
# version.
# Prints the k8s binary directory on stdout; progress goes to stderr.
# With --ask (what make test runs first) it says what is missing before
# installing it, and on a terminal asks first.
set -euo pipefail
cd "$(dirname "$0")/.."

pkgs=(clang-14 llvm-14 libbpf-dev bpftool iproute2 iperf3 sockperf tcpdump kmod busybox-static cpio xz-utils zstd prometheus docker.io iptables ipset nftables conntrack containerd runc podman netavark containernetworking-plugins systemd ca-certificates)
missing=()
for p in "${pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [[ ${1:-} == --ask ]]; then
	# make test: installs nothing without saying so first. On a terminal it
	# asks; without one (CI, a script) it says what it installs and does.
	[ ${#missing[@]} -eq 0 ] && exit 0
	echo "make test needs these Debian packages, missing here: ${missing[*]}" >&2
	if [ -t 0 ]; then
		read -r -p "install them now with apt-get? [y/N] " answer
		case $answer in [yY]*) ;; *) echo "not installed: run 'make deps' (as root) when you want them" >&2; exit 1 ;; esac
	else
		echo "no terminal to ask: installing them (make deps does only this)" >&2
	fi
fi
if [ ${#missing[@]} -gt 0 ]; then
	if [ "$(id -u)" != 0 ]; then
		echo "test/deps.sh: missing ${missing[*]}: run as root, or apt-get install them" >&2
		exit 1
	fi
	echo "test/deps.sh: apt-get install ${missing[*]}" >&2
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq >&2
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
test/helm.sh >/dev/null
test/coredns.sh >/dev/null
test/k8s/build.sh
