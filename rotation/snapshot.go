package rotation

import (
	"cmp"
	"context"
	"fmt"
	"slices"

	"github.com/kms-v2/kms-plugin/rotation/etcdlayout"
)

// ProveSnapshot checks that the snapshot read through e holds an
// apiserver's objects under e's prefix: the kube-system namespace, which
// every cluster has, must be there. A snapshot of another etcd, or a
// --etcd-prefix the apiserver did not use, fails here instead of reading as
// "nothing under an old key".
func ProveSnapshot(ctx context.Context, e Etcd) (string, error) {
	w := KubeSystemNamespace
	key := e.Layout.Key(w.Path, w.Namespace, w.Name)
	kv, ok, err := etcdlayout.Get(ctx, e.Store, key)
	if err != nil {
		return "", fmt.Errorf("prove the snapshot: %w", err)
	}
	if !ok {
		return "", fmt.Errorf("%s holds no key %s: it is not a kube-apiserver's etcd, or that apiserver ran with another --etcd-prefix; check the file and --etcd-prefix: %w",
			e.Store.Describe(), key, ErrWrongEtcd)
	}
	return fmt.Sprintf("%s is key %s at mod revision %d in %s", w, key, kv.ModRevision, e.Store.Describe()), nil
}

// CheckSnapshotNotEmpty refuses a snapshot census in which a resource has
// no object: offline, no apiserver can say whether that is true, and an
// empty count is never proof.
func CheckSnapshotNotEmpty(c *Census) error {
	for _, rc := range c.Resources {
		if rc.Total == 0 {
			return fmt.Errorf("%s holds no %s under %s: nothing shows the prefix and resource are right; check --etcd-prefix, or leave %s out of --resources if the cluster had none: %w",
				c.Store, rc.Resource, c.Prefix, rc.Resource, ErrWrongEtcd)
		}
	}
	return nil
}

// KeyNeed is one KMS v2 provider name and key_id that stored objects need
// to be read: the plugin must still decrypt with that key version.
type KeyNeed struct {
	Provider string `json:"provider"`
	KeyID    string `json:"keyID"`
	Objects  int    `json:"objects"`
}

// Needs is what reading every object under the prefix takes: the key
// versions KMS v2 objects were wrapped with, and how many objects need no
// plugin (plaintext), another encryption provider, or cannot be decoded
// (and so might need any version).
type Needs struct {
	Objects     int       `json:"objects"`
	Keys        []KeyNeed `json:"keys"`
	Plaintext   int       `json:"plaintext"`
	Other       int       `json:"other"`
	Undecodable int       `json:"undecodable"`
}

// KeyIDs lists the key_ids of n, sorted, each once.
func (n *Needs) KeyIDs() []string {
	var out []string
	for _, k := range n.Keys {
		out = append(out, k.KeyID)
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// Providers lists the KMS v2 provider names of n, sorted, each once: the
// EncryptionConfiguration must still name each of them for a restore.
func (n *Needs) Providers() []string {
	var out []string
	for _, k := range n.Keys {
		out = append(out, k.Provider)
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// KeysNeeded scans everything under the prefix (every resource, as the
// retire gate does) and counts what reading it needs.
func KeysNeeded(ctx context.Context, e Etcd) (*Needs, error) {
	n := &Needs{Keys: []KeyNeed{}}
	byKey := map[KeyNeed]int{}
	err := etcdlayout.Scan(ctx, e.Store, e.Layout.All(), 0, func(kv etcdlayout.KeyValue) error {
		n.Objects++
		switch v := etcdlayout.Decode(kv.Value); v.Encoding {
		case etcdlayout.EncodingKMSv2:
			byKey[KeyNeed{Provider: v.Provider, KeyID: v.KeyID}]++
		case etcdlayout.EncodingPlain:
			n.Plaintext++
		case etcdlayout.EncodingOther:
			n.Other++
		default:
			n.Undecodable++
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("scan %s in %s for the keys its objects need: %w", e.Layout.All(), e.Store.Describe(), err)
	}
	for k, c := range byKey {
		k.Objects = c
		n.Keys = append(n.Keys, k)
	}
	slices.SortFunc(n.Keys, func(a, b KeyNeed) int {
		return cmp.Or(cmp.Compare(a.Provider, b.Provider), cmp.Compare(a.KeyID, b.KeyID))
	})
	return n, nil
}

// SnapshotNeeds is what one snapshot needs to stay restorable.
type SnapshotNeeds struct {
	Snapshot string `json:"snapshot"`
	Revision int64  `json:"revision"`
	Needs
}

// ReadSnapshotNeeds opens the snapshot at path, proves it holds an
// apiserver's objects under layout's prefix, and counts what they need.
func ReadSnapshotNeeds(ctx context.Context, path string, layout etcdlayout.Layout) (*SnapshotNeeds, error) {
	snap, err := etcdlayout.OpenSnapshot(path)
	if err != nil {
		return nil, err
	}
	defer snap.Close()
	e := Etcd{Store: snap, Layout: layout}
	if _, err := ProveSnapshot(ctx, e); err != nil {
		return nil, err
	}
	n, err := KeysNeeded(ctx, e)
	if err != nil {
		return nil, err
	}
	return &SnapshotNeeds{Snapshot: path, Revision: snap.Revision(), Needs: *n}, nil
}

// KeepReadable are the snapshots that must stay restorable: no key version
// any of them needs may be disabled.
type KeepReadable []*SnapshotNeeds

// ReadKeepReadable reads every snapshot before anything changes, so a bad
// file stops the command while every key is as it was.
func ReadKeepReadable(ctx context.Context, paths []string, layout etcdlayout.Layout) (KeepReadable, error) {
	var out KeepReadable
	for _, p := range paths {
		n, err := ReadSnapshotNeeds(ctx, p, layout)
		if err != nil {
			return nil, fmt.Errorf("--keep-readable: %w", err)
		}
		out = append(out, n)
	}
	return out, nil
}

// Blocker says why disabling the key_ids doomed reports would leave a
// snapshot unreadable: one of them is needed by a snapshot, or a snapshot
// holds undecodable values, which might need any version. It is "" when
// nothing blocks.
func (k KeepReadable) Blocker(doomed func(keyID string) bool) string {
	for _, s := range k {
		if s.Undecodable > 0 {
			return fmt.Sprintf("snapshot %s holds %d undecodable values, which might need any key version; keep every version enabled while it may be restored, or drop it from --keep-readable",
				s.Snapshot, s.Undecodable)
		}
		for _, need := range s.Keys {
			if doomed(need.KeyID) {
				return fmt.Sprintf("snapshot %s still needs key_id %s (%d objects under provider %q); keep it enabled while that snapshot may be restored, or drop the snapshot from --keep-readable",
					s.Snapshot, need.KeyID, need.Objects, need.Provider)
			}
		}
	}
	return ""
}
