#!/usr/bin/env bash
# gobin.sh NAME PACKAGE VERSION builds one Go command from the Go module
# proxy (`go install PACKAGE@VERSION`: its own go.mod, CGO off) into
#   ${UNDERPASS_GOBIN_CACHE:-$HOME/.cache/underpass}/NAME-VERSION/NAME
# unless it is there, and prints that path on stdout (progress on stderr).
# test/helm.sh and test/coredns.sh pin what they build with it.
set -euo pipefail
[[ $# == 3 ]] || { echo "usage: $0 NAME PACKAGE VERSION" >&2; exit 2; }
name=$1 pkg=$2 version=$3
out="${UNDERPASS_GOBIN_CACHE:-$HOME/.cache/underpass}/$name-$version"
if [[ ! -x $out/$name ]]; then
	echo "gobin.sh: building $name $version into $out ..." >&2
	mkdir -p "$out"
	tmp=$(mktemp -d)
	trap 'rm -rf "$tmp"' EXIT
	(cd / && GOBIN="$tmp" GOWORK=off CGO_ENABLED=0 go install -trimpath -ldflags='-s -w' "$pkg@$version")
	mv -f "$tmp/$(basename "$pkg")" "$out/$name"
fi
echo "$out/$name"
