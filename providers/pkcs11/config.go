package pkcs11

import (
	"fmt"
	"path/filepath"
	"strings"
)

// DefaultSessions is the size of the session pool when Config.Sessions is 0:
// enough for the apiserver's bursts of Decrypt calls at startup without
// exhausting small HSMs' session limits.
const DefaultSessions = 8

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
	// KeyLabel is the prefix of the key objects' labels: versions are
	// "<keyLabel>-1", "<keyLabel>-2", ...
	KeyLabel string `json:"keyLabel"`
	// Sessions bounds the session pool (0 means DefaultSessions).
	Sessions int `json:"sessions,omitempty"`
}

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

func (c Config) sessions() int {
	if c.Sessions == 0 {
		return DefaultSessions
	}
	return c.Sessions
}
