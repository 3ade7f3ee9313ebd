package config

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// loadWithin runs Load in the background and fails the test if it has not
// returned within d: a source that is read whole never returns.
func loadWithin(t *testing.T, path string, d time.Duration) error {
	t.Helper()
	done := make(chan error, 1)
	go func() {
		_, err := Load(path, testKinds)
		done <- err
	}()
	select {
	case err := <-done:
		return err
	case <-time.After(d):
		t.Fatalf("Load(%s) still reading after %v", path, d)
		return nil
	}
}

func TestLoadSizeLimit(t *testing.T) {
	valid := "socket: /s\nprovider: {file: {path: /k}}\n"
	pad := func(n int) string {
		line := "# " + strings.Repeat("x", 61) + "\n" // 64 bytes
		body := valid + strings.Repeat(line, (n-len(valid))/len(line))
		return body + strings.Repeat("#", n-len(body))
	}
	tests := []struct {
		name    string
		body    string
		wantErr []string // all must appear; none: Load succeeds
	}{
		{"exactly the limit loads", pad(MaxFileSize), nil},
		{"one byte over is refused", pad(MaxFileSize + 1), []string{"1048577 bytes", "1048576"}},
		{"2 MiB is refused naming its size", pad(2 << 20), []string{"2097152 bytes", "1048576"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "config.yaml")
			if err := os.WriteFile(p, []byte(tt.body), 0o600); err != nil {
				t.Fatal(err)
			}
			err := loadWithin(t, p, 10*time.Second)
			if len(tt.wantErr) == 0 {
				if err != nil {
					t.Fatalf("Load: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatal("Load succeeded")
			}
			for _, w := range tt.wantErr {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("Load: got %q, want it to contain %q", err, w)
				}
			}
			if strings.Contains(err.Error(), "\n") || !strings.Contains(err.Error(), p) {
				t.Errorf("Load: got %q, want one line naming %s", err, p)
			}
		})
	}
}

// TestLoadEndlessSource: a config path that never ends (a device, a FIFO
// whose writer never stops) is refused after the limit, not read whole.
func TestLoadEndlessSource(t *testing.T) {
	t.Run("dev zero", func(t *testing.T) {
		err := loadWithin(t, "/dev/zero", 10*time.Second)
		if err == nil || !strings.Contains(err.Error(), fmt.Sprintf("more than %d bytes", MaxFileSize)) {
			t.Fatalf("Load(/dev/zero): got %v, want the size limit", err)
		}
	})
	t.Run("fifo", func(t *testing.T) {
		p := filepath.Join(t.TempDir(), "config.yaml")
		if err := syscall.Mkfifo(p, 0o600); err != nil {
			t.Fatal(err)
		}
		written := make(chan int64, 1)
		go func() {
			w, err := os.OpenFile(p, os.O_WRONLY, 0)
			if err != nil {
				written <- -1
				return
			}
			defer w.Close()
			chunk := []byte(strings.Repeat("# endless\n", 6554))
			var n int64
			for {
				m, err := w.Write(chunk)
				n += int64(m)
				if err != nil { // EPIPE once Load closes its end
					written <- n
					return
				}
			}
		}()
		err := loadWithin(t, p, 10*time.Second)
		if err == nil || !strings.Contains(err.Error(), fmt.Sprintf("more than %d bytes", MaxFileSize)) {
			t.Fatalf("Load(fifo): got %v, want the size limit", err)
		}
		// What the writer got in: the limit, plus at most what the pipe
		// buffers (64 KiB by default, 1 MiB at most) and one chunk.
		if n := <-written; n > 2*MaxFileSize+int64(len("# endless\n")*6554) {
			t.Fatalf("the writer got %d bytes in; Load read far past the %d-byte limit", n, MaxFileSize)
		}
	})
}
