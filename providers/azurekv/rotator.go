package azurekv

import (
	"context"
	"fmt"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore/to"
	"github.com/Azure/azure-sdk-for-go/sdk/security/keyvault/azkeys"

	"github.com/kms-v2/kms-plugin/providers"
)

// Versions lists the key's versions, oldest first, from a fresh list.
func (p *Provider) Versions(ctx context.Context) ([]providers.KeyVersion, error) {
	if err := p.keys.Reload(ctx); err != nil {
		return nil, err
	}
	return p.current().keyVersions(), nil
}

// CreateVersion adds an enabled version that is not primary. Without a
// promotion tag the "newest enabled" rule would make it primary at once, on
// every instance at its own moment; so the first CreateVersion tags the
// current primary, and from then on the tag decides (Key Vault's rotation
// policy then only adds versions for `kmsctl keys promote`). The new
// version copies the primary's key type and size.
func (p *Provider) CreateVersion(ctx context.Context) (providers.KeyVersion, error) {
	if err := p.keys.Reload(ctx); err != nil {
		return providers.KeyVersion{}, err
	}
	st := p.current()
	if st.primary == nil {
		return providers.KeyVersion{}, fmt.Errorf("azurekv: create version: %s: %w", st.reason, providers.ErrRefused)
	}
	if p.cfg.KeyVersion == "" && !st.tagMode {
		if err := p.setTag(ctx, st.primary, true); err != nil {
			return providers.KeyVersion{}, fmt.Errorf("azurekv: create version: pinning the current primary with tag %s first: %w", PrimaryTag, err)
		}
		p.log.Info("tagged the current primary before adding a version, so the new one waits for promote", "key_id", st.primary.keyID, "tag", PrimaryTag)
	}
	var cur azkeys.GetKeyResponse
	err := p.call(opGet, p.cfg.KeyName+"/"+st.primary.id, func() (err error) {
		cur, err = p.client.GetKey(ctx, p.cfg.KeyName, st.primary.id, nil)
		return err
	})
	if err != nil {
		return providers.KeyVersion{}, err
	}
	kty, size := azkeys.KeyType(DefaultKeyType), int32(DefaultKeySize)
	if k := cur.Key; k != nil {
		if k.Kty != nil {
			kty = *k.Kty
		}
		if len(k.N) > 0 {
			size = int32(len(k.N) * 8) //nolint:gosec // G115: an RSA modulus is a few hundred bytes
		}
	}
	v, err := p.create(ctx, kty, size)
	if err != nil {
		return providers.KeyVersion{}, err
	}
	if err := p.keys.Reload(ctx); err != nil {
		return providers.KeyVersion{}, err
	}
	if now, _ := p.PrimaryKeyID(ctx); now == v.KeyID {
		return providers.KeyVersion{}, fmt.Errorf("azurekv: create version: %s became primary without promote (was the tag removed meanwhile?)", v.KeyID)
	}
	p.log.Info("created key version", "key_id", v.KeyID)
	return v, nil
}

// Promote makes an enabled version the primary: it tags that version first
// and then removes the tag from every other, so every instance's next
// refresh sees the new primary (while both are tagged, the newer one wins).
// It is refused when config pins keyVersion.
func (p *Provider) Promote(ctx context.Context, keyID string) error {
	v, err := p.fresh(ctx, keyID)
	if err != nil {
		return err
	}
	if p.cfg.KeyVersion != "" {
		return fmt.Errorf("azurekv: promote: config pins keyVersion %s; remove the pin to promote: %w", p.cfg.KeyVersion, providers.ErrRefused)
	}
	if !v.usable(time.Now()) {
		return fmt.Errorf("azurekv: promote %s: only an enabled version inside its validity window can be primary: %w", keyID, providers.ErrRefused)
	}
	if !v.tagged {
		if err := p.setTag(ctx, v, true); err != nil {
			return fmt.Errorf("azurekv: promote %s: %w", keyID, err)
		}
	}
	for _, o := range p.current().ordered {
		if o.id != v.id && o.tags[PrimaryTag] != "" {
			if err := p.setTag(ctx, o, false); err != nil {
				return fmt.Errorf("azurekv: promote %s: untagging %s: %w", keyID, o.keyID, err)
			}
		}
	}
	if err := p.keys.Reload(ctx); err != nil {
		return err
	}
	if got, _ := p.PrimaryKeyID(ctx); got != keyID {
		return fmt.Errorf("azurekv: promote %s: primary is still %s after tagging; another promote may be running", keyID, got)
	}
	p.log.Info("promoted key version", "key_id", keyID, "key_id_hash", providers.HashKeyID(keyID))
	return nil
}

// Disable stops a version from wrapping and unwrapping. The primary is
// refused: disable only what the census proves unused.
func (p *Provider) Disable(ctx context.Context, keyID string) error {
	v, err := p.fresh(ctx, keyID)
	if err != nil {
		return err
	}
	if cur := p.current().primary; cur != nil && cur.id == v.id {
		return fmt.Errorf("azurekv: disable %s: it is the primary; promote another version first: %w", keyID, providers.ErrRefused)
	}
	return p.setEnabled(ctx, v, false)
}

// Enable lets a disabled version unwrap again. Without a promotion tag,
// enabling the newest version makes it primary (the "newest enabled" rule).
func (p *Provider) Enable(ctx context.Context, keyID string) error {
	v, err := p.fresh(ctx, keyID)
	if err != nil {
		return err
	}
	return p.setEnabled(ctx, v, true)
}

// fresh refreshes state and finds the version keyID names.
func (p *Provider) fresh(ctx context.Context, keyID string) (*version, error) {
	id, err := p.parseKeyID(keyID)
	if err != nil {
		return nil, err
	}
	if err := p.keys.Reload(ctx); err != nil {
		return nil, err
	}
	v := p.current().versions[id]
	if v == nil {
		return nil, fmt.Errorf("azurekv: key %s has no version %s: %w", p.cfg.KeyName, id, providers.ErrKeyNotFound)
	}
	return v, nil
}

func (p *Provider) setEnabled(ctx context.Context, v *version, enabled bool) error {
	err := p.call(opUpdate, p.cfg.KeyName+"/"+v.id, func() error {
		_, err := p.client.UpdateKey(ctx, p.cfg.KeyName, v.id, azkeys.UpdateKeyParameters{
			KeyAttributes: &azkeys.KeyAttributes{Enabled: to.Ptr(enabled)},
		}, nil)
		return err
	})
	if err != nil {
		return err
	}
	p.log.Info("key version state changed", "key_id", v.keyID, "enabled", enabled)
	return p.keys.Reload(ctx)
}

// setTag adds or removes PrimaryTag on v, keeping its other tags (an
// update replaces the whole tag set).
func (p *Provider) setTag(ctx context.Context, v *version, on bool) error {
	tags := map[string]*string{}
	for k, val := range v.tags {
		tags[k] = to.Ptr(val)
	}
	if on {
		tags[PrimaryTag] = to.Ptr(v.id)
	} else {
		delete(tags, PrimaryTag)
	}
	return p.call(opUpdate, p.cfg.KeyName+"/"+v.id, func() error {
		_, err := p.client.UpdateKey(ctx, p.cfg.KeyName, v.id, azkeys.UpdateKeyParameters{Tags: tags}, nil)
		return err
	})
}
