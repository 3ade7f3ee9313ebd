//go:build !cgo

package pkcs11

import (
	"context"
	"errors"

	"github.com/hashicorp/go-hclog"

	"github.com/kms-v2/kms-plugin/providers"
)

// errNoCgo: PKCS#11 modules are C libraries loaded with dlopen, which a
// binary built with CGO_ENABLED=0 cannot do. This file keeps such a build
// compiling, with a clear error instead of a missing backend.
var errNoCgo = errors.New("pkcs11: this binary was built without cgo (CGO_ENABLED=0) and cannot load PKCS#11 modules; use a build with CGO_ENABLED=1")

// Provider is the cgo-less placeholder; New never returns one.
type Provider struct{}

// New always fails in a build without cgo.
func New(ctx context.Context, cfg Config, logger hclog.Logger) (*Provider, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	return nil, errNoCgo
}

// Init always fails in a build without cgo.
func Init(ctx context.Context, cfg Config, logger hclog.Logger) (providers.KeyVersion, error) {
	if err := cfg.Validate(); err != nil {
		return providers.KeyVersion{}, err
	}
	return providers.KeyVersion{}, errNoCgo
}

// Encrypt fails: see errNoCgo.
func (p *Provider) Encrypt(context.Context, []byte) (providers.Sealed, error) {
	return providers.Sealed{}, errNoCgo
}

// Decrypt fails: see errNoCgo.
func (p *Provider) Decrypt(context.Context, providers.Sealed) ([]byte, error) { return nil, errNoCgo }

// PrimaryKeyID fails: see errNoCgo.
func (p *Provider) PrimaryKeyID(context.Context) (string, error) { return "", errNoCgo }

// Owns is false: this build cannot make or read any version.
func (p *Provider) Owns(string) bool { return false }

// Check fails: see errNoCgo.
func (p *Provider) Check(context.Context) error { return errNoCgo }

// Close does nothing.
func (p *Provider) Close() error { return nil }

// Refresh fails: see errNoCgo.
func (p *Provider) Refresh(context.Context) error { return errNoCgo }

// Versions fails: see errNoCgo.
func (p *Provider) Versions(context.Context) ([]providers.KeyVersion, error) { return nil, errNoCgo }

// CreateVersion fails: see errNoCgo.
func (p *Provider) CreateVersion(context.Context) (providers.KeyVersion, error) {
	return providers.KeyVersion{}, errNoCgo
}

// Promote fails: see errNoCgo.
func (p *Provider) Promote(context.Context, string) error { return errNoCgo }

// Disable fails: see errNoCgo.
func (p *Provider) Disable(context.Context, string) error { return errNoCgo }

// Enable fails: see errNoCgo.
func (p *Provider) Enable(context.Context, string) error { return errNoCgo }

// Stats reports nothing: see errNoCgo.
func (p *Provider) Stats() providers.Stats { return providers.Stats{} }

var (
	_ providers.Provider  = (*Provider)(nil)
	_ providers.Rotator   = (*Provider)(nil)
	_ providers.Refresher = (*Provider)(nil)
	_ providers.Reporter  = (*Provider)(nil)
)
