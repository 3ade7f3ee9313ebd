// Package snapshottest writes etcd snapshot files for tests through etcd's
// own mvcc store and backend, so the offline reader is tested on the bytes
// etcd really writes (revisions, tombstones, the appended sha256), not on a
// copy of its format.
package snapshottest

import (
	"bytes"
	"crypto/sha256"
	"os"
	"path/filepath"
	"testing"

	"go.etcd.io/etcd/server/v3/lease"
	"go.etcd.io/etcd/server/v3/storage/backend"
	"go.etcd.io/etcd/server/v3/storage/mvcc"
	"go.uber.org/zap"
)

// Op is one write to the store a snapshot is made from.
type Op struct {
	Key   string
	Value []byte
	// Delete deletes Key instead of putting Value.
	Delete bool
}

// Put is an Op that writes value under key.
func Put(key string, value []byte) Op { return Op{Key: key, Value: value} }

// Delete is an Op that deletes key, leaving a tombstone revision.
func Delete(key string) Op { return Op{Key: key, Delete: true} }

// Write applies ops in order to a fresh etcd store and returns the path of
// a snapshot file as `etcdctl snapshot save` writes it: the bbolt database
// etcd's maintenance API streams, then its sha256.
func Write(t testing.TB, ops ...Op) string {
	t.Helper()
	dir := t.TempDir()
	be := backend.NewDefaultBackend(zap.NewNop(), filepath.Join(dir, "member.db"))
	s := mvcc.NewStore(zap.NewNop(), be, &lease.FakeLessor{}, mvcc.StoreConfig{})
	for _, op := range ops {
		if op.Delete {
			s.DeleteRange([]byte(op.Key), nil)
		} else {
			s.Put([]byte(op.Key), op.Value, lease.NoLease)
		}
	}
	be.ForceCommit()
	var db bytes.Buffer
	snap := be.Snapshot()
	_, err := snap.WriteTo(&db)
	snap.Close()
	s.Close()
	be.Close()
	if err != nil {
		t.Fatal(err)
	}
	return WithDigest(t, dir, db.Bytes())
}

// WithDigest writes b followed by its sha256 into dir, as etcd does, and
// returns the file's path.
func WithDigest(t testing.TB, dir string, b []byte) string {
	t.Helper()
	sum := sha256.Sum256(b)
	path := filepath.Join(dir, "snapshot.db")
	if err := os.WriteFile(path, append(bytes.Clone(b), sum[:]...), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}
