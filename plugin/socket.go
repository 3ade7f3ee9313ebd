package plugin

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
)

// MaxSocketPath is the longest socket path Linux can bind: sun_path holds
// 108 bytes, the last of them the terminating NUL. A longer path fails at
// bind with a bare "invalid argument", so it is refused by name first.
const MaxSocketPath = 107

// MaxID is the largest uid or gid a process or file can have: 2^32-1 is
// (uid_t)-1, which chown reads as "leave unchanged" and no user holds.
const MaxID = 1<<32 - 2

// ErrSocketTaken is what Accept, and so grpc.Server.Serve, returns once
// another process holds the socket path: a live socket or a file the
// plugin must not remove took the place of its own. The plugin exits then,
// rather than compete with that process for the apiserver's connections.
var ErrSocketTaken = errors.New("socket path taken by another process")

// umaskMu serializes the umask change around socket creation: umask is
// process-wide, and the socket must never exist with wider permissions, not
// even for the instant between bind and chmod.
var umaskMu sync.Mutex

// SocketConfig configures NewSocket.
type SocketConfig struct {
	// Path is the absolute path of the socket, at most MaxSocketPath bytes.
	Path string
	// Group, when set (a group name or a numeric gid), makes the socket
	// 0660 in that group, and every folder NewSocket creates for it 0750
	// in that group, so the group's members can reach the socket.
	Group string
	// Peers, when it lists any uid or gid, is who may connect.
	Peers Peers
	// Logger receives the socket's events; nil discards them.
	Logger hclog.Logger
	// Metrics, when set, count lost sockets and refused peers.
	Metrics *Metrics
}

// Socket is the plugin's listening Unix socket. It is a net.Listener for
// grpc.Server.Serve that also guards the path it serves:
//
//   - The socket folder and every folder above it must be writable by no
//     one but root and the plugin's user (a world-writable folder only if
//     sticky and owned by root, like /tmp), and owned by one of them; else
//     any user could swap the socket for their own and receive the
//     apiserver's connections, seeds included.
//   - Check, which the service runs every check interval, notices when the
//     file at the path is no longer the socket this listener bound (by
//     device and inode): it binds the path again when the path is free,
//     and when another process holds it, Accept returns ErrSocketTaken.
//   - Close removes the path only while it is still this socket.
//   - With Peers set, Accept closes a connection from any other peer
//     before gRPC reads a byte of it.
//
// It is safe for concurrent use.
type Socket struct {
	path    string
	gid     int // -1: no group
	peers   Peers
	log     hclog.Logger
	m       *Metrics
	refused *peerLog

	mu sync.Mutex
	ln *net.UnixListener
	id fileID // the file ln is bound to
	// gen counts replacements of ln, so Accept can tell a listener closed
	// for a re-bind from one closed for good.
	gen int
	// created are the folders this socket made, outermost first; Close
	// removes them when empty.
	created []string
	// lost says why the path is not this socket ("" while it is).
	lost string
	// rebindErr is the last failed re-bind's message, to log each once.
	rebindErr string
	// fatal is set once another process holds the path.
	fatal  error
	closed bool
}

// fileID identifies a file: its device and inode numbers.
type fileID struct{ dev, ino uint64 }

func idOf(fi fs.FileInfo) fileID {
	st := fi.Sys().(*syscall.Stat_t)
	return fileID{dev: uint64(st.Dev), ino: st.Ino}
}

// Listen is NewSocket with only a path and an optional group: no peer
// rule, no logs, no metrics.
func Listen(path, group string) (*Socket, error) {
	return NewSocket(SocketConfig{Path: path, Group: group})
}

// NewSocket creates the Unix socket at cfg.Path for the KMS v2 service.
//
// The path must be absolute and fit sun_path; abstract sockets ("@name")
// are refused because they have no file permissions. The folders on the
// way must pass the checks described at Socket; missing ones are created
// 0750 (in cfg.Group when set). An existing file is removed only
// when it is a socket nobody answers on (a stale socket from a crashed
// plugin); a live socket or any other file is an error. The socket is
// 0600, or 0660 owned by cfg.Group when set. A failed start leaves no
// socket and no folder behind.
func NewSocket(cfg SocketConfig) (*Socket, error) {
	if err := validSocketPath(cfg.Path); err != nil {
		return nil, err
	}
	gid := -1
	if cfg.Group != "" {
		g, err := lookupGroup(cfg.Group)
		if err != nil {
			return nil, err
		}
		gid = g
	}
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	if cfg.Metrics == nil {
		cfg.Metrics = NewMetrics(nil)
	}
	ln, id, created, err := bind(cfg.Path, gid)
	if err != nil {
		return nil, err
	}
	return &Socket{
		path: cfg.Path, gid: gid, peers: cfg.Peers, log: cfg.Logger, m: cfg.Metrics,
		refused: newPeerLog(cfg.Metrics), ln: ln, id: id, created: created,
	}, nil
}

