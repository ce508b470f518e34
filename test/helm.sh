#!/usr/bin/env bash
# Builds helm from the Go module proxy (helm.sh/helm/v4, the version below)
# into ~/.cache/underpass/helm-<version>/helm unless it is there, and prints
# that path (test/gobin.sh). test/deploy lints and renders
# deploy/helm/underpass with it, and test/node installs the chart with it.
# Cold: ~5 min on 2 cores (10 with the Kubernetes binaries building beside
# it); warm: instant.
exec "$(dirname "$0")/gobin.sh" helm helm.sh/helm/v4/cmd/helm v4.3.2
