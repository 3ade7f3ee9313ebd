//go:build !linux

package plugin

import (
	"errors"
	"net"
)

// peerCred is Linux-only (SO_PEERCRED); elsewhere every peer is refused
// when allowedPeers is set.
func peerCred(*net.UnixConn) (uid, gid uint32, err error) {
	return 0, 0, errors.New("peer credentials (SO_PEERCRED) need Linux")
}
