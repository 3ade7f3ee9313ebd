// Package secretfile reads the files that hold secrets (a keyset, a PIN, a
// client secret or certificate) only after proving that no other local user
// can read or replace them. Mode bits alone prove neither: a 0600 file owned
// by another user is that user's to rewrite, and a 0600 file in a folder
// others can write is theirs to swap. So a file is trusted when its own
// shape (owner, group, mode, type) and every folder on its path pass, the
// rule ssh's StrictModes applies to authorized_keys.
//
// Which owners are trusted depends on who reads: the serving plugin trusts
// only itself and root, while kmsctl run as root is the administrator's
// tool and manages files owned by the plugin's user. That is a property of
// the process, so each command states its Role once at start (SetRole)
// rather than threading it through every backend's Open.
package secretfile

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sync/atomic"
	"syscall"
)

// Role says whose rules decide which owners a secret file may have.
type Role int32

const (
	// Serving is the plugin: a file is trusted when its owner is this
	// process's uid or root, mode 0600 (or 0400); or owned by root, mode
	// 0640 (or 0440), with a group this process is in. The second shape
	// lets the plugin read a keyset it cannot change.
	Serving Role = iota
	// Admin is kmsctl: as root it also manages files owned by any other
	// user (the plugin's), and keeps that owner when it rewrites them.
	Admin
)

var role atomic.Int32

// SetRole sets the role of this process; the default is Serving, the
// stricter one.
func SetRole(r Role) { role.Store(int32(r)) }

// CurrentRole returns the role set by SetRole.
func CurrentRole() Role { return Role(role.Load()) }

// MaxSize is the largest secret file read: a keyset of a few hundred
// versions is well under it, and a path that names a log or a device must
// fail with a clear line instead of being read into memory.
const MaxSize = 4 << 20

// Open opens path for reading after proving it trustworthy: every folder
// on its path (as written, and after symbolic links) passes CheckFolders,
// and the opened file passes CheckShape. The file is opened non-blocking
// and checked through the open handle, so a FIFO in its place is refused
// instead of hanging, and the file read is the file checked. field names
// the configuration field that points at path, so errors say what to fix.
func Open(field, path string) (*os.File, fs.FileInfo, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, nil, openError(field, path, err)
	}
	fi, err := f.Stat()
	if err == nil {
		err = CheckShape(field, path, fi)
	}
	if err == nil {
		err = CheckFolders(field, path, fi)
	}
	if err != nil {
		f.Close()
		return nil, nil, err
	}
	return f, fi, nil
}

// Read opens path with Open and returns its content. A file holding
// nothing but white space is refused: no backend accepts an empty secret,
// and the backend's own error would not say which file is wrong. Callers
// trim what their format allows.
func Read(field, path string) ([]byte, error) {
	f, _, err := Open(field, path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, MaxSize+1))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", field, err)
	}
	if len(b) > MaxSize {
		return nil, fmt.Errorf("%s %s is larger than %d bytes; point %s at the secret file", field, path, MaxSize, field)
	}
	if len(bytes.TrimSpace(b)) == 0 {
		return nil, fmt.Errorf("%s %s is empty; write the secret into it", field, path)
	}
	return b, nil
}

// openError names this process's uid and the fix when the file cannot be
// read for lack of permission, the usual mistake after a root-run tool
// wrote it.
func openError(field, path string, err error) error {
	if errors.Is(err, fs.ErrPermission) {
		uid := os.Geteuid()
		return fmt.Errorf("%s %s is not readable by uid %d; run chown %d %s && chmod 600 %s, or chown root:GROUP %s && chmod 640 %s with uid %d in GROUP: %w",
			field, path, uid, uid, path, path, path, path, uid, err)
	}
	return fmt.Errorf("%s: %w", field, err)
}

// CheckShape refuses a file that is not a regular file, or whose owner,
// group and mode let someone other than this process (and root) read or
// change it, under the rules of CurrentRole.
func CheckShape(field, path string, fi fs.FileInfo) error {
	return self().checkShape(field, path, fi)
}

