package config

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"

	"github.com/kms-v2/kms-plugin/providers"
)

// Entry is one key provider of the plugin: a name, the scope of its key
// state, and exactly one backend section (`file:`, `pkcs11:`,
// `azureKeyVault:`, or whatever kinds the binary was built with).
type Entry struct {
	// Name labels the entry in logs, metrics, health and kmsctl. Default:
	// the backend's YAML name, then "-2", "-3" for repeats.
	Name string `json:"name,omitempty"`
	// KeyState overrides the kind's default scope: "shared" when every
	// node sees the same key state (Key Vault, a network HSM), "perNode"
	// when each node holds its own (a keyset file, a TPM).
	KeyState providers.Scope `json:"keyState,omitempty"`

	// Kind and Section are the resolved backend, set by Parse.
	Kind    providers.Kind       `json:"-"`
	Section providers.KindConfig `json:"-"`

	// sections holds the backend keys as read, until Parse resolves them
	// against the compiled-in kinds.
	sections map[string]json.RawMessage
}

// UnmarshalJSON keeps the backend section raw: which kinds exist is known
// only to the binary, so Parse decodes it later, as strictly as the rest.
func (e *Entry) UnmarshalJSON(b []byte) error {
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(b, &fields); err != nil {
		return err
	}
	for key, dst := range map[string]any{"name": &e.Name, "keyState": &e.KeyState} {
		if raw, ok := fields[key]; ok {
			if err := json.Unmarshal(raw, dst); err != nil {
				return fmt.Errorf("%s: %w", key, err)
			}
			delete(fields, key)
		}
	}
	e.sections = fields
	return nil
}

// resolve decodes the entry's one backend section with its kind; where
// names the entry in errors ("providers[1]" or "provider").
func (e *Entry) resolve(kinds providers.Kinds, dir, where string) error {
	keys := slices.Sorted(maps.Keys(e.sections))
	for _, k := range keys {
		if _, ok := kinds.Lookup(k); !ok {
			return fmt.Errorf("%s: unknown field or backend %q; an entry has name, keyState and one of %s", where, k, kinds.Names())
		}
	}
	switch len(keys) {
	case 0:
		return fmt.Errorf("%s: no backend configured; set one of %s", where, kinds.Names())
	case 1:
	default:
		return fmt.Errorf("%s: %d backends configured (%s); an entry has exactly one, add an entry for each", where, len(keys), strings.Join(keys, ", "))
	}
	kind, _ := kinds.Lookup(keys[0])
	sec := kind.NewConfig()
	if err := decodeStrict(e.sections[keys[0]], sec); err != nil {
		return fmt.Errorf("%s.%s: %w", where, kind.Name, err)
	}
	sec.ResolvePaths(dir)
	e.Kind, e.Section = kind, sec
	if e.KeyState == "" {
		e.KeyState = kind.Scope
	}
	return nil
}

// decodeStrict decodes JSON into v, refusing unknown fields as the rest of
// the file does.
func decodeStrict(raw json.RawMessage, v any) error {
	d := json.NewDecoder(bytes.NewReader(raw))
	d.DisallowUnknownFields()
	if err := d.Decode(v); err != nil {
		return errors.New(strings.TrimPrefix(err.Error(), "json: "))
	}
	return nil
}

// validate checks the resolved entry.
func (e *Entry) validate(where string) error {
	if e.Section == nil {
		return fmt.Errorf("%s: backend section not decoded; load the file with config.Parse or config.Load", where)
	}
	if !e.KeyState.Valid() {
		return fmt.Errorf("%s.keyState %q: want %s or %s", where, e.KeyState, providers.ScopeShared, providers.ScopePerNode)
	}
	if err := e.Section.Validate(); err != nil {
		return fmt.Errorf("%s.%s: %w", where, e.Kind.Name, err)
	}
	return nil
}

// validName keeps entry names safe as metric label values, log fields and
// flag values.
func validName(s string) bool {
	if s == "" || len(s) > 63 {
		return false
	}
	for _, c := range s {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
			return false
		}
	}
	return true
}

// resolveEntries turns the provider/providers fields into the ordered
// list of entries, named, decoded and checked for duplicates.
func (c *Config) resolveEntries(kinds providers.Kinds, dir string) error {
	switch {
	case c.Provider != nil && c.Providers != nil:
		return errors.New("provider and providers are both set; use providers (a list) alone, or provider for one backend")
	case c.Provider != nil:
		c.Providers, c.Provider, c.shorthand = []Entry{*c.Provider}, nil, true
		if err := c.Providers[0].resolve(kinds, dir, "provider"); err != nil {
			return err
		}
	case len(c.Providers) == 0:
		return fmt.Errorf("providers: empty; list at least one entry with one of %s (the first encrypts, the others only decrypt)", kinds.Names())
	default:
		for i := range c.Providers {
			if err := c.Providers[i].resolve(kinds, dir, fmt.Sprintf("providers[%d]", i)); err != nil {
				return err
			}
		}
	}
	nameEntries(c.Providers)
	return nil
}

// nameEntries gives unnamed entries their kind's name, then "-2", "-3"
// for repeats of a kind.
func nameEntries(es []Entry) {
	seen := map[string]int{}
	for i := range es {
		if es[i].Name != "" {
			continue
		}
		kind := es[i].Kind.Name
		seen[kind]++
		es[i].Name = kind
		if n := seen[kind]; n > 1 {
			es[i].Name = fmt.Sprintf("%s-%d", kind, n)
		}
	}
}

// where names entry i in errors the way the file spells it.
func (c *Config) where(i int) string {
	if c.shorthand {
		return "provider"
	}
	return fmt.Sprintf("providers[%d]", i)
}

// validateEntries checks each entry, then that no two share a name or
// reach the same key (the key_id prefix and instance route a Decrypt).
func (c *Config) validateEntries() error {
	names := map[string]int{}
	keys := map[string]int{}
	for i := range c.Providers {
		e := &c.Providers[i]
		if !validName(e.Name) {
			return fmt.Errorf("%s.name %q: want 1-63 letters, digits, '-' or '_'", c.where(i), e.Name)
		}
		if err := e.validate(c.where(i)); err != nil {
			return err
		}
		if j, dup := names[e.Name]; dup {
			return fmt.Errorf("%s and %s are both named %q; names must differ", c.where(j), c.where(i), e.Name)
		}
		names[e.Name] = i
		key := e.Kind.KeyIDPrefix + ":" + e.Section.Instance()
		if j, dup := keys[key]; dup {
			return fmt.Errorf("%s and %s both reach %s key %s; remove one of them", c.where(j), c.where(i), e.Kind.Name, e.Section.Instance())
		}
		keys[key] = i
	}
	return nil
}
