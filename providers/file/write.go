package file

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/kms-v2/kms-plugin/providers/secretfile"
)

// LockTimeout is how long a key change waits for another one to finish.
// Changes take milliseconds; a lock held longer is a stuck or hostile
// holder, and the operator must hear about it rather than wait forever.
var LockTimeout = 30 * time.Second

// writer is one locked read-modify-write session on a keyset file. It
// works on the symbolic link's target, so a keyset on shared storage
// reached through a link gets the new version, and every kmsctl agrees on
// which folder to lock whichever name it was given.
type writer struct {
	target string   // the keyset path after symbolic links
	lock   *os.File // the held lock file
}

// beginWrite resolves path, takes the keyset's lock and removes temp files
// that a killed write left behind. Call end when done.
func beginWrite(ctx context.Context, path string) (*writer, error) {
	target, err := resolve(path)
	if err != nil {
		return nil, err
	}
	lock, err := lockKeyset(ctx, target)
	if err != nil {
		return nil, err
	}
	w := &writer{target: target, lock: lock}
	if err := w.removeStaleTemps(); err != nil {
		w.end()
		return nil, err
	}
	return w, nil
}

// end releases the lock.
func (w *writer) end() {
	_ = syscall.Flock(int(w.lock.Fd()), syscall.LOCK_UN)
	w.lock.Close()
}

// resolve returns path with every symbolic link followed. A path that does
// not exist yet (keys init) resolves its folder only.
func resolve(path string) (string, error) {
	real, err := filepath.EvalSymlinks(path)
	if err == nil {
		return real, nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return "", fmt.Errorf("keyset %s: %w", path, err)
	}
	if _, lerr := os.Lstat(path); lerr == nil {
		return "", fmt.Errorf("keyset %s is a symbolic link to a missing file; create the target or remove the link", path)
	}
	dir, err := filepath.EvalSymlinks(filepath.Dir(path))
	if err != nil {
		return "", fmt.Errorf("keyset folder %s: %w; create it first", filepath.Dir(path), err)
	}
	return filepath.Join(dir, filepath.Base(path)), nil
}

// lockPath is the lock file of the keyset at target. A private lock file,
// not the folder: any user who can read a folder can flock it, while the
// lock file only opens for its owner and root.
func lockPath(target string) string {
	return filepath.Join(filepath.Dir(target), "."+filepath.Base(target)+".lock")
}

// lockKeyset takes the keyset's exclusive lock, waiting at most
// LockTimeout, so two kmsctl runs never interleave read-modify-write
// cycles and a stuck holder is named instead of waited on forever.
func lockKeyset(ctx context.Context, target string) (*os.File, error) {
	name := lockPath(target)
	f, err := os.OpenFile(name, os.O_RDWR|os.O_CREATE|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0o600)
	if err != nil {
		return nil, fmt.Errorf("keyset lock %s: %w; remove it if it is not a regular file owned by the keyset's owner", name, err)
	}
	if err := checkLockFile(f, name, target); err != nil {
		f.Close()
		return nil, err
	}
	deadline := time.Now().Add(LockTimeout)
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return f, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("keyset lock %s: %w", name, err)
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			f.Close()
			return nil, fmt.Errorf("keyset %s is locked by another process for over %s (another key change, or a stuck one); find it with `lslocks | grep %s` and retry when it ends", target, LockTimeout, filepath.Base(name))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// checkLockFile refuses a lock file someone else planted, and hands a new
// one to the keyset's owner, so the plugin's user can run kmsctl after root
// did.
func checkLockFile(f *os.File, name, target string) error {
	fi, err := f.Stat()
	if err != nil {
		return fmt.Errorf("keyset lock %s: %w", name, err)
	}
	if err := secretfile.CheckShape("keyset lock", name, fi); err != nil {
		return err
	}
	ki, err := os.Stat(target)
	if errors.Is(err, fs.ErrNotExist) || os.Geteuid() != 0 {
		return nil // keys init: the keyset does not exist yet
	}
	if err != nil {
		return fmt.Errorf("keyset %s: %w", target, err)
	}
	uid, gid := secretfile.Owner(ki)
	if lu, lg := secretfile.Owner(fi); lu != uid || lg != gid {
		if err := f.Chown(uid, gid); err != nil {
			return fmt.Errorf("keyset lock %s: %w", name, err)
		}
	}
	return nil
}

// tempPattern names the temp files of the keyset at target.
func tempPattern(target string) string { return "." + filepath.Base(target) + ".tmp-" }

// removeStaleTemps removes temp files a killed write left behind. Under
// the lock no write is in flight, so every one of them is stale, and each
// holds key material.
func (w *writer) removeStaleTemps() error {
	dir := filepath.Dir(w.target)
	entries, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("keyset folder %s: %w", dir, err)
	}
	prefix := tempPattern(w.target)
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), prefix) && e.Type().IsRegular() {
			if err := os.Remove(filepath.Join(dir, e.Name())); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return fmt.Errorf("removing stale keyset temp file: %w", err)
			}
		}
	}
	return nil
}

// write replaces the keyset with data: a temp file in the same folder
// (0600 from its creation, so key material is never readable by others),
// given the current file's owner, group and mode, synced, renamed over the
// target, and the folder synced. A reader (a running plugin) sees the old
// file or the new one, never a partial one. On any error the keyset is
// unchanged and the temp file is gone.
func (w *writer) write(data []byte) error {
	tmp, err := os.CreateTemp(filepath.Dir(w.target), tempPattern(w.target)+"*")
	if err != nil {
		return fmt.Errorf("keyset %s unchanged: %w", w.target, err)
	}
	defer os.Remove(tmp.Name()) // no-op after a successful rename
	err = fill(tmp, data, w.target)
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), w.target)
	}
	if err != nil {
		return fmt.Errorf("keyset %s unchanged: %w", w.target, err)
	}
	d, err := os.Open(filepath.Dir(w.target))
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// fill writes data to the temp file and gives it the owner, group and mode
// of the keyset it replaces (0600 and this process's owner for a new one).
func fill(tmp *os.File, data []byte, target string) error {
	if _, err := tmp.Write(data); err != nil {
		return err
	}
	if err := tmp.Sync(); err != nil {
		return err
	}
	old, err := os.Stat(target)
	if errors.Is(err, fs.ErrNotExist) {
		return tmp.Chmod(0o600)
	}
	if err != nil {
		return err
	}
	uid, gid := secretfile.Owner(old)
	if uid != os.Geteuid() || gid != os.Getegid() {
		if err := tmp.Chown(uid, gid); err != nil {
			return fmt.Errorf("keeping owner %d:%d: %w", uid, gid, err)
		}
	}
	return tmp.Chmod(old.Mode().Perm())
}
