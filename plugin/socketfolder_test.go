package plugin

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestCheckSocketFolder(t *testing.T) {
	uid := uint32(os.Geteuid())
	tests := []struct {
		name        string
		path        func(dir string) string
		wantMissing bool
		wantErr     string
	}{
		{"existing private folder", func(d string) string { return filepath.Join(d, "kms.sock") }, false, ""},
		{"missing folder", func(d string) string { return filepath.Join(d, "run", "kms", "kms.sock") }, true, ""},
		{"relative path", func(string) string { return "run/kms.sock" }, false, "absolute path"},
		{"world-writable folder", func(d string) string {
			w := filepath.Join(d, "open")
			if err := os.Mkdir(w, 0o777); err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(w, 0o777); err != nil {
				t.Fatal(err)
			}
			return filepath.Join(w, "kms.sock")
		}, false, "chmod o-w"},
		{"under a file", func(d string) string {
			f := filepath.Join(d, "file")
			if err := os.WriteFile(f, nil, 0o600); err != nil {
				t.Fatal(err)
			}
			return filepath.Join(f, "kms.sock")
		}, false, "is not a folder"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir, err := os.MkdirTemp("", "sf")
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { os.RemoveAll(dir) })
			missing, err := CheckSocketFolder(tt.path(dir), uid)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("got %v, want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil || missing != tt.wantMissing {
				t.Fatalf("got missing %v, %v; want %v, nil", missing, err, tt.wantMissing)
			}
		})
	}
}
