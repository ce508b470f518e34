package vm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"time"
)

// BootOptions describe one VM run.
type BootOptions struct {
	Kernel  string // vmlinux (ELF, PVH entry) or bzImage
	Initrd  string
	Log     string // serial console log
	Memory  string // -m, default 2G
	CPUs    int    // -smp, default 2
	Timeout time.Duration
	Cmdline string // extra kernel command line
}

// Accel returns the qemu accelerator arguments. /dev/kvm on this workplace
// is a nested PVM device under which stock kernels crash, so KVM is used
// only when UNDERPASS_VM_KVM=1 says so; otherwise TCG.
func Accel() (args []string, desc string) {
	if os.Getenv("UNDERPASS_VM_KVM") == "1" {
		return []string{"-accel", "kvm", "-cpu", "host"}, "KVM (UNDERPASS_VM_KVM=1)"
	}
	desc = "TCG"
	if _, err := os.Stat("/dev/kvm"); err == nil {
		desc += " (/dev/kvm ignored; UNDERPASS_VM_KVM=1 to use it)"
	}
	return []string{"-accel", "tcg", "-cpu", "max"}, desc
}

const qboot = "/usr/share/qemu/qboot.rom"

// ErrTimeout is returned when the VM did not power off in time.
var ErrTimeout = errors.New("VM timed out")

// Boot runs qemu until the guest powers off (or panics: panic=-1 with
// -no-reboot ends qemu) or the timeout passes. The serial console goes to
// opts.Log.
func Boot(ctx context.Context, opts BootOptions) (time.Duration, error) {
	if opts.Memory == "" {
		opts.Memory = "2G"
	}
	if opts.CPUs == 0 {
		opts.CPUs = 2
	}
	accel, _ := Accel()
	cmdline := "console=ttyS0 quiet panic=-1 oops=panic mitigations=off"
	if opts.Cmdline != "" {
		cmdline += " " + opts.Cmdline
	}
	args := []string{"-nographic", "-m", opts.Memory, "-smp", fmt.Sprint(opts.CPUs), "-no-reboot"}
	args = append(args, accel...)
	// qboot boots a -kernel directly, a little faster than SeaBIOS and
	// without its screen-clearing escapes on the console.
	if _, err := os.Stat(qboot); err == nil {
		args = append(args, "-bios", qboot)
	}
	args = append(args,
		"-kernel", opts.Kernel,
		"-initrd", opts.Initrd,
		"-append", cmdline,
		"-serial", "file:"+opts.Log,
		"-monitor", "none",
		"-nic", "none",
	)
	if opts.Timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, opts.Timeout)
		defer cancel()
	}
	cmd := exec.CommandContext(ctx, "qemu-system-x86_64", args...)
	cmd.WaitDelay = 5 * time.Second
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	start := time.Now()
	err := cmd.Run()
	wall := time.Since(start)
	if ctx.Err() == context.DeadlineExceeded {
		return wall, fmt.Errorf("%w after %v", ErrTimeout, opts.Timeout.Round(time.Second))
	}
	if err != nil {
		return wall, fmt.Errorf("qemu-system-x86_64: %v: %s", err, strings.TrimSpace(out.String()))
	}
	return wall, nil
}
