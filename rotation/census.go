package rotation

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"time"
)

// DefaultStaleListLimit bounds how many stale objects a census names, so a
// census of a huge cluster stays small; the counts are always complete.
const DefaultStaleListLimit = 50

// ResourceCensus counts how the objects of one resource are stored.
type ResourceCensus struct {
	Resource string `json:"resource"`
	// Total is every object found under the resource's etcd prefix.
	Total int `json:"total"`
	// ByKeyID counts KMS v2 objects by the key_id that protects them.
	ByKeyID map[string]int `json:"byKeyID"`
	// Unencrypted counts objects stored in plaintext (identity).
	Unencrypted int `json:"unencrypted"`
	// OtherEncryption counts objects under a non-KMS-v2 provider.
	OtherEncryption int `json:"otherEncryption"`
	// Undecodable counts KMS v2 values whose envelope does not parse.
	Undecodable int `json:"undecodable"`
	// Stale counts KMS v2 objects under a key other than the current one.
	Stale int `json:"stale"`
	// StaleObjects names up to a limit of the stale objects.
	StaleObjects []StaleObject `json:"staleObjects,omitempty"`
}

// StaleObject is one object still under an old key, with the
// resourceVersion (etcd mod revision) it had when scanned.
type StaleObject struct {
	Namespace       string `json:"namespace,omitempty"`
	Name            string `json:"name"`
	KeyID           string `json:"keyID"`
	ResourceVersion int64  `json:"resourceVersion"`
}

// Census is a read-only count of how every object of some resources is
// stored in etcd: the proof that a rotation finished.
type Census struct {
	// CurrentKeyID is the key objects are judged against.
	CurrentKeyID string           `json:"currentKeyID"`
	Resources    []ResourceCensus `json:"resources"`
	TakenAt      time.Time        `json:"takenAt"`
	Duration     Duration         `json:"duration"`
}

// Stale is the number of objects under a key other than CurrentKeyID.
func (c *Census) Stale() int {
	n := 0
	for _, r := range c.Resources {
		n += r.Stale
	}
	return n
}

// Total is the number of objects counted.
func (c *Census) Total() int {
	n := 0
	for _, r := range c.Resources {
		n += r.Total
	}
	return n
}

// KeyIDs returns every key_id that protects at least one counted object.
func (c *Census) KeyIDs() []string {
	seen := map[string]bool{}
	for _, r := range c.Resources {
		for k := range r.ByKeyID {
			seen[k] = true
		}
	}
	out := make([]string, 0, len(seen))
	for k := range seen {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// CensusOptions tune a census; the zero value is usable.
type CensusOptions struct {
	// PageSize is how many values one etcd request fetches (default 500).
	PageSize int64
	// StaleListLimit bounds StaleObjects per resource (default
	// DefaultStaleListLimit; negative lists none).
	StaleListLimit int
}

// TakeCensus scans each resource's etcd prefix page by page and counts its
// objects by key_id. It only reads, and its memory does not grow with the
// number of objects (only counters and the bounded stale list do).
func TakeCensus(ctx context.Context, s Store, resources []Resource, currentKeyID string, opts CensusOptions) (*Census, error) {
	start := time.Now()
	limit := opts.StaleListLimit
	if limit == 0 {
		limit = DefaultStaleListLimit
	}
	c := &Census{CurrentKeyID: currentKeyID, TakenAt: start.UTC()}
	for _, r := range resources {
		rc := ResourceCensus{Resource: r.Name, ByKeyID: map[string]int{}}
		err := scanStored(ctx, s, r, opts.PageSize, func(kv KeyValue, key ObjectKey, sv StoredValue) error {
			rc.Total++
			switch sv.Encoding {
			case EncodingKMSv2:
				rc.ByKeyID[sv.KeyID]++
				if sv.KeyID != currentKeyID {
					rc.Stale++
					if len(rc.StaleObjects) < limit {
						rc.StaleObjects = append(rc.StaleObjects, StaleObject{Namespace: key.Namespace, Name: key.Name, KeyID: sv.KeyID, ResourceVersion: kv.ModRevision})
					}
				}
			case EncodingPlain:
				rc.Unencrypted++
			case EncodingOther:
				rc.OtherEncryption++
			default:
				rc.Undecodable++
			}
			return nil
		})
		if err != nil {
			return nil, fmt.Errorf("census of %s: %w", r.Name, err)
		}
		c.Resources = append(c.Resources, rc)
	}
	c.Duration = Duration(time.Since(start))
	return c, nil
}

// scanStored decodes every value under a resource's prefix. Keys that do not
// parse as objects of the resource are skipped: they are not objects.
func scanStored(ctx context.Context, s Store, r Resource, pageSize int64, fn func(KeyValue, ObjectKey, StoredValue) error) error {
	res := r.etcdResource()
	return scan(ctx, s, r.EtcdPrefix, pageSize, func(kv KeyValue) error {
		key, err := ParseObjectKey(kv.Key, res)
		if err != nil {
			return nil
		}
		return fn(kv, key, DecodeStoredValue(kv.Value))
	})
}

// ScanStale calls fn for every object of r stored under a KMS v2 key other
// than currentKeyID, as the scan finds it. Later rewrite passes are driven
// by it, so they touch only the objects that still need it.
func ScanStale(ctx context.Context, s Store, r Resource, currentKeyID string, pageSize int64, fn func(StaleObject) error) error {
	return scanStored(ctx, s, r, pageSize, func(kv KeyValue, key ObjectKey, sv StoredValue) error {
		if sv.Encoding != EncodingKMSv2 || sv.KeyID == currentKeyID {
			return nil
		}
		return fn(StaleObject{Namespace: key.Namespace, Name: key.Name, KeyID: sv.KeyID, ResourceVersion: kv.ModRevision})
	})
}

// KeyReferences counts, over everything under /registry/ (every resource,
// not only the ones being rotated), the objects protected by each of
// keyIDs. Retirement is gated on it, because a resource left out of
// --resources may still be encrypted under the old key.
func KeyReferences(ctx context.Context, s Store, keyIDs []string, pageSize int64) (map[string]int, error) {
	want := map[string]bool{}
	out := map[string]int{}
	for _, k := range keyIDs {
		want[k] = true
		out[k] = 0
	}
	err := scan(ctx, s, "/registry/", pageSize, func(kv KeyValue) error {
		sv := DecodeStoredValue(kv.Value)
		if sv.Encoding == EncodingKMSv2 && want[sv.KeyID] {
			out[sv.KeyID]++
		}
		if sv.Encoding == EncodingUndecodable {
			// An envelope we cannot read might use any key: refuse to
			// prove it does not.
			out["<undecodable>"]++
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("scan /registry for key references: %w", err)
	}
	return out, nil
}

// Duration is a time.Duration that reads well in JSON reports.
type Duration time.Duration

// MarshalJSON writes d as a duration string such as "1.5s".
func (d Duration) MarshalJSON() ([]byte, error) {
	return []byte(`"` + time.Duration(d).Round(time.Millisecond).String() + `"`), nil
}

// String formats d like time.Duration.
func (d Duration) String() string { return time.Duration(d).Round(time.Millisecond).String() }

// UnmarshalJSON reads a duration string, so reports round-trip.
func (d *Duration) UnmarshalJSON(b []byte) error {
	v, err := time.ParseDuration(strings.Trim(string(b), `"`))
	if err != nil {
		return fmt.Errorf("duration %s: %w", b, err)
	}
	*d = Duration(v)
	return nil
}
