package providers

import (
	"bytes"
	"fmt"
	"io"
	"io/fs"
	"os"
	"syscall"
)

// CheckPrivate refuses a file that holds a secret (key material, a PIN, a
// client secret or private key) when other local users could read or
// replace it, or when it is not a regular file. field names the
// configuration field that points at path, so the one-line error says what
// to fix and how.
func CheckPrivate(field, path string, fi fs.FileInfo) error {
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("%s %s is not a regular file (%s); point %s at a file that holds the secret", field, path, fi.Mode().Type(), field)
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return fmt.Errorf("%s %s has mode %04o, readable by group or others; run chmod 600 %s", field, path, perm, path)
	}
	return nil
}

// ReadSecretFile reads the secret file that configuration field field names,
// after CheckPrivate: a secret other local users can read is a secret given
// away. A file holding nothing but white space is refused too, since no
// backend accepts an empty secret and the backend's own error would not say
// which file is wrong. The content is returned as read; callers trim what
// their format allows.
//
// The file is opened non-blocking and checked through the open handle, so a
// FIFO in its place is refused instead of hanging, and the file read is the
// file checked.
func ReadSecretFile(field, path string) ([]byte, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", field, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", field, err)
	}
	if err := CheckPrivate(field, path, fi); err != nil {
		return nil, err
	}
	b, err := io.ReadAll(f)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", field, err)
	}
	if len(bytes.TrimSpace(b)) == 0 {
		return nil, fmt.Errorf("%s %s is empty; write the secret into it", field, path)
	}
	return b, nil
}
