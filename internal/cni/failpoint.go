//go:build !underpass_failpoints

package cni

import "errors"

// failpoint marks a step of ADD or DEL where the tests inject an error or a
// crash (build tag underpass_failpoints, see failpoint_on.go). In a release
// build it does nothing.
func failpoint(string) error { return nil }

// errFailpoint is what an "error" failpoint returns.
var errFailpoint = errors.New("failpoint")
