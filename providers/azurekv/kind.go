package azurekv

import (
	"net/url"

	"github.com/kms-v2/kms-plugin/providers"
)

// Kind declares the azureKeyVault backend to the configuration and the
// binaries. One vault serves every node, so its key state is shared.
var Kind = providers.Declare(providers.Kind{
	Name:        "azureKeyVault",
	KeyIDPrefix: Backend,
	Scope:       providers.ScopeShared,
}, New, Init)

// Instance is the vault host and key name, as the key_ids carry them.
func (c *Config) Instance() string {
	host := c.VaultURL
	if u, err := url.Parse(c.VaultURL); err == nil && u.Host != "" {
		host = vaultHost(u.Host)
	}
	return host + "/" + c.KeyName
}
