package file

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kms-v2/kms-plugin/providers/secretfile"
)

// TestWriteThroughSymlink: a keyset reached through a link (a shared
// mount) gets the new version at the target; the link stays a link, and
// the lock is taken in the target's folder.
func TestWriteThroughSymlink(t *testing.T) {
	cfg := newKeyset(t)
	link := filepath.Join(t.TempDir(), "keyset.json")
	if err := os.Symlink(cfg.Path, link); err != nil {
		t.Fatal(err)
	}
	p := open(t, Config{Path: link})
	v, err := p.CreateVersion(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Lstat(link); err != nil || fi.Mode()&os.ModeSymlink == 0 {
		t.Fatalf("after a write the link is %v, %v; want it still a symbolic link", fi.Mode(), err)
	}
	target := open(t, cfg)
	if _, err := find(target.current(), v.KeyID); err != nil {
		t.Fatalf("the link's target does not have the new version: %v", err)
	}
	if _, err := os.Stat(lockPath(cfg.Path)); err != nil {
		t.Fatalf("no lock file next to the target: %v", err)
	}
	if _, err := os.Lstat(lockPath(link)); err == nil {
		t.Fatal("a lock file was made next to the link, not the target")
	}
}

// TestFolderFlockDoesNotBlock: any user who can read the folder could
// flock it and stall every key change; the lock is a private file now.
func TestFolderFlockDoesNotBlock(t *testing.T) {
	cfg := newKeyset(t)
	d, err := os.Open(filepath.Dir(cfg.Path))
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if err := syscall.Flock(int(d.Fd()), syscall.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	setLockTimeout(t, 2*time.Second)
	if _, err := open(t, cfg).CreateVersion(context.Background()); err != nil {
		t.Fatalf("CreateVersion with the folder flocked by someone: %v", err)
	}
}

// TestLockTimeout: a held keyset lock ends the wait with a line that says
// what holds it and how to find it.
func TestLockTimeout(t *testing.T) {
	cfg := newKeyset(t)
	p := open(t, cfg)
	holder := exec.Command("flock", lockPath(cfg.Path), "sleep", "30")
	if err := os.WriteFile(lockPath(cfg.Path), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := holder.Start(); err != nil {
		t.Fatalf("flock(1): %v", err)
	}
	t.Cleanup(func() { _ = holder.Process.Kill(); _ = holder.Wait() })
	waitLocked(t, lockPath(cfg.Path))
	setLockTimeout(t, 300*time.Millisecond)
	start := time.Now()
	_, err := p.CreateVersion(context.Background())
	if err == nil || !strings.Contains(err.Error(), "locked by another process") || !strings.Contains(err.Error(), "lslocks") {
		t.Fatalf("CreateVersion under a held lock: %v; want a lock timeout naming lslocks", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("the lock wait took %v, past its 300ms timeout", d)
	}
}

// waitLocked waits until someone holds the lock file.
func waitLocked(t *testing.T, path string) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
			return
		}
		_ = syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
	}
	t.Fatal("flock(1) never took the lock")
}

func setLockTimeout(t *testing.T, d time.Duration) {
	old := LockTimeout
	LockTimeout = d
	t.Cleanup(func() { LockTimeout = old })
}

// TestStaleTempsRemoved: the temp file a killed write left (holding key
// material) is removed by the next key change.
func TestStaleTempsRemoved(t *testing.T) {
	cfg := newKeyset(t)
	stale := filepath.Join(filepath.Dir(cfg.Path), ".keyset.json.tmp-123456")
	if err := os.WriteFile(stale, []byte("key material"), 0o600); err != nil {
		t.Fatal(err)
	}
	other := filepath.Join(filepath.Dir(cfg.Path), ".other.json.tmp-1")
	if err := os.WriteFile(other, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := open(t, cfg).CreateVersion(context.Background()); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(stale); !os.IsNotExist(err) {
		t.Fatalf("stale temp file still there after a key change (%v)", err)
	}
	if _, err := os.Stat(other); err != nil {
		t.Fatalf("another keyset's temp file was removed: %v", err)
	}
}

// TestTrailingBytesRefused: data after the keyset document is a botched
// edit or an append, never ours.
func TestTrailingBytesRefused(t *testing.T) {
	cfg := newKeyset(t)
	f, err := os.OpenFile(cfg.Path, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteString(`{"name":"attacker"}`); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if _, err := New(context.Background(), cfg, nil); err == nil || !strings.Contains(err.Error(), "data after the keyset document") {
		t.Fatalf("New with trailing data: %v; want a refusal", err)
	}
}

// TestFIFOKeysetDoesNotHang: a FIFO at the keyset path hung serve and
// kmsctl forever; every path now refuses it at once.
func TestFIFOKeysetDoesNotHang(t *testing.T) {
	cfg := newKeyset(t)
	p := open(t, cfg)
	if err := os.Remove(cfg.Path); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mkfifo(cfg.Path, 0o600); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 3)
	go func() { _, err := New(context.Background(), cfg, nil); done <- err }()
	go func() { _, err := p.CreateVersion(context.Background()); done <- err }()
	go func() { done <- p.Refresh(context.Background()) }()
	for range 3 {
		select {
		case err := <-done:
			if err == nil || !strings.Contains(err.Error(), "not a regular file") {
				t.Fatalf("got %v; want a refusal of the FIFO", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("hung on a FIFO at the keyset path")
		}
	}
}

// TestRootKeepsOwnerAndMode: root's key change keeps the keyset's owner,
// group and mode (the plugin's user, or root:GROUP 0640).
func TestRootKeepsOwnerAndMode(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to chown (CI runs as root)")
	}
	secretfile.SetRole(secretfile.Admin)
	t.Cleanup(func() { secretfile.SetRole(secretfile.Serving) })
	for _, shape := range []struct {
		uid, gid int
		mode     os.FileMode
	}{{65532, 65532, 0o600}, {0, 4242, 0o640}, {65532, 0, 0o400}} {
		cfg := newKeyset(t)
		if err := os.Chown(cfg.Path, shape.uid, shape.gid); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(cfg.Path, shape.mode); err != nil {
			t.Fatal(err)
		}
		if _, err := open(t, cfg).CreateVersion(context.Background()); err != nil {
			t.Fatal(err)
		}
		fi, err := os.Stat(cfg.Path)
		if err != nil {
			t.Fatal(err)
		}
		if uid, gid := secretfile.Owner(fi); uid != shape.uid || gid != shape.gid || fi.Mode().Perm() != shape.mode {
			t.Errorf("after root's write the keyset is %d:%d %04o; want %d:%d %04o", uid, gid, fi.Mode().Perm(), shape.uid, shape.gid, shape.mode)
		}
	}
}
