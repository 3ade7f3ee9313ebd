package providers

import (
	"context"
	"fmt"
	"slices"
	"strings"

	"github.com/hashicorp/go-hclog"
)

// Scope says whether every node sees the same key state. It is a property
// of one configured provider, not of its kind: a PKCS#11 token may be a
// network HSM (shared) or the node's TPM (per node).
type Scope string

// Scopes of key state.
const (
	// ScopeShared: one backend serves every node (Key Vault, a network
	// HSM). A version created anywhere is visible to every plugin, which
	// looks an unknown key_id up once before failing, so a promote needs
	// no propagation wait.
	ScopeShared Scope = "shared"
	// ScopePerNode: each node holds its own copy (a keyset file, a TPM).
	// A new version reaches another node only when the operator copies it
	// there, so a rotation on several apiservers must be told it was.
	ScopePerNode Scope = "perNode"
)

// Valid reports whether s is a known scope.
func (s Scope) Valid() bool { return s == ScopeShared || s == ScopePerNode }

// KindConfig is one backend's section of the configuration file, as
// decoded from YAML into the kind's own type.
type KindConfig interface {
	// ResolvePaths makes relative file paths absolute against dir, the
	// configuration file's folder.
	ResolvePaths(dir string)
	// Validate checks the section, naming the field and the fix.
	Validate() error
	// Instance names the key the section reaches within its kind (a
	// keyset path, a token and key label, a vault and key name), so two
	// entries for the same key are refused before anything starts.
	Instance() string
}

// Kind is everything the configuration and the binaries know of one
// backend, declared once in the backend's package.
type Kind struct {
	// Name is the YAML key of its section: "file", "pkcs11", "azureKeyVault".
	Name string
	// KeyIDPrefix is the backend part of every key_id it makes.
	KeyIDPrefix string
	// Scope is the default scope of its key state; an entry can override it.
	Scope Scope
	// NewConfig returns an empty section to decode into.
	NewConfig func() KindConfig
	// Open returns a ready provider for a validated section.
	Open func(context.Context, KindConfig, hclog.Logger) (Provider, error)
	// Init creates the first key version.
	Init func(context.Context, KindConfig, hclog.Logger) (KeyVersion, error)
}

// Kinds is the list of compiled-in backends, in the order help text
// names them.
type Kinds []Kind

// Lookup returns the kind whose YAML name is name.
func (ks Kinds) Lookup(name string) (Kind, bool) {
	i := slices.IndexFunc(ks, func(k Kind) bool { return k.Name == name })
	if i < 0 {
		return Kind{}, false
	}
	return ks[i], true
}

// Names lists the YAML names, for errors that say what is known.
func (ks Kinds) Names() string {
	var names []string
	for _, k := range ks {
		names = append(names, k.Name)
	}
	return strings.Join(names, ", ")
}

// configPtr is a pointer to a kind's section type.
type configPtr[C any] interface {
	*C
	KindConfig
}

// Declare fills k's NewConfig, Open and Init from a backend's own typed
// constructors, so each backend states them once and no caller asserts
// section types by hand.
func Declare[C any, PC configPtr[C], P Provider](k Kind, open func(context.Context, C, hclog.Logger) (P, error), initFn func(context.Context, C, hclog.Logger) (KeyVersion, error)) Kind {
	k.NewConfig = func() KindConfig { return PC(new(C)) }
	k.Open = func(ctx context.Context, c KindConfig, l hclog.Logger) (Provider, error) {
		cfg, err := sectionOf[C, PC](k.Name, c)
		if err != nil {
			return nil, err
		}
		p, err := open(ctx, *cfg, l)
		if err != nil {
			return nil, err
		}
		return p, nil
	}
	k.Init = func(ctx context.Context, c KindConfig, l hclog.Logger) (KeyVersion, error) {
		cfg, err := sectionOf[C, PC](k.Name, c)
		if err != nil {
			return KeyVersion{}, err
		}
		return initFn(ctx, *cfg, l)
	}
	return k
}

// sectionOf asserts a section's type; a wrong type is a wiring bug,
// reported rather than panicking.
func sectionOf[C any, PC configPtr[C]](kind string, c KindConfig) (PC, error) {
	pc, ok := c.(PC)
	if !ok || pc == nil {
		return nil, fmt.Errorf("%s: got a %T section, want %T", kind, c, PC(nil))
	}
	return pc, nil
}
