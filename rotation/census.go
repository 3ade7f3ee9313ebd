package rotation

import (
	"bytes"
	"cmp"
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/kms-v2/kms-plugin/rotation/etcdlayout"
)

// DefaultStaleListLimit bounds how many objects a census names per
// resource, so a census of a huge cluster stays small; the counts are always
// complete.
const DefaultStaleListLimit = 50

// Etcd is the etcd a run reads and how the apiserver lays out its keys in it.
type Etcd struct {
	Store  etcdlayout.Store
	Layout etcdlayout.Layout
}

// Writers says, per resource name, how the apiserver writes that resource
// now. A census judges every stored value against it; a nil map (or a
// resource missing from it) means counts only, no judgement.
type Writers map[string]etcdlayout.Writer

// withKey returns a copy whose KMS v2 writers use keyID: the writers after
// a promote.
func (w Writers) withKey(keyID string) Writers {
	out := Writers{}
	for name, wr := range w {
		if wr.Encoding == etcdlayout.EncodingKMSv2 {
			wr.KeyID = keyID
		}
		out[name] = wr
	}
	return out
}

// StoredCount is how many objects of a resource one KMS v2 provider name
// and key_id protect.
type StoredCount struct {
	Provider string `json:"provider"`
	KeyID    string `json:"keyID"`
	Objects  int    `json:"objects"`
	// Current says this is how the apiserver writes the resource now.
	Current bool `json:"current"`
}

// NamedObject is one object a census names: stale or undecodable, with the
// resourceVersion (etcd mod revision) it had when scanned.
type NamedObject struct {
	Namespace string `json:"namespace,omitempty"`
	Name      string `json:"name"`
	// Stored says how it is stored: "kms:v2 a file:k/1", "plaintext", ...
	Stored          string `json:"stored"`
	ResourceVersion int64  `json:"resourceVersion"`
}

// ResourceCensus counts how the objects of one resource are stored.
type ResourceCensus struct {
	Resource string `json:"resource"`
	// Writer is how the apiserver writes the resource now; nil when the
	// census was not told, and then nothing is judged stale.
	Writer *etcdlayout.Writer `json:"writer,omitempty"`
	// Total is every object found under the resource's etcd prefix.
	Total int `json:"total"`
	// ByProvider counts KMS v2 objects by provider name and key_id.
	ByProvider []StoredCount `json:"byProvider"`
	// Plaintext counts unencrypted objects (identity).
	Plaintext int `json:"plaintext"`
	// Other counts objects under aescbc, aesgcm, secretbox or KMS v1.
	Other int `json:"other"`
	// Undecodable counts encrypted values whose envelope does not parse.
	Undecodable int `json:"undecodable"`
	// Stale counts decodable objects not stored as Writer writes: another
	// key_id or provider name, plaintext, or another provider kind.
	Stale int `json:"stale"`
	// StaleObjects and UndecodableObjects name up to a limit of them.
	StaleObjects       []NamedObject `json:"staleObjects,omitempty"`
	UndecodableObjects []NamedObject `json:"undecodableObjects,omitempty"`
}

// Objects is how many objects provider name and keyID protect.
func (rc *ResourceCensus) Objects(provider, keyID string) int {
	for _, s := range rc.ByProvider {
		if s.Provider == provider && s.KeyID == keyID {
			return s.Objects
		}
	}
	return 0
}

// KeyIDObjects is how many objects keyID protects, under any provider name.
func (rc *ResourceCensus) KeyIDObjects(keyID string) int {
	n := 0
	for _, s := range rc.ByProvider {
		if s.KeyID == keyID {
			n += s.Objects
		}
	}
	return n
}

// Census is a read-only count of how every object of some resources is
// stored in etcd: the proof that a rotation finished.
type Census struct {
	// Store names the etcd read, Prefix the key prefix scanned under it.
	Store  string `json:"store"`
	Prefix string `json:"prefix"`
	// Proof says what proved Store and Prefix are the apiserver's: an
	// object read through it found at the same revision in etcd.
	Proof           string           `json:"proof,omitempty"`
	Resources       []ResourceCensus `json:"resources"`
	TakenAt         time.Time        `json:"takenAt"`
	Duration        Duration         `json:"duration"`
	DurationSeconds float64          `json:"durationSeconds"`
}

// Stale is the number of decodable objects not stored as the apiserver
// writes now: what a rewrite can fix.
func (c *Census) Stale() int {
	n := 0
	for _, r := range c.Resources {
		n += r.Stale
	}
	return n
}

