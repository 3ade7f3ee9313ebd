// Package azurekv is the Azure Key Vault key provider: it wraps the
// apiserver's 32-byte seeds with RSA-OAEP-256 (or RSA-OAEP) under one
// version of one Key Vault key (RSA or RSA-HSM), through the azkeys SDK and
// an azidentity credential (workload identity, managed identity, client
// secret or certificate from a file, or the default chain).
//
// # Key IDs
//
// A key_id is azurekv:<vault host>/<key>/<version>, taken from the version's
// kid, so it changes with every version and is never reused. Decrypt always
// names the version explicitly. RSA-OAEP has no associated data; the binding
// between ciphertext and key_id is that only that version's private key can
// unwrap it, and a relabelled ciphertext fails with ErrInvalidCiphertext.
//
// # Which version is primary
//
// In order: the version pinned by keyVersion in config; else, once any
// version carries the tag kms-plugin-primary whose value is that version's
// own ID, the newest such enabled version (kmsctl's Promote writes that tag
// and then removes it from the others); else the newest enabled version,
// which is what Key Vault's rotation policy produces. CreateVersion tags the
// current primary before it adds a version, so a new version never becomes
// primary before Promote; a key that rotation policy manages should not also
// be rotated with kmsctl, or it should have its tags removed to go back to
// "newest enabled". Versions outside their nbf/exp window are never primary.
//
// # Followers and failures
//
// Key state (versions, enabled flags, tags) is listed from the vault by
// Refresh, which the plugin runs every few seconds and Decrypt runs once on
// an unknown version. Calls use bounded retries that honour Retry-After and
// fit in the apiserver's 3 s deadline; a circuit breaker fails calls fast
// while the vault is throttling or down; identical concurrent Decrypts share
// one unwrap; unwrapped seeds are cached for minutes (bounded, zeroed on
// eviction) so an apiserver restart does not stampede the vault. Status
// never calls the vault: PrimaryKeyID reads cached state, and Check probes
// in the background.
//
// Against a loopback vault or authority (the e2e/keyvault-emulator) the
// challenge-resource check and Entra instance discovery are skipped, since
// neither can pass locally; real endpoints keep both.
package azurekv
