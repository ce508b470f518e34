package agent

import (
	"net"
	"os"
)

// notifyReady tells systemd (a unit of Type=notify, deploy/systemd) that
// the datapath is loaded, pinned and attached: units ordered after
// underpassd start only then. Podman's restart service matters most: the
// OCI hook of its containers refuses a container on an adopted parent
// while nothing is pinned. Without NOTIFY_SOCKET (not under systemd) there
// is nothing to do.
func notifyReady() error {
	sock := os.Getenv("NOTIFY_SOCKET")
	if sock == "" {
		return nil
	}
	if sock[0] == '@' { // an abstract socket
		sock = "\x00" + sock[1:]
	}
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		return err
	}
	defer c.Close()
	_, err = c.Write([]byte("READY=1"))
	return err
}
