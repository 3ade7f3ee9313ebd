// Package multi is one providers.Provider made of several configured
// entries: the first encrypts, every entry decrypts what it owns. That is
// how a cluster moves from one key backend to another inside one plugin:
// the new backend is added after the old one (every plugin can decrypt
// with it), then moved first (every plugin encrypts with it), then the old
// one is dropped once etcd holds nothing under it.
package multi

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/kms-v2/kms-plugin/providers"
)

// Entry is one configured provider with its name and key-state scope.
type Entry struct {
	// Name labels the entry in logs, metrics, health and kmsctl.
	Name string
	// Scope says whether every node sees the same key state.
	Scope providers.Scope
	// Provider does the entry's cryptography.
	Provider providers.Provider
}

// Provider routes Encrypt to the first entry and Decrypt to the entry that
// owns the key_id. It is safe for concurrent use.
type Provider struct {
	entries []Entry
}

var (
	_ providers.Provider  = (*Provider)(nil)
	_ providers.Refresher = (*Provider)(nil)
)

// New checks the entries and returns their router. Entries are refused
// when none is given, two share a name, or one owns another's primary
// key_id (two keyset files of the same name, say): a Decrypt could not
// tell them apart.
func New(ctx context.Context, entries []Entry) (*Provider, error) {
	if len(entries) == 0 {
		return nil, errors.New("multi: no providers; configure at least one")
	}
	names := map[string]bool{}
	for _, e := range entries {
		if names[e.Name] {
			return nil, fmt.Errorf("multi: two providers are named %q", e.Name)
		}
		names[e.Name] = true
	}
	for i, e := range entries {
		id, err := e.Provider.PrimaryKeyID(ctx)
		if err != nil {
			continue // a decrypt-only entry may have no primary to compare
		}
		for j, o := range entries {
			if i != j && o.Provider.Owns(id) {
				return nil, fmt.Errorf("providers %q and %q both claim key_id %s; they reach the same key (or two keys of one name): remove one, or give one a key of another name", e.Name, o.Name, id)
			}
		}
	}
	return &Provider{entries: entries}, nil
}

// Entries returns the entries in order; the first encrypts.
func (p *Provider) Entries() []Entry { return p.entries }

// Encrypter is the entry that encrypts: the first.
func (p *Provider) Encrypter() Entry { return p.entries[0] }

// Route returns the entry that owns keyID. None owning it is
// ErrKeyNotFound: the object was written by a provider no longer
// configured, or the key_id is not one of ours.
func (p *Provider) Route(keyID string) (Entry, error) {
	for _, e := range p.entries {
		if e.Provider.Owns(keyID) {
			return e, nil
		}
	}
	if _, err := providers.ParseKeyID(keyID); err != nil {
		return Entry{}, err
	}
	return Entry{}, fmt.Errorf("key_id %s belongs to none of the configured providers (%s); was its provider removed from the config while objects still use it? %w", keyID, p.names(), providers.ErrKeyNotFound)
}

func (p *Provider) names() string {
	var out []string
	for _, e := range p.entries {
		out = append(out, e.Name)
	}
	return strings.Join(out, ", ")
}

// Encrypt wraps with the first entry's primary.
func (p *Provider) Encrypt(ctx context.Context, plaintext []byte) (providers.Sealed, error) {
	return p.entries[0].Provider.Encrypt(ctx, plaintext)
}

// Decrypt unwraps with the entry that owns s.KeyID.
func (p *Provider) Decrypt(ctx context.Context, s providers.Sealed) ([]byte, error) {
	e, err := p.Route(s.KeyID)
	if err != nil {
		return nil, err
	}
	return e.Provider.Decrypt(ctx, s)
}

// PrimaryKeyID is the first entry's: the key_id Status reports.
func (p *Provider) PrimaryKeyID(ctx context.Context) (string, error) {
	return p.entries[0].Provider.PrimaryKeyID(ctx)
}

// Owns reports whether any entry owns keyID.
func (p *Provider) Owns(keyID string) bool {
	_, err := p.Route(keyID)
	return err == nil
}

// Check checks every entry; the error names each entry that failed.
// The plugin checks entries one by one instead, to report each.
func (p *Provider) Check(ctx context.Context) error {
	return p.each(func(e Entry) error { return e.Provider.Check(ctx) })
}

// Refresh reloads every entry's key state that can be reloaded.
func (p *Provider) Refresh(ctx context.Context) error {
	return p.each(func(e Entry) error {
		if r, ok := e.Provider.(providers.Refresher); ok {
			return r.Refresh(ctx)
		}
		return nil
	})
}

// Close closes every entry.
func (p *Provider) Close() error {
	return p.each(func(e Entry) error { return e.Provider.Close() })
}

// each runs f on every entry and joins the failures, each named.
func (p *Provider) each(f func(Entry) error) error {
	var errs []error
	for _, e := range p.entries {
		if err := f(e); err != nil {
			errs = append(errs, fmt.Errorf("provider %s: %w", e.Name, err))
		}
	}
	return joinOneLine(errs)
}

// joinOneLine joins errors on one line (errors.Join uses newlines) and
// keeps every one of them for errors.Is.
func joinOneLine(errs []error) error {
	if len(errs) == 0 {
		return nil
	}
	args := make([]any, len(errs))
	for i, err := range errs {
		args[i] = err
	}
	return fmt.Errorf(strings.TrimSuffix(strings.Repeat("%w; ", len(errs)), "; "), args...)
}
