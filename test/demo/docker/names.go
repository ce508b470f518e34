//go:build linux

// Package docker holds what `make demo-docker` (test/demo/docker/cmd/demo-docker)
// and its test share: the fixed names of everything the Docker demo
// creates and the scan for what is left of it. The names are apart from
// `make demo`'s (test/demo), so neither demo's clean-up ever touches the
// other's.
//
// Every name is fixed (not per run), so a run after a crash finds and
// removes what the previous one left: namespaces named Prefix*, the pin
// directory BPFFS, the state directory StateDir (dockerd's data-root,
// exec-root and socket, the agent's config and log) with any mount below
// it, and every process started with a path inside StateDir (underpassd,
// dockerd, its containerd and shims).
package docker

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/underpass-cni/underpass/test/demo/kit"
)

const (
	// Prefix starts the name of every network namespace of the demo.
	Prefix = "underpass-dockerdemo-"
	// BPFFS is the demo agent's pin directory.
	BPFFS = "/sys/fs/bpf/underpass-dockerdemo"
	// StateDir holds dockerd's roots and socket and the agent's config
	// and log.
	StateDir = "/run/underpass-dockerdemo"
	// LockFile is held (flock) by a running Docker demo; it holds its pid.
	LockFile = "/run/underpass-dockerdemo.lock"
	// MetricsAddr is the agent's metrics.listen inside the node netns.
	MetricsAddr = "127.0.0.1:9775"
	// TrustKey is where dockerd 20.10 writes its identity whatever its
	// roots; the demo removes it if it made it (KeyMarker says so).
	TrustKey = "/etc/docker/key.json"
)

// KeyMarker, inside StateDir, says that TrustKey did not exist before the
// demo started dockerd.
var KeyMarker = filepath.Join(StateDir, "remove-key.json")

// ContainersDir is where the demo's dockerd keeps its containers, one
// directory per container ID.
var ContainersDir = filepath.Join(StateDir, "docker", "data", "containers")

// ContainerIDs are the IDs of the containers the demo's dockerd has (or
// had, when a crash left its data-root behind).
func ContainerIDs() []string {
	entries, _ := os.ReadDir(ContainersDir)
	var out []string
	for _, e := range entries {
		if e.IsDir() {
			out = append(out, e.Name())
		}
	}
	return out
}

// ContainerProcesses returns the pids of processes in the cgroup of one of
// the demo's containers: a container whose shim was killed with its
// dockerd is orphaned, and only its cgroup still ties it to the demo.
func ContainerProcesses() []int {
	ids := ContainerIDs()
	if len(ids) == 0 {
		return nil
	}
	var out []int
	for _, pid := range kit.Pids() {
		cg, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
		if err != nil {
			continue
		}
		for _, id := range ids {
			// cgroupfs driver: /docker/<id>; systemd: docker-<id>.scope.
			if bytes.Contains(cg, []byte("/docker/"+id)) || bytes.Contains(cg, []byte("docker-"+id+".scope")) {
				out = append(out, pid)
				break
			}
		}
	}
	return out
}

// Cgroups are the cgroup directories of the demo's containers that exist
// (in every hierarchy, cgroupfs or systemd driver): dockerd removes them
// when it stops a container, a crash leaves them.
func Cgroups() []string {
	var out []string
	for _, id := range ContainerIDs() {
		for _, pat := range []string{"/sys/fs/cgroup/docker/", "/sys/fs/cgroup/*/docker/", "/sys/fs/cgroup/system.slice/docker-", "/sys/fs/cgroup/*/system.slice/docker-"} {
			name := id
			if strings.HasSuffix(pat, "-") {
				name += ".scope"
			}
			m, _ := filepath.Glob(pat + name)
			out = append(out, m...)
		}
	}
	return out
}

// Mounts lists the mount points inside StateDir, deepest first.
func Mounts() []string {
	b, _ := os.ReadFile("/proc/self/mounts")
	var out []string
	for line := range strings.SplitSeq(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 1 && (f[1] == StateDir || strings.HasPrefix(f[1], StateDir+"/")) {
			out = append(out, f[1])
		}
	}
	for i, j := 0, len(out)-1; i < j; i, j = i+1, j-1 {
		out[i], out[j] = out[j], out[i]
	}
	return out
}

// Names are the Docker demo's names, for test/demo/kit.
var Names = kit.NewNames(Prefix, BPFFS, StateDir, LockFile)

// Processes returns the pids of processes (other than the caller) whose
// command line names a path inside StateDir: underpassd, dockerd,
// containerd and the shims, oldest (lowest pid) first.
func Processes() []int { return Names.Processes() }

// Leftovers describes everything of the demo that exists now: namespaces,
// cgroups, mounts, the pin and state directories, the lock files and
// processes (the containers' included). Empty means clean.
func Leftovers() []string {
	var more []string
	for _, c := range Cgroups() {
		more = append(more, "cgroup "+c)
	}
	for _, m := range Mounts() {
		more = append(more, "mount "+m)
	}
	return Names.Leftovers(more, ContainerProcesses())
}
