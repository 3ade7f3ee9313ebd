package azurekv

import (
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/security/keyvault/azkeys"

	"github.com/kms-v2/kms-plugin/providers"
)

// PrimaryTag marks the promoted version. Its value must be that version's
// own ID: Key Vault copies tags in some flows (a new version made from an
// existing one), and a copied tag then names another version and counts
// for nothing.
const PrimaryTag = "kms-plugin-primary"

// version is what the provider knows about one key version, from the
// version list (which carries attributes and tags but no key material).
type version struct {
	id            string
	keyID         string
	enabled       bool
	created       time.Time
	notBefore     *time.Time
	expires       *time.Time
	tags          map[string]string
	tagged        bool
	exportable    bool
	recoveryLevel string
}

// usable reports whether Key Vault lets the version encrypt at t.
func (v *version) usable(t time.Time) bool {
	return v.enabled && (v.notBefore == nil || !t.Before(*v.notBefore)) && (v.expires == nil || t.Before(*v.expires))
}

// state is one immutable snapshot of the key's versions and the primary
// chosen from them. Encrypt, Decrypt and PrimaryKeyID each read one
// snapshot, so the key_id Encrypt stamps always matches the version it used.
type state struct {
	versions map[string]*version
	ordered  []*version // oldest first
	primary  *version   // nil when no version can encrypt
	reason   string     // why primary is nil, for errors
	tagMode  bool       // some version carries a valid PrimaryTag
}

// newState builds a snapshot from listed versions and chooses the primary:
//
//  1. keyVersion pinned in config: that version;
//  2. else, once any version carries a valid PrimaryTag: the newest tagged
//     version that can encrypt (more than one is tagged only while a Promote
//     is between its two writes);
//  3. else the newest version that can encrypt, which follows Key Vault's
//     own rotation policy.
//
// "Can encrypt" means enabled and inside its nbf/exp window.
func newState(host, keyName, pinned string, props []*azkeys.KeyProperties, now time.Time) *state {
	s := &state{versions: map[string]*version{}}
	for _, p := range props {
		if p == nil || p.KID == nil {
			continue
		}
		id := p.KID.Version()
		if id == "" {
			continue
		}
		v := &version{id: id, keyID: formatKeyID(host, keyName, id), tags: map[string]string{}}
		if a := p.Attributes; a != nil {
			v.enabled = a.Enabled != nil && *a.Enabled
			if a.Created != nil {
				v.created = *a.Created
			}
			v.notBefore, v.expires = a.NotBefore, a.Expires
			v.exportable = a.Exportable != nil && *a.Exportable
			if a.RecoveryLevel != nil {
				v.recoveryLevel = *a.RecoveryLevel
			}
		}
		for k, val := range p.Tags {
			if val != nil {
				v.tags[k] = *val
			}
		}
		v.tagged = v.tags[PrimaryTag] == id
		s.tagMode = s.tagMode || v.tagged
		s.versions[id] = v
		s.ordered = append(s.ordered, v)
	}
	// Creation times have one-second resolution; the version ID breaks ties
	// so that every plugin instance picks the same primary.
	sort.Slice(s.ordered, func(i, j int) bool {
		a, b := s.ordered[i], s.ordered[j]
		if !a.created.Equal(b.created) {
			return a.created.Before(b.created)
		}
		return a.id < b.id
	})
	newest := func(ok func(*version) bool) *version {
		for i := len(s.ordered) - 1; i >= 0; i-- {
			if v := s.ordered[i]; ok(v) {
				return v
			}
		}
		return nil
	}
	switch {
	case len(s.ordered) == 0:
		s.reason = fmt.Sprintf("key %s has no versions; run `kmsctl keys init`", keyName)
	case pinned != "":
		v := s.versions[pinned]
		switch {
		case v == nil:
			s.reason = fmt.Sprintf("keyVersion %s pinned in config does not exist in key %s", pinned, keyName)
		case !v.usable(now):
			s.reason = fmt.Sprintf("keyVersion %s pinned in config is disabled, expired or not yet valid", pinned)
		default:
			s.primary = v
		}
	case s.tagMode:
		s.primary = newest(func(v *version) bool { return v.tagged && v.usable(now) })
		if s.primary == nil {
			// The promoted version was disabled or expired behind our back;
			// encrypting with the newest usable one keeps writes working, and
			// every instance still decrypts it (an unknown key_id triggers a
			// refresh).
			s.primary = newest(func(v *version) bool { return v.usable(now) })
			s.reason = "the version tagged " + PrimaryTag + " cannot encrypt"
		}
	default:
		s.primary = newest(func(v *version) bool { return v.usable(now) })
	}
	if s.primary == nil && s.reason == "" {
		s.reason = fmt.Sprintf("key %s has no enabled version that can encrypt now", keyName)
	}
	return s
}

// keyVersions lists versions oldest first with their lifecycle state.
func (s *state) keyVersions() []providers.KeyVersion {
	return providers.ListVersions(s.ordered, s.primary, func(v *version) (string, bool, time.Time) {
		return v.keyID, v.enabled, v.created
	})
}

// formatKeyID builds azurekv:<vault host>/<key>/<version>.
func formatKeyID(host, keyName, ver string) string {
	return "azurekv:" + host + "/" + keyName + "/" + ver
}

// vaultHost normalizes a vault URL's host the way key_ids carry it: lower
// case, without the default port (kids sometimes say :443).
func vaultHost(host string) string {
	return strings.TrimSuffix(strings.ToLower(host), ":443")
}
