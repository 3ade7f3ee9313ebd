package file

import "github.com/kms-v2/kms-plugin/providers"

// Kind declares the file backend to the configuration and the binaries. A
// keyset file lives on one node, so its key state is per node by default.
var Kind = providers.Declare(providers.Kind{
	Name:        "file",
	KeyIDPrefix: Backend,
	Scope:       providers.ScopePerNode,
}, New, Init)

// Instance is the keyset path: two entries on one file are one key.
func (c *Config) Instance() string { return c.Path }
