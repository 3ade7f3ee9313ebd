package secretfile

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// requireRoot skips where files of other owners cannot be made; CI runs
// the suite as root.
func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to create files owned by other users (CI runs as root)")
	}
}

// privateDir is a folder only root can write, under the test's temp dir.
func privateDir(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

func writeFile(t *testing.T, path, content string, mode os.FileMode, uid, gid int) string {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(path, uid, gid); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, mode); err != nil { // not subject to umask
		t.Fatal(err)
	}
	return path
}

func TestRead(t *testing.T) {
	requireRoot(t)
	dir := privateDir(t)
	file := func(name, content string, mode os.FileMode) string {
		return writeFile(t, filepath.Join(dir, name), content, mode, 0, 0)
	}
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	// Kubernetes mounts Secrets as symlinks into a ..data folder; the file
	// that counts is the target.
	target := file("target", "s3cret\n", 0o600)
	link := filepath.Join(dir, "link")
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name     string
		path     string
		want     string // content; "" when an error is wanted
		wantText string // in the error
		wantErr  error  // wrapped, when not nil
	}{
		{"OwnerOnly", file("ok", "s3cret\n", 0o600), "s3cret\n", "", nil},
		{"ReadOnlyOwner", file("ro", "s3cret", 0o400), "s3cret", "", nil},
		{"RootGroupReadable", file("group", "s3cret", 0o640), "s3cret", "", nil},
		{"Symlink", link, "s3cret\n", "", nil},
		{"WorldReadable", file("world", "s3cret", 0o644), "", "chmod 600", nil},
		{"GroupWritable", file("gw", "s3cret", 0o660), "", "mode 0660", nil},
		{"OtherWritable", file("other", "s3cret", 0o602), "", "other users read or change it", nil},
		{"Empty", file("empty", "", 0o600), "", "is empty", nil},
		{"OnlyWhiteSpace", file("blank", " \r\n", 0o600), "", "is empty", nil},
		{"Directory", dir, "", "not a regular file", nil},
		{"FIFO", fifo, "", "not a regular file", nil},
		{"Missing", filepath.Join(dir, "nope"), "", "no such file", os.ErrNotExist},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Read("x.secretFile", tt.path)
			if tt.want != "" {
				if err != nil || string(got) != tt.want {
					t.Fatalf("Read = %q, %v; want %q", got, err, tt.want)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantText) || !strings.Contains(err.Error(), "x.secretFile") {
				t.Fatalf("Read = %q, %v; want an error naming x.secretFile and containing %q", got, err, tt.wantText)
			}
			if tt.wantErr != nil && !errors.Is(err, tt.wantErr) {
				t.Fatalf("error %v does not wrap %v", err, tt.wantErr)
			}
		})
	}
}

// TestShapes is the owner/group/mode table of the two roles, for a plugin
// running as uid 65532 in group 65532 and for root.
func TestShapes(t *testing.T) {
	requireRoot(t)
	dir := privateDir(t)
	plugin := func(gids ...int) identity {
		return identity{uid: 65532, role: Serving, inGroup: func(g int) bool {
			for _, x := range gids {
				if x == g {
					return true
				}
			}
			return false
		}}
	}
	rootAdmin := identity{uid: 0, role: Admin, inGroup: func(int) bool { return true }}
	rootServing := identity{uid: 0, role: Serving, inGroup: func(int) bool { return true }}
	tests := []struct {
		name     string
		who      identity
		mode     os.FileMode
		uid, gid int
		wantText string // "" when accepted
	}{
		{"OwnUID0600", plugin(), 0o600, 65532, 65532, ""},
		{"OwnUID0400", plugin(), 0o400, 65532, 0, ""},
		{"Root0600", plugin(), 0o600, 0, 0, ""},
		{"RootGroup0640InGroup", plugin(4242), 0o640, 0, 4242, ""},
		{"RootGroup0640NotInGroup", plugin(), 0o640, 0, 4242, "which uid 65532 is not in"},
		{"OtherUID0600", plugin(), 0o600, 1000, 1000, "owned by uid 1000, who could replace it"},
		{"OwnUID0640", plugin(65532), 0o640, 65532, 65532, "must be owned by root"},
		{"RootGroupWritable", plugin(4242), 0o660, 0, 4242, "mode 0660"},
		{"WorldReadable", plugin(), 0o604, 65532, 65532, "mode 0604"},
		{"RootPluginOtherUID", rootServing, 0o600, 65532, 65532, "owned by uid 65532"},
		{"RootAdminOtherUID", rootAdmin, 0o600, 65532, 65532, ""},
		{"RootAdminOtherUIDGroupReadable", rootAdmin, 0o640, 65532, 65532, "must be owned by root"},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := writeFile(t, filepath.Join(dir, "f"+string(rune('a'+i))), "s", tt.mode, tt.uid, tt.gid)
			fi, err := os.Stat(path)
			if err != nil {
				t.Fatal(err)
			}
			err = tt.who.checkShape("file.path", path, fi)
			if tt.wantText == "" {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantText) {
				t.Fatalf("err = %v; want it to contain %q", err, tt.wantText)
			}
		})
	}
}

