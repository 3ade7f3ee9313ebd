package rotation

import (
	"context"
	"fmt"
	"slices"
	"strings"

	"github.com/kms-v2/kms-plugin/providers"
)

// retire disables every enabled version older than the primary, but only
// after a scan of everything under the prefix (not only the rotated
// resources) shows no object references it and no value is undecodable;
// then it does the same for the decrypt-only providers.
func (r *runner) retire(ctx context.Context, current string) error {
	r.begin(PhaseRetire)
	defer r.end()
	if r.rep.Remaining != 0 {
		return r.refuse(fmt.Sprintf("%d objects not stored as the apiserver writes now", r.rep.Remaining))
	}
	versions, err := r.Rotator.Versions(ctx)
	if err != nil {
		return fmt.Errorf("retire: %w", err)
	}
	old := olderEnabled(versions, current)
	// Before any Disable, so a refusal leaves every version as it was.
	if why := r.opts.KeepReadable.Blocker(r.retiring(old)); why != "" {
		return r.refuse(why)
	}
	if len(old) == 0 {
		r.say("retire: no enabled version older than the primary")
		return r.retireDecryptOnly(ctx)
	}
	refs, err := KeyReferences(ctx, r.Etcd, old, 0)
	if err != nil {
		return fmt.Errorf("retire: %w", err)
	}
	r.rep.References = refs
	if used := usedKeys(refs); len(used) > 0 {
		return r.refuse("etcd still references old keys or holds undecodable values (" + strings.Join(used, ", ") + ")")
	}
	for _, k := range old {
		if err := r.Rotator.Disable(ctx, k); err != nil {
			return fmt.Errorf("retire %s: %w", k, err)
		}
		r.rep.Retired = append(r.rep.Retired, k)
		r.say("retire: disabled %s (no object in etcd uses it)", k)
	}
	return r.retireDecryptOnly(ctx)
}

// retiring reports whether retire may disable keyID: an old version of the
// encrypting provider, or any version of a decrypt-only provider.
func (r *runner) retiring(old []string) func(keyID string) bool {
	return func(keyID string) bool {
		if slices.Contains(old, keyID) {
			return true
		}
		return slices.ContainsFunc(r.DecryptOnly, func(p DecryptOnly) bool { return p.Owns(keyID) })
	}
}

func (r *runner) refuse(why string) error {
	r.rep.RetireRefused = why
	r.say("retire: refused: %s", why)
	return fmt.Errorf("%s: %w", why, ErrRetireRefused)
}

// olderEnabled lists the enabled versions older than current; versions
// are oldest first, and newer pending ones stay.
func olderEnabled(versions []providers.KeyVersion, current string) []string {
	var old []string
	for _, v := range versions {
		if v.KeyID == current {
			break
		}
		if v.State == providers.StateEnabled {
			old = append(old, v.KeyID)
		}
	}
	return old
}