// validSocketPath refuses what the kernel would refuse with a vague error,
// and abstract sockets.
func validSocketPath(path string) error {
	switch {
	case strings.HasPrefix(path, "@"):
		return fmt.Errorf("socket %q: abstract sockets have no file permissions and are refused; use a filesystem path", path)
	case !filepath.IsAbs(path):
		return fmt.Errorf("socket %q: must be an absolute path", path)
	case len(path) > MaxSocketPath:
		return fmt.Errorf("socket %q: %d bytes, over the %d-byte limit of a Unix socket path (sun_path is 108 bytes with the final NUL); choose a shorter path", path, len(path), MaxSocketPath)
	}
	return nil
}

// bind makes the socket folder if needed, removes a stale socket, and
// binds path with its final mode and group. It returns the folders it
// created; on error it has removed them again.
func bind(path string, gid int) (*net.UnixListener, fileID, []string, error) {
	dir := filepath.Dir(path)
	created, err := makeFolder(dir, gid)
	if err != nil {
		return nil, fileID{}, nil, err
	}
	ln, id, err := bindSocket(path, gid)
	if err != nil {
		removeFolders(created)
		return nil, fileID{}, nil, err
	}
	return ln, id, created, nil
}

// bindSocket binds path under a umask that never lets the socket exist
// with wider permissions, then sets its group and mode and records which
// file it is.
func bindSocket(path string, gid int) (*net.UnixListener, fileID, error) {
	if err := removeStale(path); err != nil {
		return nil, fileID{}, err
	}
	mode, umask := os.FileMode(0o600), 0o177
	if gid >= 0 {
		mode, umask = 0o660, 0o117
	}
	umaskMu.Lock()
	old := syscall.Umask(umask)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	syscall.Umask(old)
	umaskMu.Unlock()
	if err != nil {
		if errors.Is(err, fs.ErrPermission) {
			return nil, fileID{}, fmt.Errorf("socket %s: folder %s is not writable by this user; fix its permissions or choose another socket path", path, filepath.Dir(path))
		}
		return nil, fileID{}, fmt.Errorf("socket %s: %w", path, err)
	}
	// Unlinking is done by hand in Close, after checking the path is
	// still this socket.
	ln.SetUnlinkOnClose(false)
	fail := func(err error) (*net.UnixListener, fileID, error) {
		ln.Close()
		_ = os.Remove(path)
		return nil, fileID{}, fmt.Errorf("socket %s: %w", path, err)
	}
	if gid >= 0 {
		if err := os.Chown(path, -1, gid); err != nil {
			return fail(err)
		}
	}
	if err := os.Chmod(path, mode); err != nil {
		return fail(err)
	}
	fi, err := os.Lstat(path)
	if err != nil {
		return fail(err)
	}
	return ln, idOf(fi), nil
}

// makeFolder checks the folders that exist on the way to dir (see
// checkFolders) and creates the missing ones 0750, in group gid when set,
// so the group can traverse them. It returns what it created, outermost
// first.
func makeFolder(dir string, gid int) ([]string, error) {
	var missing []string
	d := dir
	for {
		fi, err := os.Stat(d)
		if errors.Is(err, fs.ErrNotExist) {
			missing = append(missing, d)
			d = filepath.Dir(d)
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("socket folder %s: %v; choose another socket path", d, err)
		}
		if !fi.IsDir() {
			return nil, fmt.Errorf("socket folder %s is not a folder; choose another socket path", d)
		}
		break
	}
	if err := checkFolders(d, d == dir, uint32(os.Geteuid())); err != nil { //nolint:gosec // G115: a uid is never negative
		return nil, err
	}
	var created []string
	for i := len(missing) - 1; i >= 0; i-- {
		if err := mkdirGroup(missing[i], gid); err != nil {
			removeFolders(created)
			return nil, fmt.Errorf("socket folder %s cannot be created (%v); create it or choose another socket path", dir, err)
		}
		created = append(created, missing[i])
	}
	return created, nil
}

// mkdirGroup makes one folder 0750 (whatever the umask) in group gid.
func mkdirGroup(d string, gid int) error {
	if err := os.Mkdir(d, 0o750); err != nil {
		return err
	}
	err := os.Chmod(d, 0o750) //nolint:gosec // G302: the group must traverse the socket folder; others get nothing
	if err == nil && gid >= 0 {
		err = os.Chown(d, -1, gid)
	}
	if err != nil {
		_ = os.Remove(d)
	}
	return err
}

