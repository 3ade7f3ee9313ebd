// Package fipstest lets tests state how they behave under
// GODEBUG=fips140=only, where the standard library refuses cryptography
// that FIPS 140-3 does not approve (make test-fips runs the tests that way;
// docs/fips.md lists the exclusions and why).
package fipstest

import (
	"crypto/fips140"
	"testing"
)

// Only reports whether FIPS 140-only mode is enforced
// (GODEBUG=fips140=only).
func Only() bool { return fips140.Enforced() }

// SkipIfOnly skips t when FIPS 140-only mode is enforced, with reason. It is
// for tests that drive code FIPS 140-only mode forbids outside this module
// (kube-apiserver's envelope transformer derives its DEKs with AES-GCM at
// caller-chosen nonces), never for the plugin's own code paths.
func SkipIfOnly(t testing.TB, reason string) {
	t.Helper()
	if Only() {
		t.Skip("excluded under GODEBUG=fips140=only: " + reason)
	}
}

// RSABits returns bits, raised to 2048 when FIPS 140-only mode is enforced:
// crypto/rsa refuses smaller keys there, and tests use smaller ones only
// to generate keys quickly.
func RSABits(bits int) int {
	if Only() && bits < 2048 {
		return 2048
	}
	return bits
}
