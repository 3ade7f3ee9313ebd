package rotation

import (
	"context"
	"fmt"

	"github.com/kms-v2/kms-plugin/providers"
)

// DecryptOnly is a configured provider after the first: the plugin
// decrypts with it, never encrypts. A provider migration ends when etcd
// holds no object under it.
type DecryptOnly struct {
	Name string
	// Owns reports whether a key_id is one of this provider's versions.
	Owns func(keyID string) bool
	// Rotator, when the backend has one, lets --retire disable its
	// versions; nil leaves them to the backend's own tools.
	Rotator providers.Rotator
}

// DecryptOnlyReport is what --retire found and did for one such provider.
type DecryptOnlyReport struct {
	Provider string `json:"provider"`
	// Objects is how many values anywhere under the etcd prefix are
	// encrypted under one of its versions.
	Objects int `json:"objects"`
	// Disabled lists the versions --retire disabled.
	Disabled []string `json:"disabled,omitempty"`
	// Removable: no object uses it, so it can leave every plugin's config.
	Removable bool `json:"removable"`
}

// ProviderReferences scans everything under the prefix once and counts,
// per provider, the KMS v2 values under one of its key_ids, plus
// undecodable values under UndecodableKey.
func ProviderReferences(ctx context.Context, e Etcd, ps []DecryptOnly) (map[string]int, error) {
	out := map[string]int{UndecodableKey: 0}
	for _, p := range ps {
		out[p.Name] = 0
	}
	err := countReferences(ctx, e, 0, out, func(keyID string) (string, bool) {
		for _, p := range ps {
			if p.Owns(keyID) {
				return p.Name, true
			}
		}
		return "", false
	})
	if err != nil {
		return nil, fmt.Errorf("scan %s in %s for objects under decrypt-only providers: %w", e.Layout.All(), e.Store.Describe(), err)
	}
	return out, nil
}

// retireDecryptOnly counts every decrypt-only provider's objects and, for
// each one with none, disables its versions where it can. Its primary
// stays enabled (a backend never disables its primary); the report says
// the provider can leave the config.
func (r *runner) retireDecryptOnly(ctx context.Context) error {
	if len(r.DecryptOnly) == 0 {
		return nil
	}
	refs, err := ProviderReferences(ctx, r.Etcd, r.DecryptOnly)
	if err != nil {
		return fmt.Errorf("retire: %w", err)
	}
	var busy []string
	for _, p := range r.DecryptOnly {
		rep := DecryptOnlyReport{Provider: p.Name, Objects: refs[p.Name]}
		if rep.Objects > 0 || refs[UndecodableKey] > 0 {
			busy = append(busy, fmt.Sprintf("%s: %d objects", p.Name, rep.Objects))
		} else if rep.Disabled, err = disableAll(ctx, p.Rotator); err != nil {
			return fmt.Errorf("retire provider %s: %w", p.Name, err)
		} else {
			rep.Removable = true
			r.say("retire: provider %s protects no object anywhere in etcd; disabled %d versions; remove it from every plugin's config", p.Name, len(rep.Disabled))
		}
		r.rep.DecryptOnly = append(r.rep.DecryptOnly, rep)
	}
	switch {
	case refs[UndecodableKey] > 0:
		return r.refuse(fmt.Sprintf("%d undecodable values in etcd", refs[UndecodableKey]))
	case len(busy) > 0:
		return r.refuse(fmt.Sprintf("decrypt-only providers still protect objects (%v)", busy))
	}
	return nil
}

// disableAll disables every enabled, non-primary version of r (nil: none).
func disableAll(ctx context.Context, r providers.Rotator) ([]string, error) {
	if r == nil {
		return nil, nil
	}
	vs, err := r.Versions(ctx)
	if err != nil {
		return nil, err
	}
	var done []string
	for _, v := range vs {
		if v.State != providers.StateEnabled {
			continue
		}
		if err := r.Disable(ctx, v.KeyID); err != nil {
			return done, err
		}
		done = append(done, v.KeyID)
	}
	return done, nil
}
