// Package vm is the kernel-matrix harness (tier 3 in docs/architecture.md): it fetches
// Debian's 6.1 and 6.12 kernel packages, builds a busybox initramfs with the
// modules the suites need, boots it in qemu with static Go test binaries
// appended, and parses the result lines of the serial console. The entry
// point is cmd/vmtest (test/vm/run.sh, make test-kernels).
package vm