// TestFolders is the StrictModes rule: no folder on the path (as written or
// after links) writable by another user, except a sticky root-owned one.
func TestFolders(t *testing.T) {
	requireRoot(t)
	base := privateDir(t)
	mkdir := func(name string, mode os.FileMode, uid int) string {
		dir := filepath.Join(base, name)
		if err := os.Mkdir(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(dir, uid, 0); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(dir, mode); err != nil {
			t.Fatal(err)
		}
		return dir
	}
	world := mkdir("world", 0o777, 0)
	sticky := mkdir("sticky", os.ModeSticky|0o777, 0)
	userSticky := mkdir("usersticky", os.ModeSticky|0o777, 1000)
	groupW := mkdir("groupw", 0o775, 0)
	other := mkdir("other", 0o755, 1000)
	own := mkdir("own", 0o755, 65532)
	nested := mkdir("world/inner", 0o755, 0)
	pluginFile := func(dir string) string {
		return writeFile(t, filepath.Join(dir, "keyset.json"), "s", 0o600, 65532, 65532)
	}
	link := filepath.Join(mkdir("links", 0o755, 0), "keyset.json")
	if err := os.Symlink(pluginFile(world), link); err != nil {
		t.Fatal(err)
	}
	plugin := identity{uid: 65532, role: Serving, inGroup: func(int) bool { return false }}
	tests := []struct {
		name     string
		path     string
		wantText string
	}{
		{"Private", pluginFile(mkdir("private", 0o755, 0)), ""},
		{"StickyRoot", pluginFile(sticky), ""},
		{"OwnFolder", pluginFile(own), ""},
		{"WorldWritable", filepath.Join(world, "keyset.json"), "run chmod go-w " + world},
		{"GroupWritable", pluginFile(groupW), "mode 0775"},
		{"StickyNotRoot", pluginFile(userSticky), "mode 1777"},
		{"OtherOwner", pluginFile(other), "owned by uid 1000"},
		{"WorldWritableAbove", pluginFile(nested), "run chmod go-w " + world},
		{"LinkIntoWorldWritable", link, "run chmod go-w " + world},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fi, err := os.Stat(tt.path)
			if err != nil {
				t.Fatal(err)
			}
			err = plugin.checkFolders("file.path", tt.path, fi)
			if tt.wantText == "" {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantText) {
				t.Fatalf("err = %v; want it to contain %q", err, tt.wantText)
			}
		})
	}
}

func TestReadRefusesHugeFile(t *testing.T) {
	requireRoot(t)
	path := filepath.Join(privateDir(t), "big")
	writeFile(t, path, strings.Repeat("x", MaxSize+1), 0o600, 0, 0)
	if _, err := Read("x.secretFile", path); err == nil || !strings.Contains(err.Error(), "larger than") {
		t.Fatalf("err = %v; want larger than", err)
	}
}
