// Package pkcs11 is the key provider for PKCS#11 hardware security modules
// (tested on SoftHSM2). Key encryption keys are AES-256 secret-key objects
// generated inside the token; they never leave it.
//
// # Token layout
//
// One token object per key version, labelled "<keyLabel>-<n>" with n counting
// up from 1: CKO_SECRET_KEY, CKK_AES, 32 bytes, CKA_TOKEN, CKA_PRIVATE and
// CKA_SENSITIVE true, CKA_EXTRACTABLE false. The key_id is "pkcs11:<tokenLabel>/<keyLabel>-<n>".
//
// One CKO_DATA object labelled "<keyLabel>.state" (private, so it is only
// readable after login) holds a small JSON document: which version is the
// primary, the high-water mark of n (so a number is never reused even after
// its object is deleted), and each version's creation time. Every plugin
// instance and kmsctl process using the token reads the primary from there,
// which is how instances follow a promote after their next Refresh.
// PKCS#11 makes a data object's CKA_VALUE read-only after creation, so a
// write creates the successor (with a higher serial) before it removes the
// predecessor; a reader that finds both takes the higher serial. (Do not
// "fix" this with C_SetAttributeValue: besides failing with
// CKR_ATTRIBUTE_READ_ONLY, on SoftHSM2 2.6.1 that failed call crashed
// concurrent crypto operations in the same process.)
//
// A disabled version is one whose CKA_ENCRYPT and CKA_DECRYPT attributes are
// false. That choice puts the state where the token enforces it: a disabled
// key cannot decrypt through any application, not only through this plugin,
// and two processes cannot disagree about it.
//
// # Ciphertext
//
// version(1) || IV(12) || AES-GCM ciphertext with 16-byte tag, where the
// associated data is version || key_id, so a ciphertext relabelled with
// another key_id fails authentication. The IV is a fresh random value per
// call; if a token ignores the caller's IV and picks its own (some FIPS-mode
// HSMs do), the IV it reports back is the one stored. Kube-apiserver wraps a
// new seed rarely (at start and on key change), so random 96-bit IVs stay far
// below the 2^32 messages-per-key bound.
//
// A tampered ciphertext should fail C_Decrypt with CKR_ENCRYPTED_DATA_INVALID;
// SoftHSM2 reports CKR_GENERAL_ERROR instead, so a CKR_GENERAL_ERROR from
// C_Decrypt on a session that still answers C_GetSessionInfo is taken as
// ErrInvalidCiphertext, not as a sick token.
//
// # Why miekg/pkcs11 and not crypto11
//
// The provider needs exact control over things crypto11 decides for its
// callers: the key template (sensitive, non-extractable, start date, modifiable
// CKA_DECRYPT for the disabled state), CK_GCM_PARAMS with the key_id as AAD,
// CKO_DATA objects for shared state, the raw CK_RV of every call (to tell a
// lost session from a wrong PIN from a tampered ciphertext), and the session
// pool's recovery (re-login, reopen, slot rediscovery after a device
// reset). miekg/pkcs11 is a thin binding that exposes all of those and hides
// nothing; crypto11 builds on it.
//
// # Sessions
//
// A bounded pool of read/write sessions serves concurrent calls; a session is
// used by one goroutine at a time. Login is per application and token, so it
// happens once and again only after the token reports CKR_USER_NOT_LOGGED_IN
// or all sessions were lost. A rejected PIN is never retried (a real HSM
// locks the user after a few attempts): the provider reports
// ErrPermissionDenied until it is recreated.
//
// A PKCS#11 module may be initialized once per process, so every Provider in
// a process shares one loaded module per library path (reference counted);
// this lets two providers on one token, or on two tokens of one module, live
// side by side.
package pkcs11
