package pkcs11

import (
	"errors"
	"fmt"

	"github.com/kms-v2/kms-plugin/providers"
)

// Ciphertext framing: formatV1 || IV || AES-GCM(seed) || tag.
const (
	formatV1  byte = 1
	ivSize         = 12
	tagSize        = 16
	sealedLen      = 1 + ivSize + providers.SeedSize + tagSize
)

// aad binds a ciphertext to its format and key_id, so a ciphertext moved to
// another key_id (even one naming the same key object) fails to open.
func aad(keyID string) []byte {
	return append([]byte{formatV1}, keyID...)
}

// frame assembles the stored ciphertext.
func frame(iv, ct []byte) []byte {
	out := make([]byte, 0, 1+len(iv)+len(ct))
	out = append(out, formatV1)
	out = append(out, iv...)
	return append(out, ct...)
}

// unframe splits a stored ciphertext. The seed is always 32 bytes, so any
// other length was not made here.
func unframe(b []byte) (iv, ct []byte, err error) {
	if len(b) != sealedLen {
		return nil, nil, fmt.Errorf("ciphertext of %d bytes, want %d: %w", len(b), sealedLen, providers.ErrInvalidCiphertext)
	}
	if b[0] != formatV1 {
		return nil, nil, fmt.Errorf("ciphertext format %d, want %d: %w", b[0], formatV1, providers.ErrInvalidCiphertext)
	}
	return b[1 : 1+ivSize], b[1+ivSize:], nil
}

// RSA-OAEP-256 framing: formatRSA || RSA-OAEP ciphertext, as long as the
// version's modulus. The format byte keeps the two kinds apart: an AES
// ciphertext presented to an RSA version, or the reverse, is refused
// before any token call.
const formatRSA byte = 2

// frameRSA assembles the stored ciphertext of an RSA version.
func frameRSA(ct []byte) []byte {
	return append([]byte{formatRSA}, ct...)
}

// unframeRSA checks the framing for a version whose modulus is k bytes.
func unframeRSA(b []byte, k int) ([]byte, error) {
	if len(b) != 1+k {
		return nil, fmt.Errorf("ciphertext of %d bytes, want %d for this key: %w", len(b), 1+k, providers.ErrInvalidCiphertext)
	}
	if b[0] != formatRSA {
		return nil, fmt.Errorf("ciphertext format %d, want %d: %w", b[0], formatRSA, providers.ErrInvalidCiphertext)
	}
	return b[1:], nil
}

// ErrUnsafeKey: a key object with one of our labels could leave the token
// (CKA_EXTRACTABLE true or CKA_SENSITIVE false), is not the kind of key
// pkcs11.algorithm names (an AES-256 secret key, or an RSA key pair of at
// least 2048 bits), or AES keys and RSA key pairs share the key label. The
// provider refuses to use any key of such a token until the object is
// fixed or removed, because a KEK that can be exported is not an HSM-held
// key.
var ErrUnsafeKey = errors.New("key object is not a sensitive, non-extractable key of the configured kind")

// ErrWrongAlgorithm: the token's key state for the key label was made for
// the other algorithm than pkcs11.algorithm names.
var ErrWrongAlgorithm = errors.New("key label holds keys of another algorithm")
