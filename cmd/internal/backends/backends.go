// Package backends is the one visible map of compiled-in key providers: it
// turns the provider section of a loaded config into a ready
// providers.Provider, or creates a backend's first key. Only the binaries
// under cmd/ import it, so the service and the orchestrator stay free of any
// backend.
package backends

import (
	"context"
	"fmt"

	"github.com/hashicorp/go-hclog"

	"github.com/kms-v2/kms-plugin/config"
	"github.com/kms-v2/kms-plugin/providers"
	"github.com/kms-v2/kms-plugin/providers/azurekv"
	"github.com/kms-v2/kms-plugin/providers/file"
	"github.com/kms-v2/kms-plugin/providers/pkcs11"
)

// backend opens a provider or creates its first key from its config section.
type backend struct {
	open func(context.Context, config.Provider, hclog.Logger) (providers.Provider, error)
	init func(context.Context, config.Provider, hclog.Logger) (providers.KeyVersion, error)
}

// registry maps the YAML name of each backend section to its constructors.
var registry = map[string]backend{
	"file": {
		open: func(ctx context.Context, p config.Provider, l hclog.Logger) (providers.Provider, error) {
			return file.New(ctx, *p.File, l)
		},
		init: func(ctx context.Context, p config.Provider, l hclog.Logger) (providers.KeyVersion, error) {
			return file.Init(ctx, *p.File, l)
		},
	},
	"pkcs11": {
		open: func(ctx context.Context, p config.Provider, l hclog.Logger) (providers.Provider, error) {
			return pkcs11.New(ctx, *p.PKCS11, l)
		},
		init: func(ctx context.Context, p config.Provider, l hclog.Logger) (providers.KeyVersion, error) {
			return pkcs11.Init(ctx, *p.PKCS11, l)
		},
	},
	"azureKeyVault": {
		open: func(ctx context.Context, p config.Provider, l hclog.Logger) (providers.Provider, error) {
			return azurekv.New(ctx, *p.AzureKeyVault, l)
		},
		init: func(ctx context.Context, p config.Provider, l hclog.Logger) (providers.KeyVersion, error) {
			return azurekv.Init(ctx, *p.AzureKeyVault, l)
		},
	},
}

func lookup(p config.Provider) (string, backend, error) {
	name, _, err := p.Backend()
	if err != nil {
		return "", backend{}, err
	}
	b, ok := registry[name]
	if !ok {
		return "", backend{}, fmt.Errorf("provider.%s is not compiled into this binary", name)
	}
	return name, b, nil
}

// Open returns the configured provider, ready to use.
func Open(ctx context.Context, p config.Provider, logger hclog.Logger) (providers.Provider, error) {
	_, b, err := lookup(p)
	if err != nil {
		return nil, err
	}
	return b.open(ctx, p, logger)
}

// Init creates the configured backend's first key version.
func Init(ctx context.Context, p config.Provider, logger hclog.Logger) (providers.KeyVersion, error) {
	_, b, err := lookup(p)
	if err != nil {
		return providers.KeyVersion{}, err
	}
	return b.init(ctx, p, logger)
}

// OpenRotator returns the configured provider and its Rotator capability,
// or an error naming the backend when it cannot manage versions.
func OpenRotator(ctx context.Context, p config.Provider, logger hclog.Logger) (providers.Provider, providers.Rotator, error) {
	name, b, err := lookup(p)
	if err != nil {
		return nil, nil, err
	}
	prov, err := b.open(ctx, p, logger)
	if err != nil {
		return nil, nil, err
	}
	r, ok := prov.(providers.Rotator)
	if !ok {
		prov.Close()
		return nil, nil, fmt.Errorf("provider.%s cannot manage key versions from here; use the backend's own tools", name)
	}
	return prov, r, nil
}
