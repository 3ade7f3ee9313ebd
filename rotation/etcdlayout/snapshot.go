package etcdlayout

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"slices"
	"strings"
	"time"

	bolt "go.etcd.io/bbolt"
	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/server/v3/storage/mvcc"
	"go.etcd.io/etcd/server/v3/storage/schema"
	"google.golang.org/protobuf/proto"
)

// ErrBadSnapshot means a file given as an etcd snapshot cannot be read as
// one: missing, truncated, corrupt, or not an etcd snapshot at all. Nothing
// read from such a file could prove anything.
var ErrBadSnapshot = errors.New("not a readable etcd snapshot")

// saveHint is the fix every bad-snapshot message ends with.
const saveHint = "give a file written by `etcdctl snapshot save FILE`"

// Snapshot is an etcd snapshot file (the bbolt database `etcdctl snapshot
// save` writes, with its sha256 appended) read offline as a Store: the
// newest revision of every key, deleted keys left out, exactly as a Range
// against the etcd it was taken from would have answered at the snapshot's
// revision. It never writes the file. It is safe for concurrent use.
type Snapshot struct {
	path string
	db   *bolt.DB
	// keys holds every live key with the bucket key of its newest revision,
	// sorted by key: the key bucket is ordered by revision, so a Range by
	// key needs this index. Values stay in the file until a Range reads them.
	keys []snapshotKey
	// revision is the newest revision the snapshot holds.
	revision int64
}

// snapshotKey is one live key and where its newest value is.
type snapshotKey struct {
	key string
	rev []byte
}

// OpenSnapshot checks path the way etcd's own restore does (the sha256
// `etcdctl snapshot save` appends must match the database before it), opens
// the database read only, and indexes the newest revision of every key.
// Every failure wraps ErrBadSnapshot in one line that names the file and
// the fix.
func OpenSnapshot(path string) (*Snapshot, error) {
	if err := verifySnapshotHash(path); err != nil {
		return nil, err
	}
	db, err := bolt.Open(path, 0o400, &bolt.Options{ReadOnly: true, Timeout: 5 * time.Second})
	if err != nil {
		return nil, fmt.Errorf("snapshot %s is not a bbolt database (%v); %s: %w", path, err, saveHint, ErrBadSnapshot)
	}
	s := &Snapshot{path: path, db: db}
	if err := db.View(s.index); err != nil {
		db.Close()
		return nil, err
	}
	return s, nil
}

// verifySnapshotHash checks the sha256 etcd appends to a snapshot. Like
// etcdutl, a file whose size is not a whole number of 512-byte sectors plus
// the 32-byte digest has no digest: it was cut short, or it is not a
// snapshot. A raw member/snap/db copy has none either and is refused, since
// nothing could then tell it from a truncated file.
func verifySnapshotHash(path string) error {
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("snapshot %s does not exist; %s: %w", path, saveHint, ErrBadSnapshot)
	}
	if err != nil {
		return fmt.Errorf("snapshot %s: %v; make it readable by this user: %w", path, err, ErrBadSnapshot)
	}
	defer f.Close()
	info, err := f.Stat()
	if err != nil {
		return fmt.Errorf("snapshot %s: %v: %w", path, err, ErrBadSnapshot)
	}
	size := info.Size()
	if !info.Mode().IsRegular() || size%512 != sha256.Size {
		return fmt.Errorf("snapshot %s (%d bytes) has no sha256 digest at its end: it is truncated or not an etcd snapshot; %s: %w", path, size, saveHint, ErrBadSnapshot)
	}
	h := sha256.New()
	if _, err := io.CopyN(h, f, size-sha256.Size); err != nil {
		return fmt.Errorf("snapshot %s: read: %v: %w", path, err, ErrBadSnapshot)
	}
	want := make([]byte, sha256.Size)
	if _, err := io.ReadFull(f, want); err != nil {
		return fmt.Errorf("snapshot %s: read digest: %v: %w", path, err, ErrBadSnapshot)
	}
	if !bytes.Equal(h.Sum(nil), want) {
		return fmt.Errorf("snapshot %s: sha256 digest does not match its contents: the file is corrupt; use another copy or %s: %w", path, saveHint, ErrBadSnapshot)
	}
	return nil
}

