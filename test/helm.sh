#!/usr/bin/env bash
# Builds helm from the Go module proxy (helm.sh/helm/v4, the version below,
# its own go.mod) into
#   ${UNDERPASS_HELM_CACHE:-$HOME/.cache/underpass}/helm-<version>/helm
# unless it is there, and prints that path on stdout (progress on stderr).
# test/deploy lints and renders deploy/helm/underpass with it, and test/node
# installs the chart with it. Cold: ~5 min on 2 cores (10 with the
# Kubernetes binaries building beside it); warm: instant.
set -euo pipefail
version=v4.3.2
out="${UNDERPASS_HELM_CACHE:-$HOME/.cache/underpass}/helm-$version"
if [[ ! -x $out/helm ]]; then
	echo "helm.sh: building helm $version into $out ..." >&2
	mkdir -p "$out"
	tmp=$(mktemp -d)
	trap 'rm -rf "$tmp"' EXIT
	(cd / && GOBIN="$tmp" GOWORK=off CGO_ENABLED=0 go install -trimpath -ldflags='-s -w' "helm.sh/helm/v4/cmd/helm@$version")
	mv -f "$tmp/helm" "$out/helm"
fi
echo "$out/helm"