// removeFolders removes folders (outermost first) innermost first, each
// only if empty.
func removeFolders(dirs []string) {
	for i := len(dirs) - 1; i >= 0; i-- {
		_ = os.Remove(dirs[i])
	}
}

// checkFolders refuses dir, or any folder above it, that a user other
// than root and the plugin's user could change, as ssh's StrictModes
// does: whoever can write a folder on the way can replace the socket (or
// a folder holding it) with their own and receive the apiserver's
// connections. A world-writable folder is accepted when it is sticky and
// owned by root, like /tmp: there only a file's owner can remove or
// rename it. isSocketFolder says whether dir holds the socket itself, for
// the message; uid is the plugin's user.
func checkFolders(dir string, isSocketFolder bool, euid uint32) error {
	real, err := filepath.EvalSymlinks(dir)
	if err != nil {
		return fmt.Errorf("socket folder %s: %v; choose another socket path", dir, err)
	}
	what := "folder %s above the socket"
	if isSocketFolder {
		what = "socket folder %s"
	}
	for d := real; ; d = filepath.Dir(d) {
		fi, err := os.Lstat(d)
		if err != nil {
			return fmt.Errorf("socket folder %s: %v; choose another socket path", d, err)
		}
		st := fi.Sys().(*syscall.Stat_t)
		name := fmt.Sprintf(what, d)
		switch {
		case fi.Mode().Perm()&0o002 != 0 && (fi.Mode()&fs.ModeSticky == 0 || st.Uid != 0):
			return fmt.Errorf("%s is writable by every user (mode %04o), so any user could replace the socket; run chmod o-w %s (world-writable is accepted only when sticky and owned by root, like /tmp)", name, fi.Mode().Perm(), d)
		case st.Uid != 0 && st.Uid != euid:
			return fmt.Errorf("%s is owned by uid %d, neither root nor this plugin's user (uid %d), so that user could replace the socket; chown it to root or uid %d, or choose another socket path", name, st.Uid, euid, euid)
		}
		if d == filepath.Dir(d) {
			return nil
		}
		what = "folder %s above the socket"
	}
}

// CheckSocketFolder applies, without creating or binding anything, the
// rules NewSocket applies to the folders of socket path for a plugin
// running as uid: the path's shape, and that no folder on the way that
// exists can be changed by another user. A missing socket folder is not an
// error (NewSocket creates it); missing reports it.
func CheckSocketFolder(path string, uid uint32) (missing bool, err error) {
	if err := validSocketPath(path); err != nil {
		return false, err
	}
	dir := filepath.Dir(path)
	d := dir
	for {
		fi, err := os.Stat(d)
		if errors.Is(err, fs.ErrNotExist) {
			d = filepath.Dir(d)
			continue
		}
		if err != nil {
			return false, fmt.Errorf("socket folder %s: %v; choose another socket path", d, err)
		}
		if !fi.IsDir() {
			return false, fmt.Errorf("socket folder %s is not a folder; choose another socket path", d)
		}
		break
	}
	return d != dir, checkFolders(d, d == dir, uid)
}

// heldError is a path held by something the plugin must not remove: a
// live socket, or a file that is not a socket.
type heldError struct {
	msg string
	// what holds the path, for the message when it happens at run time.
	what string
}

func (e *heldError) Error() string { return e.msg }

// removeStale removes path if it is a socket that nobody serves.
func removeStale(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("socket %s: %w", path, err)
	}
	if fi.Mode()&fs.ModeSocket == 0 {
		kind := describeMode(fi.Mode())
		return &heldError{
			msg:  fmt.Sprintf("socket %s: a %s is in the way and will not be removed; delete it or choose another socket path", path, kind),
			what: "a " + kind + ", which the plugin will not remove; delete it",
		}
	}
	conn, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		conn.Close()
		return &heldError{
			msg:  fmt.Sprintf("socket %s is already served by another process; stop it or choose another socket path", path),
			what: "another process's live socket; stop that process or give each plugin its own socket path",
		}
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("socket %s exists and its state is unclear (%v); remove it by hand if no plugin runs", path, err)
	}
	if err := os.Remove(path); err != nil {
		return fmt.Errorf("socket %s: removing stale socket: %w", path, err)
	}
	return nil
}

func describeMode(m fs.FileMode) string {
	switch {
	case m.IsDir():
		return "folder"
	case m&fs.ModeSymlink != 0:
		return "symbolic link"
	case m.IsRegular():
		return "regular file"
	case m&fs.ModeSocket != 0:
		return "socket"
	}
	return "non-socket file"
}