// index walks etcd's key bucket (bucket keys are revisions, in order) and
// keeps, per key, its newest revision unless that is a tombstone (a delete).
func (s *Snapshot) index(tx *bolt.Tx) error {
	b := tx.Bucket(schema.Key.Name())
	if b == nil {
		return fmt.Errorf("snapshot %s is a bbolt database without etcd's %q bucket, not an etcd snapshot; %s: %w", s.path, schema.Key.Name(), saveHint, ErrBadSnapshot)
	}
	newest := map[string][]byte{}
	err := b.ForEach(func(rev, value []byte) error {
		bk, err := parseBucketKey(rev)
		if err != nil {
			return fmt.Errorf("snapshot %s: %w", s.path, err)
		}
		var kv mvccpb.KeyValue
		if err := proto.Unmarshal(value, &kv); err != nil {
			return fmt.Errorf("snapshot %s: value at revision %d is not an etcd KeyValue (%v); %s: %w", s.path, bk.Main, err, saveHint, ErrBadSnapshot)
		}
		s.revision = max(s.revision, bk.Main)
		if mvcc.IsTombstone(rev) {
			delete(newest, string(kv.GetKey()))
		} else {
			newest[string(kv.GetKey())] = bytes.Clone(rev)
		}
		return nil
	})
	if err != nil {
		return err
	}
	s.keys = make([]snapshotKey, 0, len(newest))
	for k, rev := range newest {
		s.keys = append(s.keys, snapshotKey{key: k, rev: rev})
	}
	slices.SortFunc(s.keys, func(a, b snapshotKey) int { return strings.Compare(a.key, b.key) })
	return nil
}

// parseBucketKey decodes a key bucket key with etcd's own decoder, after
// checking what that decoder would panic on.
func parseBucketKey(rev []byte) (mvcc.BucketKey, error) {
	okLen := len(rev) == len(mvcc.NewRevBytes()) || len(rev) == len(mvcc.NewRevBytes())+1
	if !okLen || rev[8] != '_' || rev[0]&0x80 != 0 || rev[9]&0x80 != 0 {
		return mvcc.BucketKey{}, fmt.Errorf("key bucket holds %q, not a revision; %s: %w", rev, saveHint, ErrBadSnapshot)
	}
	return mvcc.BytesToBucketKey(rev), nil
}

// Range implements Store: the live keys from <= key < end, in key order.
func (s *Snapshot) Range(ctx context.Context, from, end string, limit int64) ([]KeyValue, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	i, _ := slices.BinarySearchFunc(s.keys, from, func(k snapshotKey, t string) int { return strings.Compare(k.key, t) })
	var out []KeyValue
	err := s.db.View(func(tx *bolt.Tx) error {
		b := tx.Bucket(schema.Key.Name())
		for ; i < len(s.keys) && s.keys[i].key < end && (limit <= 0 || int64(len(out)) < limit); i++ {
			var kv mvccpb.KeyValue
			if err := proto.Unmarshal(b.Get(s.keys[i].rev), &kv); err != nil {
				return fmt.Errorf("%s: key %s: %w", s.Describe(), s.keys[i].key, err)
			}
			// proto.Unmarshal copies the value out of bbolt's memory,
			// which is gone once the transaction ends.
			out = append(out, KeyValue{Key: s.keys[i].key, Value: kv.GetValue(), ModRevision: kv.GetModRevision()})
		}
		return nil
	})
	return out, err
}

// Describe implements Store.
func (s *Snapshot) Describe() string { return "etcd snapshot " + s.path }

// Path is the snapshot's file name.
func (s *Snapshot) Path() string { return s.path }

// Revision is the newest revision in the snapshot: the etcd revision it
// was taken at (or the last write before it).
func (s *Snapshot) Revision() int64 { return s.revision }

// Keys is how many live keys the snapshot holds.
func (s *Snapshot) Keys() int { return len(s.keys) }

// Close releases the file.
func (s *Snapshot) Close() error { return s.db.Close() }
