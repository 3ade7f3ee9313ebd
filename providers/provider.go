// Package providers holds the contract between the KMS v2 service and the
// backends that hold key encryption keys (KEKs): the Provider interface, the
// optional Rotator capability, the sentinel errors every backend wraps, and
// key_id helpers.
//
// A Provider wraps and unwraps the apiserver's 32-byte data-key seed. Its key
// state (which versions exist, which one is primary) lives in the backend, not
// in the plugin: plugin instances are stateless followers that refresh that
// state in the background, so every instance converges on the same primary.
//
// The contract never imports the service (package plugin), the rotation
// orchestrator, or any backend; backends live in subpackages and are wired in
// one visible map under cmd/.
package providers

import (
	"context"
	"time"
)

// Sealed is what a provider returns from Encrypt and takes back in Decrypt:
// exactly the fields kube-apiserver stores in etcd next to the object.
type Sealed struct {
	// KeyID names the key version that really produced Ciphertext. It is
	// public (logged, hashed into metrics) and never reused for other key
	// material.
	KeyID string
	// Ciphertext is the wrapped seed; at most MaxCiphertextSize bytes.
	Ciphertext []byte
	// Annotations are stored in plaintext in etcd; keys are fully qualified
	// DNS names. Most providers return none.
	Annotations map[string][]byte
}

// Provider wraps and unwraps seeds with key versions held by one backend.
// Implementations must be safe for concurrent use.
type Provider interface {
	// Encrypt wraps plaintext with the primary key version. The returned
	// Sealed.KeyID is the version actually used, taken from the same snapshot
	// of state as the key itself, so it never disagrees with the ciphertext.
	Encrypt(ctx context.Context, plaintext []byte) (Sealed, error)
	// Decrypt unwraps with the version named by s.KeyID, which may be any
	// version that is not disabled. An unknown KeyID makes the provider look
	// the key up in the backend once before it fails with ErrKeyNotFound.
	Decrypt(ctx context.Context, s Sealed) ([]byte, error)
	// PrimaryKeyID returns, from cached state and without a remote call, the
	// key_id Encrypt would stamp right now.
	PrimaryKeyID(ctx context.Context) (string, error)
	// Owns reports, from the key_id alone and without a remote call,
	// whether keyID names a version this provider instance could have made:
	// its backend prefix and its instance (keyset, token, vault and key).
	// When one plugin serves several providers it routes each Decrypt to the
	// one that owns the key_id, so no provider is asked, and no backend
	// called, about another's ciphertext.
	Owns(keyID string) bool
	// Check verifies backend reachability and authorization (and refreshes
	// cached key state where that is cheap). The plugin runs it in the
	// background, never on the Status path.
	Check(ctx context.Context) error
	// Close releases backend resources. The provider must not be used after.
	Close() error
}

// KeyState is the lifecycle state of one key version.
type KeyState string

// Key states, as shown by `kmsctl keys list`.
const (
	// StatePrimary is the one version Encrypt uses; it is always enabled.
	StatePrimary KeyState = "primary"
	// StateEnabled versions decrypt but do not encrypt.
	StateEnabled KeyState = "enabled"
	// StateDisabled versions neither encrypt nor decrypt until re-enabled.
	StateDisabled KeyState = "disabled"
)

// KeyVersion describes one key version of a backend.
type KeyVersion struct {
	KeyID   string    `json:"keyID"`
	State   KeyState  `json:"state"`
	Created time.Time `json:"created"`
}

// Rotator is the optional capability of providers whose key versions can be
// managed from here. Its rules are refusals, enforced by every
// implementation: a new version is created enabled but not primary (so every
// plugin instance can decrypt with it before any encrypts with it); only an
// enabled version can be promoted; the primary cannot be disabled; key IDs are
// never reused. Destroying a key is deliberately not part of the interface.
type Rotator interface {
	// Versions lists every key version, oldest first.
	Versions(ctx context.Context) ([]KeyVersion, error)
	// CreateVersion adds a new enabled, non-primary version.
	CreateVersion(ctx context.Context) (KeyVersion, error)
	// Promote makes an enabled version the primary.
	Promote(ctx context.Context, keyID string) error
	// Disable stops a non-primary version from decrypting.
	Disable(ctx context.Context, keyID string) error
	// Enable lets a disabled version decrypt again.
	Enable(ctx context.Context, keyID string) error
}

// Refresher is the optional capability of providers that can reload their
// key state on demand (the plugin's background loop calls it; tests use it to
// avoid waiting for an interval).
//
// It is deliberately not Check. Check answers "does the backend work for
// us" and flips Status's health; it may cost a cryptographic round trip
// (Key Vault wraps and unwraps). Refresh answers "which versions exist and
// which is primary" and keeps the last good state when it fails, so a
// backend hiccup never takes away keys the plugin already knows. They run
// on their own intervals (checkInterval, refreshInterval), and a backend
// whose state never changes has nothing to refresh.
type Refresher interface {
	Refresh(ctx context.Context) error
}
