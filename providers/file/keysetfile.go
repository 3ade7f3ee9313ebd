package file

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/tink-crypto/tink-go/v2/insecurecleartextkeyset"
	"github.com/tink-crypto/tink-go/v2/keyset"

	"github.com/kms-v2/kms-plugin/providers"
)

// document is the keyset file: a Tink keyset (key material, key IDs, status,
// primary) plus what Tink does not record: a stable keyset name that becomes
// part of every key_id, and each key's creation time.
type document struct {
	// Name is chosen once at init and never changes, so key_ids stay valid
	// even if the file is renamed or moved.
	Name string `json:"name"`
	// Created maps a Tink key ID (decimal) to its creation time.
	Created map[string]time.Time `json:"created"`
	// Keyset is the Tink keyset in Tink's JSON form, unencrypted: the file's
	// protection is its 0600 mode and the host's disk.
	Keyset json.RawMessage `json:"keyset"`
}

// loaded is a parsed keyset file with the identity of the file it came from.
type loaded struct {
	doc    document
	handle *keyset.Handle
	stamp  fileStamp
}

// fileStamp identifies one version of the file cheaply, so a refresh that
// finds the file unchanged skips parsing.
type fileStamp struct {
	ino   uint64
	size  int64
	mtime time.Time
}

func stampOf(fi fs.FileInfo) fileStamp {
	st := fileStamp{size: fi.Size(), mtime: fi.ModTime()}
	if sys, ok := fi.Sys().(*syscall.Stat_t); ok {
		st.ino = sys.Ino
	}
	return st
}

// pathField names the configuration field of the keyset file in errors.
const pathField = "file.path"

// openError says how to fix a keyset file that cannot be opened.
func openError(path string, err error) error {
	if os.IsNotExist(err) {
		return fmt.Errorf("keyset %s does not exist; create it with `kmsctl keys init --config FILE`", path)
	}
	return err
}

// readKeyset loads the keyset file, refusing one that other users could
// read: it holds key material unencrypted.
func readKeyset(path string) (*loaded, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, openError(path, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if err := providers.CheckPrivate(pathField, path, fi); err != nil {
		return nil, err
	}
	var buf bytes.Buffer
	if _, err := buf.ReadFrom(f); err != nil {
		return nil, err
	}
	l, err := parseKeyset(buf.Bytes())
	if err != nil {
		return nil, fmt.Errorf("keyset %s: %w", path, err)
	}
	l.stamp = stampOf(fi)
	return l, nil
}

// parseKeyset parses the file's bytes. Key material is validated later, when
// the state is built.
func parseKeyset(data []byte) (*loaded, error) {
	var doc document
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&doc); err != nil {
		return nil, fmt.Errorf("not a kms-plugin keyset file: %v", err)
	}
	if doc.Name == "" || len(doc.Keyset) == 0 {
		return nil, fmt.Errorf("not a kms-plugin keyset file: name or keyset missing")
	}
	if !validName(doc.Name) {
		return nil, fmt.Errorf("keyset name %q: want lower-case letters, digits and '-'", doc.Name)
	}
	h, err := insecurecleartextkeyset.Read(keyset.NewJSONReader(bytes.NewReader(doc.Keyset)))
	if err != nil {
		return nil, fmt.Errorf("tink keyset: %v", err)
	}
	return &loaded{doc: doc, handle: h}, nil
}

func validName(s string) bool {
	if len(s) == 0 || len(s) > 64 {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
			return false
		}
	}
	return true
}

// encode serializes a document with the given handle.
func encode(doc document, h *keyset.Handle) ([]byte, error) {
	var ks bytes.Buffer
	if err := insecurecleartextkeyset.Write(h, keyset.NewJSONWriter(&ks)); err != nil {
		return nil, err
	}
	doc.Keyset = json.RawMessage(bytes.TrimSpace(ks.Bytes()))
	out, err := json.MarshalIndent(doc, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(out, '\n'), nil
}

// writeAtomic replaces path with data: a 0600 temp file in the same folder,
// synced, renamed over the target, and the folder synced. A reader (a
// running plugin) sees the old file or the new one, never a partial one.
func writeAtomic(path string, data []byte) error {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name()) // no-op after a successful rename
	if err := tmp.Chmod(0o600); err != nil {
		tmp.Close()
		return err
	}
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return err
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// lockDir takes an exclusive advisory lock on the keyset's folder, so two
// kmsctl runs never interleave read-modify-write cycles on the file.
func lockDir(path string) (unlock func(), err error) {
	d, err := os.Open(filepath.Dir(path))
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(d.Fd()), syscall.LOCK_EX); err != nil {
		d.Close()
		return nil, fmt.Errorf("lock %s: %w", filepath.Dir(path), err)
	}
	return func() {
		_ = syscall.Flock(int(d.Fd()), syscall.LOCK_UN)
		d.Close()
	}, nil
}

// newName returns a fresh keyset name.
func newName() (string, error) {
	b := make([]byte, 4)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	return "ks-" + hex.EncodeToString(b), nil
}
