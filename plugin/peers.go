package plugin

import (
	"net"
	"slices"
	"sync"
)

// Peers is who may connect to the socket, by the credentials the kernel
// records for the connecting process (SO_PEERCRED): its uid, and its
// effective primary gid (supplementary groups are not reported). A peer
// whose uid is in UIDs or whose gid is in GIDs is served. Both empty:
// anyone the socket's file mode lets connect.
//
// File modes decide who may open the socket; this decides who is served
// once connected, and it still holds when the mode or group of the socket
// or its folder is wider than intended.
type Peers struct {
	UIDs []uint32
	GIDs []uint32
}

// Any reports whether the rule admits every peer (nothing is listed).
func (p Peers) Any() bool { return len(p.UIDs) == 0 && len(p.GIDs) == 0 }

// Allows reports whether a peer with uid and gid may connect.
func (p Peers) Allows(uid, gid uint32) bool {
	return p.Any() || slices.Contains(p.UIDs, uid) || slices.Contains(p.GIDs, gid)
}

// admit checks a new connection's peer against the rule; a refused one is
// counted and logged (see peerLog), and the caller closes it.
func (s *Socket) admit(c *net.UnixConn) bool {
	if s.peers.Any() {
		return true
	}
	uid, gid, err := peerCred(c)
	if err != nil {
		// Fail closed: a peer that cannot be identified is not served.
		s.m.peersRefused.Inc()
		s.refused.note(s, refusedUnknown, 0, err)
		return false
	}
	if s.peers.Allows(uid, gid) {
		return true
	}
	s.m.peersRefused.Inc()
	s.refused.note(s, uid, gid, nil)
	return false
}

// Budget of lines about refused peers: each uid is logged once (the
// counter kms_plugin_peers_refused_total has every refusal), and at most
// peerLogBurst new uids at once, then peerLogRate a second, so a process
// cycling through uids (in a user namespace, say) cannot flood the log.
const (
	peerLogRate  = 1
	peerLogBurst = 10
	// maxLoggedUIDs bounds the memory of uids already logged; past it,
	// only the budget limits the lines.
	maxLoggedUIDs = 1024
	// refusedUnknown stands for a peer whose credentials could not be read.
	refusedUnknown = ^uint32(0)
)

// peerLog remembers which refused uids were logged. It is safe for
// concurrent use.
type peerLog struct {
	budget *logBudget
	mu     sync.Mutex
	seen   map[uint32]bool
}

func newPeerLog(m *Metrics) *peerLog {
	return &peerLog{
		budget: newLogBudget(peerLogRate, peerLogBurst, m.logsDropped.WithLabelValues(reasonRateLimited)),
		seen:   map[uint32]bool{},
	}
}

// note logs a refused peer, once per uid and within the budget.
func (l *peerLog) note(s *Socket, uid, gid uint32, err error) {
	l.mu.Lock()
	first := !l.seen[uid]
	if first && len(l.seen) < maxLoggedUIDs {
		l.seen[uid] = true
	}
	l.mu.Unlock()
	if !first {
		return
	}
	ok, dropped := l.budget.take()
	if !ok {
		return
	}
	if err != nil {
		s.log.Warn("peer refused: its credentials cannot be read; connection closed", "socket", s.path, "error", err, "dropped_before", dropped)
		return
	}
	s.log.Warn("peer refused: uid and gid not in allowedPeers; connection closed (logged once per uid)", "socket", s.path, "uid", uid, "gid", gid, "dropped_before", dropped)
}
