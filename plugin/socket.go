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
)

// umaskMu serializes the umask change around socket creation: umask is
// process-wide, and the socket must never exist with wider permissions, not
// even for the instant between bind and chmod.
var umaskMu sync.Mutex

// Listen creates the Unix socket at path for the KMS v2 service.
//
// The path must be absolute; abstract sockets ("@name") are refused because
// they have no file permissions. A missing parent folder is created 0750. An
// existing file is removed only when it is a socket nobody answers on (a
// stale socket from a crashed plugin); a live socket or any other file is an
// error. The socket is 0600, or 0660 owned by group when group is set (a
// group name or numeric gid). Closing the listener removes the socket.
func Listen(path, group string) (net.Listener, error) {
	if strings.HasPrefix(path, "@") {
		return nil, fmt.Errorf("socket %q: abstract sockets have no file permissions and are refused; use a filesystem path", path)
	}
	if !filepath.IsAbs(path) {
		return nil, fmt.Errorf("socket %q: must be an absolute path", path)
	}
	gid := -1
	if group != "" {
		g, err := lookupGroup(group)
		if err != nil {
			return nil, err
		}
		gid = g
	}
	dir := filepath.Dir(path)
	createdDir := false
	switch fi, err := os.Stat(dir); {
	case errors.Is(err, fs.ErrNotExist):
		if err := os.MkdirAll(dir, 0o750); err != nil {
			return nil, fmt.Errorf("socket folder %s cannot be created (%v); create it or choose another socket path", dir, err)
		}
		createdDir = true
	case err != nil:
		return nil, fmt.Errorf("socket folder %s: %v; choose another socket path", dir, err)
	case !fi.IsDir():
		return nil, fmt.Errorf("socket folder %s is not a folder; choose another socket path", dir)
	}
	cleanup := func() {
		if createdDir {
			_ = os.Remove(dir)
		}
	}
	if err := removeStale(path); err != nil {
		cleanup()
		return nil, err
	}
	mode := os.FileMode(0o600)
	umask := 0o177
	if gid >= 0 {
		mode, umask = 0o660, 0o117
	}
	umaskMu.Lock()
	old := syscall.Umask(umask)
	l, err := net.Listen("unix", path)
	syscall.Umask(old)
	umaskMu.Unlock()
	if err != nil {
		cleanup()
		if errors.Is(err, fs.ErrPermission) {
			return nil, fmt.Errorf("socket %s: folder %s is not writable by this user; fix its permissions or choose another socket path", path, dir)
		}
		return nil, fmt.Errorf("socket %s: %w", path, err)
	}
	if gid >= 0 {
		if err := os.Chown(path, -1, gid); err != nil {
			l.Close()
			cleanup()
			return nil, fmt.Errorf("socket %s: chown to group %s: %w", path, group, err)
		}
	}
	if err := os.Chmod(path, mode); err != nil {
		l.Close()
		cleanup()
		return nil, fmt.Errorf("socket %s: chmod: %w", path, err)
	}
	return l, nil
}

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
		return fmt.Errorf("socket %s: a %s is in the way and will not be removed; delete it or choose another socket path", path, describeMode(fi.Mode()))
	}
	conn, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		conn.Close()
		return fmt.Errorf("socket %s is already served by another process; stop it or choose another socket path", path)
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
	}
	return "non-socket file"
}

func lookupGroup(group string) (int, error) {
	if gid, err := strconv.Atoi(group); err == nil {
		return gid, nil
	}
	g, err := user.LookupGroup(group)
	if err != nil {
		return 0, fmt.Errorf("socketGroup %q: no such group; create it or use a numeric gid", group)
	}
	return strconv.Atoi(g.Gid)
}
