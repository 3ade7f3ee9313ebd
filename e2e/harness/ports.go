package harness

import (
	"fmt"
	"net"
	"sync"
)

var handedOut struct {
	mu    sync.Mutex
	ports map[int]bool
}

// freePort returns a loopback port nobody listens on. The kernel picks it;
// the port is remembered so this process never hands it out twice (the
// kernel may offer a just-closed port again before its new owner binds it).
func freePort() (int, error) {
	handedOut.mu.Lock()
	defer handedOut.mu.Unlock()
	if handedOut.ports == nil {
		handedOut.ports = map[int]bool{}
	}
	for range 50 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return 0, err
		}
		port := l.Addr().(*net.TCPAddr).Port
		l.Close()
		if !handedOut.ports[port] {
			handedOut.ports[port] = true
			return port, nil
		}
	}
	return 0, fmt.Errorf("no free loopback port after 50 tries")
}
