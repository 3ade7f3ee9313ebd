package providers

import "errors"

// Sentinel errors. Backends wrap them with %w and a short prefix naming the
// operation; package plugin maps them to gRPC codes in one place, and health
// and metrics classify failures by them.
var (
	// ErrKeyNotFound: the key_id names no key version this provider knows,
	// even after one refresh of backend state.
	ErrKeyNotFound = errors.New("key not found")
	// ErrKeyDisabled: the key version exists but is disabled.
	ErrKeyDisabled = errors.New("key disabled")
	// ErrInvalidCiphertext: the input was not produced by this provider for
	// this key_id (tampered, truncated, random, or bound to another key_id).
	ErrInvalidCiphertext = errors.New("invalid ciphertext")
	// ErrInvalidInput: a request that can never succeed (wrong plaintext
	// size, oversized annotations, malformed key_id).
	ErrInvalidInput = errors.New("invalid input")
	// ErrUnavailable: the backend could not be reached or is throttling;
	// retrying later may succeed.
	ErrUnavailable = errors.New("key backend unavailable")
	// ErrPermissionDenied: the backend refused our credentials.
	ErrPermissionDenied = errors.New("permission denied by key backend")
	// ErrRefused: a key lifecycle rule forbids the operation (disabling the
	// primary, promoting a disabled version, initializing twice).
	ErrRefused = errors.New("refused by key lifecycle rules")
)
