// Package pkcs11 is the key provider for PKCS#11 hardware security modules
// (tested on SoftHSM2) and TPM 2.0 chips (tested on swtpm through
// tpm2-pkcs11). Key encryption keys are generated inside the token and
// never leave it. pkcs11.algorithm picks their kind:
//
//   - AES-256-GCM (default): AES-256 secret keys; the token seals and
//     opens every seed.
//   - RSA-OAEP-256: RSA key pairs, for tokens without AES-GCM (a TPM offers
//     RSA-OAEP, AES-CBC/CTR/ECB and HMAC). Seeds are wrapped in software
//     with the public key and unwrapped in the token.
//
// # Token layout
//
// AES-256-GCM: one token object per key version, labelled "<keyLabel>-<n>"
// with n counting up from 1: CKO_SECRET_KEY, CKK_AES, 32 bytes, CKA_TOKEN,
// CKA_PRIVATE and CKA_SENSITIVE true, CKA_EXTRACTABLE false.
//
// RSA-OAEP-256: one key pair per version, both halves labelled
// "<keyLabel>-<n>", made by C_GenerateKeyPair with pkcs11.keySize bits
// (2048, 3072 or 4096). The private half is CKA_TOKEN, CKA_PRIVATE,
// CKA_SENSITIVE and CKA_DECRYPT true, CKA_EXTRACTABLE and CKA_UNWRAP false,
// with CKA_ALLOWED_MECHANISMS [CKM_RSA_PKCS_OAEP]; CKA_SIGN false is asked
// for too, except from a token that refuses such a key (tpm2-pkcs11 makes
// every RSA key sign-capable; its CKA_ALLOWED_MECHANISMS still refuses
// signing, see TestTPM/KeyPairAttributes). The public half has CKA_ENCRYPT true. Every new pair must
// unwrap a test value wrapped with its public key before it becomes a
// version. A key label holds one kind of key: AES keys and RSA key pairs
// under one label are refused (ErrUnsafeKey), and so is a config whose
// algorithm does not match the keys (ErrWrongAlgorithm).
//
// Either way the key_id is "pkcs11:<tokenLabel>/<keyLabel>-<n>".
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
// A disabled AES version is one whose CKA_ENCRYPT and CKA_DECRYPT attributes
// are false. That choice puts the state where the token enforces it: a
// disabled key cannot decrypt through any application, not only through
// this plugin, and two processes cannot disagree about it. tpm2-pkcs11
// stores CKA_DECRYPT false on a private key but decrypts with it all the
// same, so a disabled RSA version is instead listed in the state object
// ("disabled"): this plugin refuses it, other instances from their next
// Refresh, and the token does not.
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
// RSA-OAEP-256: format 2 || RSA-OAEP ciphertext (as long as the modulus),
// SHA-256 and MGF1-SHA-256, empty label. The key_id selects exactly one
// version's private key, and another version's key cannot unwrap the
// ciphertext; a key_id label would bind it once more, but a TPM cannot
// carry one (see oaepMechanism). Encrypt uses the public key read at
// Refresh and makes no token call. Decrypt asks the token through a
// providers.Unwrapper: identical concurrent requests share one unwrap, and
// seeds are cached (pkcs11.unwrapCache, on by default) because a TPM
// unwrap takes tens of milliseconds and the apiserver reads every seed
// again after a restart. A disabled version is refused before the cache is
// consulted. AES-256-GCM mode has no cache: it asks the token on every
// call, so a version disabled on the token is refused at once.
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
//
// tpm2-pkcs11 reads a token's objects once, in C_Initialize, and never sees
// what another process creates or destroys afterwards: a version that
// kmsctl adds, or a promote it writes, would stay invisible to a running
// plugin. For that library every read of key state (Refresh, and before
// CreateVersion, Promote, Disable, Enable) first finalizes and initializes
// the module again, once all calls in flight have returned; it costs tens
// of milliseconds and a new login. tpm2-pkcs11 also leaves a failed
// C_Decrypt's operation active on its session, so such a session is closed
// rather than reused.
package pkcs11