// lookupGroup resolves a group name or numeric gid. A number must be a
// real gid: "-1" once passed through as "no group" and left the socket
// 0600 without a word.
func lookupGroup(group string) (int, error) {
	if n, err := strconv.ParseInt(group, 10, 64); err == nil {
		if n < 0 || n > MaxID {
			return 0, fmt.Errorf("socketGroup %q: want a group name or a gid from 0 to %d", group, int64(MaxID))
		}
		return int(n), nil
	}
	g, err := user.LookupGroup(group)
	if err != nil {
		return 0, fmt.Errorf("socketGroup %q: no such group; create it or use a numeric gid", group)
	}
	return strconv.Atoi(g.Gid)
}

// Accept waits for the next connection from an allowed peer. A listener
// replaced by a re-bind is followed to its successor, so gRPC never sees
// the swap; once another process holds the path it returns ErrSocketTaken.
func (s *Socket) Accept() (net.Conn, error) {
	for {
		s.mu.Lock()
		ln, gen, fatal := s.ln, s.gen, s.fatal
		s.mu.Unlock()
		if fatal != nil {
			return nil, fatal
		}
		c, err := ln.AcceptUnix()
		if err != nil {
			s.mu.Lock()
			fatal, swapped := s.fatal, !s.closed && s.gen != gen
			s.mu.Unlock()
			switch {
			case fatal != nil:
				return nil, fatal
			case swapped:
				continue
			}
			return nil, err
		}
		if s.admit(c) {
			return c, nil
		}
		c.Close()
	}
}

// Addr is the socket's address.
func (s *Socket) Addr() net.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.ln.Addr()
}

// Close stops listening and removes the socket file, but only while the
// path is still the socket this listener bound: another instance that
// took the path keeps its socket. Folders NewSocket created are removed
// when empty. Close may be called more than once.
func (s *Socket) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	err := s.ln.Close()
	if s.fatal != nil {
		err = nil // closed when the path was taken
	}
	if fi, lerr := os.Lstat(s.path); lerr == nil && idOf(fi) == s.id {
		_ = os.Remove(s.path)
	}
	removeFolders(s.created)
	return err
}

// Check makes sure the path is still the socket this listener bound, and
// repairs what it can: a path found free (deleted, or a stale socket) is
// bound again; a path another process holds makes Accept return
// ErrSocketTaken. It returns nil while the socket is served at its path,
// else why not, for health. The service calls it every check interval.
func (s *Socket) Check() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed || s.fatal != nil {
		return s.fatal
	}
	if s.lost == "" {
		why := s.verifyLocked()
		if why == "" {
			return nil
		}
		s.lost = why
		s.m.socketLost.Inc()
		s.log.Error("socket lost: new connections cannot reach the plugin; binding it again", "socket", s.path, "reason", why)
	}
	return s.rebindLocked()
}

// verifyLocked says how the path differs from the bound socket, or "".
func (s *Socket) verifyLocked() string {
	fi, err := os.Lstat(s.path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return "deleted"
	case err != nil:
		return "cannot be checked: " + err.Error()
	case idOf(fi) != s.id:
		return "replaced by another " + describeMode(fi.Mode())
	}
	return ""
}

// rebindLocked binds the path again after a loss, or gives up on it for
// good when another process holds it.
func (s *Socket) rebindLocked() error {
	ln, id, created, err := bind(s.path, s.gid)
	var held *heldError
	switch {
	case errors.As(err, &held):
		s.fatal = &takenError{fmt.Sprintf("socket %s was replaced by %s, then restart the plugin; exiting rather than compete for the apiserver's connections", s.path, held.what)}
		s.ln.Close() // Accept returns fatal; the plugin prints it as it exits
		return s.fatal
	case err != nil:
		if msg := err.Error(); msg != s.rebindErr {
			s.rebindErr = msg
			s.log.Error("cannot bind the socket again; retrying every check", "socket", s.path, "error", msg)
		}
		return fmt.Errorf("socket %s %s and not bound again: %v", s.path, s.lost, err)
	}
	old := s.ln
	s.ln, s.id, s.gen = ln, id, s.gen+1
	s.created = append(s.created, created...)
	s.log.Info("socket bound again", "socket", s.path, "was", s.lost)
	s.lost, s.rebindErr = "", ""
	old.Close()
	return nil
}

// takenError is ErrSocketTaken with the details in its message.
type takenError struct{ msg string }

func (e *takenError) Error() string        { return e.msg }
func (e *takenError) Is(target error) bool { return target == ErrSocketTaken }
