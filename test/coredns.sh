#!/usr/bin/env bash
# Builds CoreDNS from the Go module proxy (github.com/coredns/coredns, all its
# plugins, the version below) into ~/.cache/underpass/coredns-<version>/coredns
# unless it is there, and prints that path (test/gobin.sh). test/node runs
# it as the real node's cluster DNS (a Deployment in kube-system behind the
# kube-dns Service, on the node's pod network), so that the upstream
# Services and DNS conformance specs can run. Cold: ~7 min on 2 cores;
# warm: instant.
exec "$(dirname "$0")/gobin.sh" coredns github.com/coredns/coredns v1.15.0
