package pkcs11

import "github.com/kms-v2/kms-plugin/providers"

// Kind declares the pkcs11 backend to the configuration and the binaries.
// The default scope is shared, as for a network HSM; a token that lives on
// the node (a TPM, SoftHSM2 files) is set to perNode in its entry.
var Kind = providers.Declare(providers.Kind{
	Name:        "pkcs11",
	KeyIDPrefix: "pkcs11",
	Scope:       providers.ScopeShared,
}, New, Init)

// Instance is the token and key label, as the key_ids carry them.
func (c *Config) Instance() string { return c.TokenLabel + "/" + c.KeyLabel }