// NotCurrent is every object not stored as the apiserver writes now: the
// stale ones and the undecodable ones.
func (c *Census) NotCurrent() int {
	n := c.Stale()
	for _, r := range c.Resources {
		n += r.Undecodable
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

// Resource returns the count of the resource named name, or nil.
func (c *Census) Resource(name string) *ResourceCensus {
	for i := range c.Resources {
		if c.Resources[i].Resource == name {
			return &c.Resources[i]
		}
	}
	return nil
}

// CensusOptions tune a census; the zero value is usable.
type CensusOptions struct {
	// PageSize is how many values one etcd request fetches (default
	// etcdlayout.DefaultPageSize).
	PageSize int64
	// StaleListLimit bounds the named objects per resource (default
	// DefaultStaleListLimit; negative names none).
	StaleListLimit int
}

// TakeCensus scans each resource's etcd prefix page by page and counts its
// objects by how they are stored, judging each against the resource's
// writer. It only reads, and its memory does not grow with the number of
// objects (only counters and the bounded name lists do).
func TakeCensus(ctx context.Context, e Etcd, rs []Resource, w Writers, opts CensusOptions) (*Census, error) {
	start := time.Now()
	limit := cmp.Or(opts.StaleListLimit, DefaultStaleListLimit)
	c := &Census{Store: e.Store.Describe(), Prefix: e.Layout.Prefix(), TakenAt: start.UTC()}
	for _, r := range rs {
		var writer *etcdlayout.Writer
		if wr, ok := w[r.Name]; ok {
			writer = &wr
		}
		rc, err := countResource(ctx, e, r, writer, opts.PageSize, limit)
		if err != nil {
			return nil, fmt.Errorf("census of %s in %s under %s: %w", r.Name, e.Store.Describe(), e.Layout.ResourcePrefix(r.Path), err)
		}
		c.Resources = append(c.Resources, rc)
	}
	c.Duration = Duration(time.Since(start))
	c.DurationSeconds = c.Duration.Seconds()
	return c, nil
}

// countResource is one resource's part of TakeCensus.
func countResource(ctx context.Context, e Etcd, r Resource, w *etcdlayout.Writer, pageSize int64, limit int) (ResourceCensus, error) {
	rc := ResourceCensus{Resource: r.Name, Writer: w, ByProvider: []StoredCount{}}
	byProvider := map[StoredCount]int{}
	name := func(key etcdlayout.ObjectKey, kv etcdlayout.KeyValue, v etcdlayout.Value) NamedObject {
		return NamedObject{Namespace: key.Namespace, Name: key.Name, Stored: describeValue(v), ResourceVersion: kv.ModRevision}
	}
	err := scanResource(ctx, e, r, pageSize, func(kv etcdlayout.KeyValue, key etcdlayout.ObjectKey, v etcdlayout.Value) error {
		rc.Total++
		switch v.Encoding {
		case etcdlayout.EncodingKMSv2:
			byProvider[StoredCount{Provider: v.Provider, KeyID: v.KeyID}]++
		case etcdlayout.EncodingPlain:
			rc.Plaintext++
		case etcdlayout.EncodingOther:
			rc.Other++
		default:
			rc.Undecodable++
			if len(rc.UndecodableObjects) < limit {
				rc.UndecodableObjects = append(rc.UndecodableObjects, name(key, kv, v))
			}
			return nil
		}
		if w != nil && !w.Current(v) {
			rc.Stale++
			if len(rc.StaleObjects) < limit {
				rc.StaleObjects = append(rc.StaleObjects, name(key, kv, v))
			}
		}
		return nil
	})
	for sc, n := range byProvider {
		sc.Objects = n
		sc.Current = w != nil && w.Current(etcdlayout.Value{Encoding: etcdlayout.EncodingKMSv2, Kind: "kms:v2", Provider: sc.Provider, KeyID: sc.KeyID})
		rc.ByProvider = append(rc.ByProvider, sc)
	}
	slices.SortFunc(rc.ByProvider, func(a, b StoredCount) int {
		return cmp.Or(cmp.Compare(a.Provider, b.Provider), cmp.Compare(a.KeyID, b.KeyID))
	})
	return rc, err
}

// describeValue says in a few words how a value is stored, for named
// objects: never its data.
func describeValue(v etcdlayout.Value) string {
	switch v.Encoding {
	case etcdlayout.EncodingKMSv2:
		return fmt.Sprintf("kms:v2 %s %s", v.Provider, v.KeyID)
	case etcdlayout.EncodingPlain:
		return "plaintext"
	case etcdlayout.EncodingOther:
		return v.Kind + " " + v.Provider
	}
	return fmt.Sprintf("undecodable: %v", v.Err)
}

// scanResource decodes every value under a resource's prefix. Keys that do
// not parse as objects of the resource are skipped: they are not objects.
func scanResource(ctx context.Context, e Etcd, r Resource, pageSize int64, fn func(etcdlayout.KeyValue, etcdlayout.ObjectKey, etcdlayout.Value) error) error {
	return etcdlayout.Scan(ctx, e.Store, e.Layout.ResourcePrefix(r.Path), pageSize, func(kv etcdlayout.KeyValue) error {
		key, err := e.Layout.ParseKey(kv.Key, r.Path)
		if err != nil {
			return nil //nolint:nilerr // not an object of r: skipped, as documented
		}
		return fn(kv, key, etcdlayout.Decode(kv.Value))
	})
}

// StaleObject is one object a later rewrite pass patches, at the
// resourceVersion the scan found.
type StaleObject struct {
	Namespace, Name string
	ResourceVersion int64
}

// ScanStale calls fn for every decodable object of r not stored as w
// writes, as the scan finds it. Later rewrite passes are driven by it, so
// they touch only the objects that still need it.
func ScanStale(ctx context.Context, e Etcd, r Resource, w etcdlayout.Writer, pageSize int64, fn func(StaleObject) error) error {
	return scanResource(ctx, e, r, pageSize, func(kv etcdlayout.KeyValue, key etcdlayout.ObjectKey, v etcdlayout.Value) error {
		if v.Encoding == etcdlayout.EncodingUndecodable || w.Current(v) {
			return nil
		}
		return fn(StaleObject{Namespace: key.Namespace, Name: key.Name, ResourceVersion: kv.ModRevision})
	})
}

// UndecodableKey counts, in KeyReferences, the values no one can read: one
// of them might use any key.
const UndecodableKey = "<undecodable>"

// KeyReferences counts, over every object under the prefix (every
// resource, not only the ones being rotated), the objects protected by each
// of keyIDs under any provider name, plus undecodable values under
// UndecodableKey. Retirement is gated on it, because a resource left out of
// --resources may still be encrypted under the old key.
func KeyReferences(ctx context.Context, e Etcd, keyIDs []string, pageSize int64) (map[string]int, error) {
	out := map[string]int{}
	for _, k := range keyIDs {
		out[k] = 0
	}
	err := countReferences(ctx, e, pageSize, out, func(keyID string) (string, bool) {
		_, want := out[keyID]
		return keyID, want
	})
	if err != nil {
		return nil, fmt.Errorf("scan %s in %s for key references: %w", e.Layout.All(), e.Store.Describe(), err)
	}
	return out, nil
}

// countReferences scans everything under the prefix once: each KMS v2
// value whose key_id name maps to a counter adds one to out[name], and each
// undecodable value one to out[UndecodableKey].
func countReferences(ctx context.Context, e Etcd, pageSize int64, out map[string]int, name func(keyID string) (string, bool)) error {
	return etcdlayout.Scan(ctx, e.Store, e.Layout.All(), pageSize, func(kv etcdlayout.KeyValue) error {
		v := etcdlayout.Decode(kv.Value)
		switch v.Encoding {
		case etcdlayout.EncodingUndecodable:
			out[UndecodableKey]++
		case etcdlayout.EncodingKMSv2:
			if n, ok := name(v.KeyID); ok {
				out[n]++
			}
		}
		return nil
	})
}

// KMSv2Resources lists the etcd paths (first segment under the prefix)
// that hold at least one KMS v2 value: what is really encrypted through a
// plugin, when nothing else says.
func KMSv2Resources(ctx context.Context, e Etcd) ([]string, error) {
	seen := map[string]bool{}
	// The prefix says it; no envelope needs decoding.
	err := etcdlayout.Scan(ctx, e.Store, e.Layout.All(), 0, func(kv etcdlayout.KeyValue) error {
		if bytes.HasPrefix(kv.Value, []byte(etcdlayout.KMSv2Prefix)) {
			seen[e.Layout.TopSegment(kv.Key)] = true
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("scan %s in %s for KMS v2 values: %w", e.Layout.All(), e.Store.Describe(), err)
	}
	return slices.Sorted(maps.Keys(seen)), nil
}

// Duration is a time.Duration that reads well in JSON reports.
type Duration time.Duration

// MarshalJSON writes d as a duration string such as "1.5s".
func (d Duration) MarshalJSON() ([]byte, error) {
	return []byte(`"` + d.String() + `"`), nil
}

// String formats d like time.Duration.
func (d Duration) String() string { return time.Duration(d).Round(time.Millisecond).String() }

// Seconds is d in seconds, for the machine-readable twin of each duration.
func (d Duration) Seconds() float64 { return time.Duration(d).Round(time.Millisecond).Seconds() }

// UnmarshalJSON reads a duration string, so reports round-trip.
func (d *Duration) UnmarshalJSON(b []byte) error {
	v, err := time.ParseDuration(strings.Trim(string(b), `"`))
	if err != nil {
		return fmt.Errorf("duration %s: %w", b, err)
	}
	*d = Duration(v)
	return nil
}
