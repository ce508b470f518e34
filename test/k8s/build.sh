#!/usr/bin/env bash
# Builds etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
# kube-proxy, kubelet, kubectl, agnhost (as agnhost-full) and e2e.test (the upstream e2e
# suite, k8s.io/kubernetes/test/e2e) from the Go module proxy (wrapper module in
# test/k8s/build/, versions set only in its go.mod) into
#   ${UNDERPASS_K8S_CACHE:-$HOME/.cache/underpass/k8s}/<k8s-version>-<etcd-version>/
# unless the binaries are already there, and prints that directory on stdout
# (progress goes to stderr). Idempotent; a version bump builds into a new dir.
# Cold (empty Go build cache, module cache filled): ~21 min on 2 cores for
# the servers, kubelet, kube-proxy and agnhost (measured 2026-12-03, with
# helm building beside it), ~1 min more for kubectl, ~6 for e2e.test; warm:
# well under 1 s.
# test/k8s/kapi finds the binaries through UNDERPASS_K8S_BIN=<printed dir>, or
# in the same cache dir (it reads the versions from test/k8s/build/go.mod).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mod="$here/build"
export GOWORK=off GOFLAGS="${GOFLAGS:-} -mod=mod" CGO_ENABLED=0

modver() { (cd "$mod" && go list -m -f '{{if .Replace}}{{.Replace.Version}}{{else}}{{.Version}}{{end}}' "$1"); }
k8s=$(modver k8s.io/kubernetes)
etcd=$(modver go.etcd.io/etcd/server/v3)
[[ -n $k8s && -n $etcd ]] || { echo "build.sh: cannot read versions from $mod/go.mod" >&2; exit 1; }

out="${UNDERPASS_K8S_CACHE:-$HOME/.cache/underpass/k8s}/$k8s-$etcd"
bins=(etcd kube-apiserver kube-controller-manager kube-scheduler kube-proxy kubelet kubectl agnhost-full e2e.test)
have=1
for b in "${bins[@]}"; do [[ -x $out/$b ]] || have=0; done
if [[ $have == 1 ]]; then
	echo "$out"
	exit 0
fi
mkdir -p "$out"
trap 'rm -f "$out"/.*.tmp.$$' EXIT

# The version strings hack/lib/version.sh would stamp (otherwise the server
# reports v0.0.0-master).
major=${k8s#v}; major=${major%%.*}
minor=${k8s#v*.}; minor=${minor%%.*}
xv=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
	xv+=" -X $pkg.gitVersion=$k8s -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
done

build() { # name package extra-ldflags
	local tmp="$out/.$1.tmp.$$"
	echo "build.sh: building $1 ($k8s/$etcd) into $out ..." >&2
	(cd "$mod" && go build -trimpath -ldflags="-s -w$3" -o "$tmp" "$2")
	mv -f "$tmp" "$out/$1" # atomic: a half-built binary never has the final name
}
[[ -x $out/etcd ]] || build etcd ./etcd ""
[[ -x $out/kube-apiserver ]] || build kube-apiserver ./kube-apiserver "$xv"
[[ -x $out/kube-controller-manager ]] || build kube-controller-manager ./kube-controller-manager "$xv"
[[ -x $out/kube-scheduler ]] || build kube-scheduler ./kube-scheduler "$xv"
[[ -x $out/kube-proxy ]] || build kube-proxy ./kube-proxy "$xv"
[[ -x $out/kubelet ]] || build kubelet ./kubelet "$xv"
[[ -x $out/kubectl ]] || build kubectl ./kubectl "$xv"
# The whole upstream agnhost, every subcommand the e2e specs run (porter,
# serve-hostname, connect, ...). "-full": a cache dir from before, with a
# two-subcommand agnhost, builds it anew.
[[ -x $out/agnhost-full ]] || build agnhost-full k8s.io/kubernetes/test/images/agnhost ""
if [[ ! -x $out/e2e.test ]]; then
	echo "build.sh: building e2e.test ($k8s) into $out ..." >&2
	tmp="$out/.e2e.test.tmp.$$"
	(cd "$mod" && go test -c -vet=off -trimpath -ldflags="-s -w$xv" -o "$tmp" k8s.io/kubernetes/test/e2e)
	mv -f "$tmp" "$out/e2e.test"
fi
echo "$out"
