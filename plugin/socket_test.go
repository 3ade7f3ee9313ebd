package plugin

import (
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

// shortDir returns a temp folder short enough for socket paths (108 bytes).
func shortDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("", "kms")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

func TestListenModes(t *testing.T) {
	tests := []struct {
		name     string
		group    string
		wantMode os.FileMode
	}{
		{"owner only by default", "", 0o600},
		{"group when configured", strconv.Itoa(os.Getgid()), 0o660},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := filepath.Join(shortDir(t), "new")
			sock := filepath.Join(dir, "kms.sock")
			l, err := Listen(sock, tt.group)
			if err != nil {
				t.Fatal(err)
			}
			fi, err := os.Stat(sock)
			if err != nil {
				t.Fatal(err)
			}
			if got := fi.Mode().Perm(); got != tt.wantMode {
				t.Errorf("socket mode %v, want %v", got, tt.wantMode)
			}
			di, err := os.Stat(dir)
			if err != nil {
				t.Fatal(err)
			}
			if got, want := di.Mode().Perm(), os.FileMode(0o750); got != want {
				t.Errorf("created folder mode %v, want %v", got, want)
			}
			l.Close()
			if _, err := os.Lstat(sock); !os.IsNotExist(err) {
				t.Errorf("socket still exists after Close: %v", err)
			}
		})
	}
}

func TestListenRefusals(t *testing.T) {
	dir := shortDir(t)
	regular := filepath.Join(dir, "regular")
	if err := os.WriteFile(regular, []byte("keep me"), 0o600); err != nil {
		t.Fatal(err)
	}
	open := filepath.Join(dir, "open")
	if err := os.Mkdir(open, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(open, 0o777); err != nil { // exact, whatever the umask
		t.Fatal(err)
	}
	live := filepath.Join(dir, "live.sock")
	ll, err := net.Listen("unix", live)
	if err != nil {
		t.Fatal(err)
	}
	defer ll.Close()
	tests := []struct {
		name  string
		path  string
		group string
		want  string
	}{
		{"abstract", "@kms", "", "abstract sockets"},
		{"relative", "kms.sock", "", "absolute path"},
		{"regular file in the way", regular, "", "regular file is in the way"},
		{"live socket", live, "", "already served by another process"},
		{"folder cannot be created", filepath.Join(regular, "sub", "kms.sock"), "", "socket folder"},
		{"unknown group", filepath.Join(dir, "g.sock"), "no-such-group-kms", "no such group"},
		{"group -1", filepath.Join(dir, "g.sock"), "-1", "gid from 0 to 4294967294"},
		{"negative gid", filepath.Join(dir, "g.sock"), "-2", "gid from 0 to 4294967294"},
		{"gid out of range", filepath.Join(dir, "g.sock"), "4294967295", "gid from 0 to 4294967294"},
		{"path over sun_path", "/" + strings.Repeat("s", 107), "", "107-byte limit"},
		{"world-writable folder", filepath.Join(open, "kms.sock"), "", "chmod o-w " + open},
		{"world-writable folder above", filepath.Join(open, "sub", "kms.sock"), "", "chmod o-w " + open},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l, err := Listen(tt.path, tt.group)
			if err == nil {
				l.Close()
				t.Fatalf("Listen(%q) succeeded", tt.path)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Listen(%q) = %v, want an error containing %q", tt.path, err, tt.want)
			}
		})
	}
	if _, err := os.Lstat(filepath.Join(open, "sub")); !os.IsNotExist(err) {
		t.Errorf("a refused start left a folder behind: %v", err)
	}
	if b, _ := os.ReadFile(regular); string(b) != "keep me" {
		t.Error("the regular file in the way was changed")
	}
	if c, err := net.Dial("unix", live); err != nil {
		t.Errorf("the live socket stopped answering: %v", err)
	} else {
		c.Close()
	}
}

func TestListenRemovesStaleSocket(t *testing.T) {
	sock := filepath.Join(shortDir(t), "kms.sock")
	// A socket file nobody listens on, as left by a killed plugin.
	stale, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	stale.SetUnlinkOnClose(false)
	stale.Close()
	if _, err := os.Lstat(sock); err != nil {
		t.Fatalf("stale socket not left behind: %v", err)
	}
	l, err := Listen(sock, "")
	if err != nil {
		t.Fatalf("Listen over a stale socket: %v", err)
	}
	l.Close()
}

// TestListenGroupFolder: a folder the plugin creates for socketGroup is
// owned by that group and 0750, so the group's members can reach the
// socket (a root-owned 0750 folder stops them at the folder).
func TestListenGroupFolder(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root to give a folder to another group")
	}
	base := shortDir(t)
	dir := filepath.Join(base, "a", "b")
	sock := filepath.Join(dir, "kms.sock")
	l, err := Listen(sock, "65534")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	for _, d := range []string{filepath.Join(base, "a"), dir} {
		fi, err := os.Stat(d)
		if err != nil {
			t.Fatal(err)
		}
		if got, want := fi.Mode().Perm(), os.FileMode(0o750); got != want {
			t.Errorf("%s: mode %v, want %v", d, got, want)
		}
		if got, want := fi.Sys().(*syscall.Stat_t).Gid, uint32(65534); got != want {
			t.Errorf("%s: group %d, want %d", d, got, want)
		}
	}
}

// TestCloseKeepsAnotherSocket: closing removes the socket file only while
// it is still the one this listener bound; another instance's socket at
// the same path stays and keeps answering.
func TestCloseKeepsAnotherSocket(t *testing.T) {
	sock := filepath.Join(shortDir(t), "kms.sock")
	l, err := Listen(sock, "")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(sock); err != nil {
		t.Fatal(err)
	}
	other, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	l.Close()
	if _, err := os.Lstat(sock); err != nil {
		t.Fatalf("closing removed the other instance's socket: %v", err)
	}
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatalf("the other instance's socket stopped answering: %v", err)
	}
	c.Close()
}
