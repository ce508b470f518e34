//go:build underpass_upgradetest

package main

import "github.com/underpass-cni/underpass/internal/loader"

// loaderOptions, in the test-only build (-tags underpass_upgradetest), loads
// a different program build: the same source with redirect tracing compiled
// in. test/agent starts it over a running datapath to check that an upgrade
// updates the links in place without losing a packet.
func loaderOptions() loader.Options { return loader.Options{Trace: true} }
