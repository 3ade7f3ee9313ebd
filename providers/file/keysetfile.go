package file

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"syscall"
	"time"

	"github.com/tink-crypto/tink-go/v2/insecurecleartextkeyset"
	"github.com/tink-crypto/tink-go/v2/keyset"

	"github.com/kms-v2/kms-plugin/providers/secretfile"
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

// openKeyset opens the keyset through secretfile.Open, so it is read only
// when no other user can read or swap it, and a missing file says how to
// create one.
func openKeyset(path string) (*os.File, fs.FileInfo, error) {
	f, fi, err := secretfile.Open(pathField, path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil, fmt.Errorf("keyset %s does not exist; create it with `kmsctl keys init --config FILE`: %w", path, err)
	}
	return f, fi, err
}

// readKeyset loads the keyset file.
func readKeyset(path string) (*loaded, error) {
	f, fi, err := openKeyset(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return parseOpened(path, f, fi)
}

// parseOpened reads and parses an opened keyset file.
func parseOpened(path string, f *os.File, fi fs.FileInfo) (*loaded, error) {
	data, err := io.ReadAll(io.LimitReader(f, secretfile.MaxSize+1))
	if err != nil {
		return nil, fmt.Errorf("keyset %s: %w", path, err)
	}
	if len(data) > secretfile.MaxSize {
		return nil, fmt.Errorf("keyset %s is larger than %d bytes; point %s at a keyset file", path, secretfile.MaxSize, pathField)
	}
	l, err := parseKeyset(data)
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
	if _, err := dec.Token(); err != io.EOF {
		// A second document (or garbage) after the first is never ours: a
		// botched edit or an append, and half of it would be ignored.
		return nil, fmt.Errorf("not a kms-plugin keyset file: data after the keyset document at byte %d", dec.InputOffset())
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

// newName returns a fresh keyset name.
func newName() (string, error) {
	b := make([]byte, 4)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	return "ks-" + hex.EncodeToString(b), nil
}
