package providers

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"strings"
)

// Limits from the KMS v2 API (k8s.io/kms/apis/v2/api.proto) that the
// apiserver enforces; the plugin checks them before a reply leaves.
const (
	// MaxKeyIDSize is the longest key_id the apiserver accepts.
	MaxKeyIDSize = 1024
	// MaxCiphertextSize is the longest ciphertext the apiserver accepts.
	MaxCiphertextSize = 1024
	// MaxAnnotationsSize bounds the total size of annotation keys and values.
	MaxAnnotationsSize = 32 * 1024
	// SeedSize is the size of the plaintext kube-apiserver sends to Encrypt.
	SeedSize = 32
)

// KeyID is a parsed key_id of the form "<backend>:<name>", for example
// "file:prod-a1b2/123456", "pkcs11:kms/k8s-kek-3" or
// "azurekv:myvault.vault.azure.net/k8s-kek/0123abcd". The backend prefix
// routes a Decrypt to the provider that made the ciphertext.
type KeyID struct {
	Backend string
	Name    string
}

// String formats the key_id.
func (k KeyID) String() string { return k.Backend + ":" + k.Name }

// ParseKeyID splits and validates a key_id. It accepts only printable ASCII
// without spaces, so a key_id is always safe to log.
func ParseKeyID(s string) (KeyID, error) {
	if s == "" {
		return KeyID{}, fmt.Errorf("parse key_id: empty: %w", ErrInvalidInput)
	}
	if len(s) > MaxKeyIDSize {
		return KeyID{}, fmt.Errorf("parse key_id: %d bytes, at most %d allowed: %w", len(s), MaxKeyIDSize, ErrInvalidInput)
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; c <= ' ' || c > '~' {
			return KeyID{}, fmt.Errorf("parse key_id: byte %d is not printable ASCII: %w", i, ErrInvalidInput)
		}
	}
	backend, name, ok := strings.Cut(s, ":")
	if !ok || backend == "" || name == "" {
		return KeyID{}, fmt.Errorf("parse key_id %q: want <backend>:<name>: %w", s, ErrInvalidInput)
	}
	for i := 0; i < len(backend); i++ {
		if c := backend[i]; !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9') {
			return KeyID{}, fmt.Errorf("parse key_id %q: backend must be lower-case letters and digits: %w", s, ErrInvalidInput)
		}
	}
	return KeyID{Backend: backend, Name: name}, nil
}

// HashKeyID returns the form kube-apiserver uses in its metric labels:
// "sha256:" + hex(sha256(key_id)). Comparing it with an apiserver's
// apiserver_envelope_encryption_key_id_hash_* metrics shows which key that
// apiserver uses.
func HashKeyID(keyID string) string {
	sum := sha256.Sum256([]byte(keyID))
	return "sha256:" + hex.EncodeToString(sum[:])
}
