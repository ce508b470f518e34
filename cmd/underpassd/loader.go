//go:build !underpass_upgradetest

package main

import "github.com/underpass-cni/underpass/internal/loader"

// loaderOptions is the program build underpassd loads: the embedded one.
func loaderOptions() loader.Options { return loader.Options{} }
