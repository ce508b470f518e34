#!/usr/bin/env bash
# Kernel matrix (tier 3): the Go tests in qemu on Debian's 6.1 and 6.12
# kernels. `make test-kernels` calls this; any vmtest flag passes through:
#
#   test/vm/run.sh                                   # selftest on 6.1 and 6.12
#   test/vm/run.sh -kernel 6.1 -pkgs ./internal/loader,./test/... -run 'TCX|Clsact'
#   test/vm/run.sh -h                                # all flags
#
# Installs the host tools it needs (as root, from Debian's packages) and
# caches kernels and initramfs under ~/.cache/underpass/vm.
set -euo pipefail
cd "$(dirname "$0")/../.."

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
# The initramfs needs the static busybox (the busybox package is dynamic).
if ! [ -x /bin/busybox ] || file -L /bin/busybox 2>/dev/null | grep -q 'dynamically linked'; then
	need+=(busybox-static)
fi
[ -x /sbin/depmod ] || command -v depmod >/dev/null || need+=(kmod)
command -v xz >/dev/null || need+=(xz-utils)
command -v zstd >/dev/null || need+=(zstd)
command -v dpkg >/dev/null || need+=(dpkg)

if [ "$(id -u)" = 0 ]; then
	# apt-cache knows the kernel packages only after an apt-get update.
	if ! ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1; then
		apt-get update -qq
	fi
	if [ ${#need[@]} -gt 0 ]; then
		echo "test/vm: installing ${need[*]}" >&2
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
	fi
elif [ ${#need[@]} -gt 0 ]; then
	echo "test/vm: missing tools, run as root or: apt-get install ${need[*]}" >&2
	exit 1
fi

exec go run ./test/vm/cmd/vmtest "$@"