// identity is who reads: the rules of CheckShape and CheckFolders depend
// on it, and tests vary it without changing uid.
type identity struct {
	uid     int
	inGroup func(gid int) bool
	role    Role
}

// self is this process.
func self() identity {
	return identity{uid: os.Geteuid(), inGroup: inGroup, role: CurrentRole()}
}

func (id identity) checkShape(field, path string, fi fs.FileInfo) error {
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("%s %s is not a regular file (%s); point %s at a file that holds the secret", field, path, fi.Mode().Type(), field)
	}
	uid, gid := Owner(fi)
	perm := fi.Mode().Perm()
	self := id.uid
	switch {
	case perm&0o007 != 0 || perm&0o020 != 0:
		return fmt.Errorf("%s %s has mode %04o, which lets other users read or change it; run chmod 600 %s", field, path, perm, path)
	case uid != self && uid != 0 && !(id.role == Admin && self == 0):
		return fmt.Errorf("%s %s is owned by uid %d, who could replace it; this process runs as uid %d: run chown %d %s", field, path, uid, self, self, path)
	case perm&0o040 == 0:
		return nil
	case uid != 0:
		return fmt.Errorf("%s %s has mode %04o but is owned by uid %d; a group-readable secret must be owned by root (chown root:GROUP %s) or private (chmod 600 %s)", field, path, perm, uid, path, path)
	case self != 0 && !id.inGroup(gid):
		return fmt.Errorf("%s %s is group-readable by gid %d, which uid %d is not in; add the user to that group, or chown %d %s && chmod 600 %s", field, path, gid, self, self, path, path)
	}
	return nil
}

// CheckFolders refuses a file when any folder above it, on the path as
// written or after symbolic links, can be written by a user other than
// root, the file's owner or this process: that user could rename another
// file into its place. A sticky folder owned by root, like /tmp, is
// accepted, since there only a file's owner may rename it.
func CheckFolders(field, path string, fi fs.FileInfo) error {
	return self().checkFolders(field, path, fi)
}

func (id identity) checkFolders(field, path string, fi fs.FileInfo) error {
	fileUID, _ := Owner(fi)
	dirs := ancestors(path)
	if real, err := filepath.EvalSymlinks(path); err == nil && real != path {
		dirs = append(dirs, ancestors(real)...)
	}
	for _, dir := range dirs {
		if err := id.checkFolder(field, path, dir, fileUID); err != nil {
			return err
		}
	}
	return nil
}

func (id identity) checkFolder(field, path, dir string, fileUID int) error {
	di, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("%s %s: folder %s: %w", field, path, dir, err)
	}
	uid, _ := Owner(di)
	perm := di.Mode().Perm()
	if di.Mode()&fs.ModeSticky != 0 && uid == 0 {
		return nil
	}
	if perm&0o022 != 0 {
		if di.Mode()&fs.ModeSticky != 0 {
			perm |= 0o1000
		}
		return fmt.Errorf("%s %s is in folder %s with mode %04o, which other users can write to swap the file; run chmod go-w %s", field, path, dir, perm, dir)
	}
	if uid != 0 && uid != id.uid && uid != fileUID {
		return fmt.Errorf("%s %s is in folder %s owned by uid %d, who could swap the file; run chown root %s", field, path, dir, uid, dir)
	}
	return nil
}

// ancestors lists the folders above path, nearest first, up to the root.
func ancestors(path string) []string {
	abs, err := filepath.Abs(path)
	if err != nil {
		abs = path
	}
	var dirs []string
	for dir := filepath.Dir(abs); ; dir = filepath.Dir(dir) {
		dirs = append(dirs, dir)
		if dir == filepath.Dir(dir) {
			return dirs
		}
	}
}

// Owner returns the uid and gid of the file fi describes.
func Owner(fi fs.FileInfo) (uid, gid int) {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return int(st.Uid), int(st.Gid)
	}
	return -1, -1
}

// inGroup reports whether this process is in group gid.
func inGroup(gid int) bool {
	if os.Getegid() == gid {
		return true
	}
	groups, err := os.Getgroups()
	return err == nil && slices.Contains(groups, gid)
}
