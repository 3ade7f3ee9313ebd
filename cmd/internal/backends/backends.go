// Package backends is the one visible list of compiled-in key providers,
// and opens the providers a loaded config names. Each backend declares
// itself once (providers.Kind, in its own package); this list is where a
// binary chooses which exist. Only the binaries under cmd/ import it, so
// the service, the config and the orchestrator stay free of any backend.
package backends

import (
	"context"
	"fmt"

	"github.com/hashicorp/go-hclog"

	"github.com/kms-v2/kms-plugin/config"
	"github.com/kms-v2/kms-plugin/providers"
	"github.com/kms-v2/kms-plugin/providers/azurekv"
	"github.com/kms-v2/kms-plugin/providers/file"
	"github.com/kms-v2/kms-plugin/providers/multi"
	"github.com/kms-v2/kms-plugin/providers/pkcs11"
)

// Kinds are the compiled-in backends, as config.Load takes them.
var Kinds = providers.Kinds{file.Kind, pkcs11.Kind, azurekv.Kind}

// Load reads the configuration file with the compiled-in backends.
func Load(path string) (*config.Config, error) { return config.Load(path, Kinds) }

// Open opens every configured provider, in order, each logging with its
// entry's name. On any failure the ones already open are closed.
func Open(ctx context.Context, cfg *config.Config, logger hclog.Logger) (*multi.Provider, error) {
	var entries []multi.Entry
	closeAll := func() {
		for _, e := range entries {
			e.Provider.Close()
		}
	}
	for _, e := range cfg.Providers {
		p, err := OpenEntry(ctx, e, logger)
		if err != nil {
			closeAll()
			return nil, err
		}
		entries = append(entries, multi.Entry{Name: e.Name, Scope: e.KeyState, Provider: p})
	}
	m, err := multi.New(ctx, entries)
	if err != nil {
		closeAll()
		return nil, err
	}
	return m, nil
}

// OpenEntry opens one configured provider.
func OpenEntry(ctx context.Context, e config.Entry, logger hclog.Logger) (providers.Provider, error) {
	p, err := e.Kind.Open(ctx, e.Section, logger.With("provider", e.Name))
	if err != nil {
		return nil, fmt.Errorf("provider %s: %w", e.Name, err)
	}
	return p, nil
}

// Init creates the first key version of the entry.
func Init(ctx context.Context, e config.Entry, logger hclog.Logger) (providers.KeyVersion, error) {
	return e.Kind.Init(ctx, e.Section, logger.With("provider", e.Name))
}

// Entry returns the entry named name, or the first when name is empty.
func Entry(cfg *config.Config, name string) (config.Entry, error) {
	if name == "" {
		return cfg.Providers[0], nil
	}
	var names []string
	for _, e := range cfg.Providers {
		if e.Name == name {
			return e, nil
		}
		names = append(names, e.Name)
	}
	return config.Entry{}, fmt.Errorf("--provider %q: the config has no such provider; it has %v", name, names)
}

// OpenRotator opens one entry and its Rotator capability, or fails naming
// the entry when its backend cannot manage versions from here.
func OpenRotator(ctx context.Context, e config.Entry, logger hclog.Logger) (providers.Provider, providers.Rotator, error) {
	p, err := OpenEntry(ctx, e, logger)
	if err != nil {
		return nil, nil, err
	}
	r, ok := p.(providers.Rotator)
	if !ok {
		p.Close()
		return nil, nil, fmt.Errorf("provider %s (%s) cannot manage key versions from here; use the backend's own tools", e.Name, e.Kind.Name)
	}
	return p, r, nil
}
