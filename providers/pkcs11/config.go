package pkcs11

import (
	"fmt"
	"path/filepath"
	"strings"

	"github.com/kms-v2/kms-plugin/providers"
)

// DefaultSessions is the size of the session pool when Config.Sessions is 0:
// enough for the apiserver's bursts of Decrypt calls at startup without
// exhausting small HSMs' session limits.
const DefaultSessions = 8

// Algorithms, named as the azureKeyVault provider names its own.
const (
	// AlgorithmAESGCM: AES-256 secret keys, seeds sealed in the token with
	// AES-GCM. The default, and the only choice before algorithm existed.
	AlgorithmAESGCM = "AES-256-GCM"
	// AlgorithmRSAOAEP: RSA key pairs, seeds wrapped in software with the
	// public key and unwrapped in the token with RSA-OAEP (SHA-256,
	// MGF1-SHA-256). For tokens without AES-GCM, such as a TPM 2.0 through
	// tpm2-pkcs11.
	AlgorithmRSAOAEP = "RSA-OAEP-256"
)

// User types, the roles a PIN can log in as (pkcs11.userType).
const (
	// UserTypeUser is PKCS#11's normal user, CKU_USER: every token has it,
	// and it may create objects (Thales Luna calls it Crypto Officer).
	UserTypeUser = "user"
	// UserTypeCryptoUser is Thales Luna's Crypto User (CKU_CRYPTO_USER,
	// vendor-defined 0x80000001): it may use the partition's keys but not
	// create, change or destroy objects.
	UserTypeCryptoUser = "cryptoUser"
)

// Defaults for the RSA-OAEP-256 fields, the same as the azureKeyVault
// provider's so a key means the same strength on either backend.
const (
	// DefaultKeySize for RSA versions. Many TPMs make 2048-bit keys only;
	// `kmsctl keys init` then says to set keySize: 2048.
	DefaultKeySize = 3072
	// DefaultCacheSize and DefaultCacheTTL are the shared unwrap cache's.
	DefaultCacheSize = providers.DefaultUnwrapCacheSize
	DefaultCacheTTL  = providers.DefaultUnwrapCacheTTL
)

// Config is the provider's section of the plugin config YAML (key `pkcs11`
// under `provider:`). The PIN is read only from a file, never from the
// config itself, so the config can be world-readable and kept in git.
type Config struct {
	// Module is the absolute path of the PKCS#11 library, for example
	// /usr/lib/softhsm/libsofthsm2.so. Absolute so the dynamic loader never
	// picks a library from a search path.
	Module string `json:"module"`
	// TokenLabel selects the token (not the slot number, which can change
	// when tokens are added or a device resets).
	TokenLabel string `json:"tokenLabel"`
	// PinFile holds the user PIN (a trailing newline is ignored); it must not
	// be readable by group or others.
	PinFile string `json:"pinFile"`
	// UserType is the role the PIN logs in as: UserTypeUser (default) or,
	// on HSMs that have one, a role that may use keys but not create or
	// change objects (UserTypeCryptoUser), for the plugin's config while
	// kmsctl's own config logs in as the user that owns the keys. See
	// docs/identities.md.
	UserType string `json:"userType,omitempty"`
	// KeyLabel is the prefix of the key objects' labels: versions are
	// "<keyLabel>-1", "<keyLabel>-2", ...
	KeyLabel string `json:"keyLabel"`
	// Sessions bounds the session pool (0 means DefaultSessions).
	Sessions int `json:"sessions,omitempty"`
	// Algorithm is AES-256-GCM (default) or RSA-OAEP-256. It must match
	// the keys already on the token under KeyLabel: one key label holds
	// one kind of key.
	Algorithm string `json:"algorithm,omitempty"`
	// KeySize is the modulus size in bits of the RSA versions Init and
	// CreateVersion make: 2048, 3072 (default) or 4096. RSA only; existing
	// versions keep their size.
	KeySize int `json:"keySize,omitempty"`
	// UnwrapCache bounds the in-memory cache of unwrapped seeds in
	// RSA-OAEP-256 mode, where every unwrap is a slow private-key
	// operation. Unset: DefaultCacheSize entries for DefaultCacheTTL; size
	// 0 turns it off. Refused with AES-256-GCM, which asks the token on
	// every Decrypt so that a version disabled on the token is refused at
	// once, by any process.
	UnwrapCache *UnwrapCache `json:"unwrapCache,omitempty"`

	// disableCoalescing makes every RSA Decrypt call the token even when
	// an identical one is in flight; only the benchmark sets it.
	disableCoalescing bool
}

// UnwrapCache and Duration are the shared section types, kept under
// their old names.
type (
	UnwrapCache = providers.UnwrapCache
	Duration    = providers.Duration
)

// ResolvePaths makes the relative PinFile and Module paths absolute against
// dir, the folder of the config file, so the plugin does not depend on its
// working directory. A bare module name without a slash is left alone and
// then refused by Validate.
func (c *Config) ResolvePaths(dir string) {
	if c.PinFile != "" && !filepath.IsAbs(c.PinFile) {
		c.PinFile = filepath.Join(dir, c.PinFile)
	}
	if strings.Contains(c.Module, "/") && !filepath.IsAbs(c.Module) {
		c.Module = filepath.Join(dir, c.Module)
	}
}

// maxTokenLabel is the size of CK_TOKEN_INFO.label.
const maxTokenLabel = 32

