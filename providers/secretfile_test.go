package providers

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

func TestReadSecretFile(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string, mode os.FileMode) string {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(path, mode); err != nil { // not subject to umask
			t.Fatal(err)
		}
		return path
	}
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	// Kubernetes mounts Secrets as symlinks into a ..data folder; the mode
	// that counts is the target's.
	target := write("target", "s3cret\n", 0o600)
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
		{"OwnerOnly", write("ok", "s3cret\n", 0o600), "s3cret\n", "", nil},
		{"ReadOnlyOwner", write("ro", "s3cret", 0o400), "s3cret", "", nil},
		{"Symlink", link, "s3cret\n", "", nil},
		{"WorldReadable", write("world", "s3cret", 0o644), "", "chmod 600", nil},
		{"GroupReadable", write("group", "s3cret", 0o640), "", "mode 0640", nil},
		{"OtherWritable", write("other", "s3cret", 0o602), "", "readable by group or others", nil},
		{"Empty", write("empty", "", 0o600), "", "is empty", nil},
		{"OnlyWhiteSpace", write("blank", " \r\n", 0o600), "", "is empty", nil},
		{"Directory", dir, "", "not a regular file", nil},
		{"FIFO", fifo, "", "not a regular file", nil},
		{"Missing", filepath.Join(dir, "nope"), "", "no such file", os.ErrNotExist},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ReadSecretFile("x.secretFile", tt.path)
			if tt.want != "" {
				if err != nil || string(got) != tt.want {
					t.Fatalf("ReadSecretFile = %q, %v; want %q", got, err, tt.want)
				}
				return
			}
			if err == nil {
				t.Fatalf("ReadSecretFile = %q, want an error containing %q", got, tt.wantText)
			}
			if msg := err.Error(); !strings.Contains(msg, tt.wantText) || !strings.Contains(msg, "x.secretFile") || strings.Contains(msg, "\n") {
				t.Fatalf("error %q: want one line naming x.secretFile and containing %q", msg, tt.wantText)
			}
			if tt.wantErr != nil && !errors.Is(err, tt.wantErr) {
				t.Fatalf("error %v does not wrap %v", err, tt.wantErr)
			}
			if strings.Contains(err.Error(), "s3cret") {
				t.Fatalf("error %q contains the secret", err)
			}
		})
	}
}

func TestCheckPrivateNamesPathAndFix(t *testing.T) {
	path := filepath.Join(t.TempDir(), "keyset.json")
	if err := os.WriteFile(path, []byte("{}"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	err = CheckPrivate("file.path", path, fi)
	if want := "file.path " + path + " has mode 0644, readable by group or others; run chmod 600 " + path; err == nil || err.Error() != want {
		t.Fatalf("CheckPrivate = %v, want %q", err, want)
	}
}
