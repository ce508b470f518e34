package agent_test

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/underpass-cni/underpass/internal/loader"
	"github.com/underpass-cni/underpass/internal/testutil"
	"github.com/underpass-cni/underpass/test/netenv"
)

// Under systemd (deploy/systemd: Type=notify) underpassd says READY=1 on
// $NOTIFY_SOCKET once the datapath is pinned, so what is ordered after it
// (Podman's restart service, whose containers' OCI hook needs the pins)
// finds them. Here the test plays systemd's socket.
func TestNotifiesSystemdWhenReady(t *testing.T) {
	l := newLab(t, netenv.Options{})
	l.writeConfig("")
	path := filepath.Join(t.TempDir(), "notify")
	sock, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	must(t, err)
	defer sock.Close()
	cmd := l.Node.Command(context.Background(), agentBin, "--config", l.cfg)
	cmd.Env = append(os.Environ(), "NOTIFY_SOCKET="+path)
	ag := &agent{Agent: testutil.StartAgent(t, "underpassd", cmd, 0), l: l}
	must(t, sock.SetReadDeadline(time.Now().Add(60*time.Second)))
	buf := make([]byte, 64)
	n, err := sock.Read(buf)
	if err != nil || string(buf[:n]) != "READY=1" {
		t.Fatalf("systemd's socket got %q (%v), want READY=1", buf[:n], err)
	}
	dp, err := loader.Open(l.dir)
	if err != nil {
		t.Fatalf("READY=1 came before the datapath was pinned: %v", err)
	}
	dp.Close()
	ag.stop()
}