// maxKeyLabel keeps "<keyLabel>.state" and "<keyLabel>-<n>" short enough
// for tokens that limit CKA_LABEL.
const maxKeyLabel = 64

// Validate checks the config without touching the token.
func (c Config) Validate() error {
	switch {
	case c.Module == "":
		return fmt.Errorf("pkcs11.module: required; set it to the PKCS#11 library path, e.g. /usr/lib/softhsm/libsofthsm2.so")
	case !filepath.IsAbs(c.Module):
		return fmt.Errorf("pkcs11.module %q: want an absolute path so the loader cannot pick another library", c.Module)
	case c.TokenLabel == "":
		return fmt.Errorf("pkcs11.tokenLabel: required; set it to the label given at token init (softhsm2-util --init-token --label ...)")
	case len(c.TokenLabel) > maxTokenLabel:
		return fmt.Errorf("pkcs11.tokenLabel %q: %d bytes, a token label has at most %d", c.TokenLabel, len(c.TokenLabel), maxTokenLabel)
	case c.PinFile == "":
		return fmt.Errorf("pkcs11.pinFile: required; put the user PIN in a file with mode 0600 and name it here")
	case c.KeyLabel == "":
		return fmt.Errorf("pkcs11.keyLabel: required; set a prefix for the key objects' labels, e.g. k8s-kek")
	case len(c.KeyLabel) > maxKeyLabel:
		return fmt.Errorf("pkcs11.keyLabel %q: %d bytes, at most %d allowed", c.KeyLabel, len(c.KeyLabel), maxKeyLabel)
	case c.Sessions < 0:
		return fmt.Errorf("pkcs11.sessions: %d; want 0 (default %d) or a positive pool size", c.Sessions, DefaultSessions)
	case c.UserType != "" && c.UserType != UserTypeUser && c.UserType != UserTypeCryptoUser:
		return fmt.Errorf("pkcs11.userType %q: want %s (default, PKCS#11's CKU_USER) or %s (Thales Luna's Crypto User, for the plugin's use-only login)", c.UserType, UserTypeUser, UserTypeCryptoUser)
	}
	if err := c.validateAlgorithm(); err != nil {
		return err
	}
	// The token label is part of every key_id, which must be printable ASCII
	// without spaces; "/" separates it from the object label.
	for i := 0; i < len(c.TokenLabel); i++ {
		if ch := c.TokenLabel[i]; ch <= ' ' || ch > '~' || ch == '/' {
			return fmt.Errorf("pkcs11.tokenLabel %q: byte %d is not allowed; use printable ASCII without spaces or '/' (it is part of the key_id)", c.TokenLabel, i)
		}
	}
	for i := 0; i < len(c.KeyLabel); i++ {
		ch := c.KeyLabel[i]
		if !(ch >= 'a' && ch <= 'z' || ch >= 'A' && ch <= 'Z' || ch >= '0' && ch <= '9' || ch == '-' || ch == '_' || ch == '.') {
			return fmt.Errorf("pkcs11.keyLabel %q: byte %d is not allowed; use letters, digits, '-', '_' and '.'", c.KeyLabel, i)
		}
	}
	return nil
}

// validateAlgorithm checks algorithm and the fields only RSA uses.
func (c Config) validateAlgorithm() error {
	switch c.Algorithm {
	case "", AlgorithmAESGCM, AlgorithmRSAOAEP:
	default:
		return fmt.Errorf("pkcs11.algorithm %q: want %s (default) or %s", c.Algorithm, AlgorithmAESGCM, AlgorithmRSAOAEP)
	}
	if !c.rsa() {
		switch {
		case c.KeySize != 0:
			return fmt.Errorf("pkcs11.keySize: only used with algorithm %s (AES keys are always 256 bits); remove it", AlgorithmRSAOAEP)
		case c.UnwrapCache != nil:
			return fmt.Errorf("pkcs11.unwrapCache: only used with algorithm %s (AES-GCM asks the token on every Decrypt); remove it", AlgorithmRSAOAEP)
		}
		return nil
	}
	switch c.KeySize {
	case 0, 2048, 3072, 4096:
	default:
		return fmt.Errorf("pkcs11.keySize %d: want 2048, 3072 (default) or 4096", c.KeySize)
	}
	if err := c.UnwrapCache.Validate("pkcs11.unwrapCache"); err != nil {
		return err
	}
	return nil
}

// algorithm is Algorithm with its default.
func (c Config) algorithm() string {
	if c.Algorithm == "" {
		return AlgorithmAESGCM
	}
	return c.Algorithm
}

// rsa reports whether the config asks for RSA-OAEP-256.
func (c Config) rsa() bool { return c.Algorithm == AlgorithmRSAOAEP }

func (c Config) keySize() int {
	if c.KeySize == 0 {
		return DefaultKeySize
	}
	return c.KeySize
}

// unwrapOptions shapes the RSA mode's Unwrapper from UnwrapCache.
func (c Config) unwrapOptions() providers.UnwrapOptions {
	return c.UnwrapCache.Options(c.disableCoalescing)
}

// userType is UserType with its default, for messages.
func (c Config) userType() string {
	if c.UserType == "" {
		return UserTypeUser
	}
	return c.UserType
}

func (c Config) sessions() int {
	if c.Sessions == 0 {
		return DefaultSessions
	}
	return c.Sessions
}
