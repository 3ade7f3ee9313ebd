package etcdlayout

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	bolt "go.etcd.io/bbolt"
	"go.etcd.io/etcd/server/v3/storage/mvcc"

	"github.com/kms-v2/kms-plugin/rotation/etcdlayout/snapshottest"
)

func put(key, value string) snapshottest.Op { return snapshottest.Put(key, []byte(value)) }
func del(key string) snapshottest.Op        { return snapshottest.Delete(key) }

func openSnapshot(t *testing.T, path string) *Snapshot {
	t.Helper()
	s, err := OpenSnapshot(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// scanAll is every live key under prefix as key=value, paged by pageSize.
func scanAll(t *testing.T, s Store, prefix string, pageSize int64) []string {
	t.Helper()
	var got []string
	err := Scan(context.Background(), s, prefix, pageSize, func(kv KeyValue) error {
		got = append(got, kv.Key+"="+string(kv.Value))
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return got
}

func TestSnapshotReadsNewestLiveRevisions(t *testing.T) {
	path := snapshottest.Write(t,
		put("/registry/secrets/ns/a", "a1"),
		put("/registry/secrets/ns/b", "b1"),
		put("/registry/secrets/ns/b", "b2"),
		put("/registry/secrets/ns/gone", "x"),
		del("/registry/secrets/ns/gone"),
		put("/registry/secrets/ns/back", "old"),
		del("/registry/secrets/ns/back"),
		put("/registry/secrets/ns/back", "new"),
		put("/registry/configmaps/ns/c", "c1"),
		put("/other/secrets/ns/z", "z"),
	)
	s := openSnapshot(t, path)
	want := []string{"/registry/secrets/ns/a=a1", "/registry/secrets/ns/b=b2", "/registry/secrets/ns/back=new"}
	for _, pageSize := range []int64{1, 2, 500} {
		t.Run(fmt.Sprintf("page size %d", pageSize), func(t *testing.T) {
			if got := scanAll(t, s, Default().ResourcePrefix("secrets"), pageSize); fmt.Sprint(got) != fmt.Sprint(want) {
				t.Errorf("got %v, want %v", got, want)
			}
		})
	}
	if got, want := s.Revision(), int64(11); got != want {
		t.Errorf("revision: got %d, want %d (10 writes after etcd's initial revision 1)", got, want)
	}
	kv, ok, err := Get(context.Background(), s, "/registry/secrets/ns/b")
	if err != nil || !ok {
		t.Fatalf("Get: %v %v", ok, err)
	}
	if got, want := kv.ModRevision, int64(4); got != want {
		t.Errorf("mod revision of b: got %d, want %d (its second put)", got, want)
	}
	if _, ok, _ := Get(context.Background(), s, "/registry/secrets/ns/gone"); ok {
		t.Error("a deleted key is read from the snapshot")
	}
}

// TestSnapshotRefusesBadFiles checks every way a file can fail to be a
// snapshot: each is ErrBadSnapshot in one line naming the file and the fix.
func TestSnapshotRefusesBadFiles(t *testing.T) {
	good := snapshottest.Write(t, put("/registry/namespaces/kube-system", "ns"))
	goodBytes, err := os.ReadFile(good)
	if err != nil {
		t.Fatal(err)
	}
	dbBytes := goodBytes[:len(goodBytes)-sha256.Size]
	tests := []struct {
		name string
		file func(t *testing.T, dir string) string
		want string
	}{
		{"missing file", func(_ *testing.T, dir string) string { return filepath.Join(dir, "nope.db") }, "does not exist"},
		{"a directory", func(_ *testing.T, dir string) string { return dir }, "no sha256 digest"},
		{"empty file", func(t *testing.T, dir string) string { return writeFile(t, dir, nil) }, "no sha256 digest"},
		{"truncated", func(t *testing.T, dir string) string { return writeFile(t, dir, goodBytes[:len(goodBytes)-1000]) }, "no sha256 digest"},
		{"truncated to a sector plus 32 bytes", func(t *testing.T, dir string) string { return writeFile(t, dir, goodBytes[:4096+32]) }, "does not match"},
		{"one byte flipped", func(t *testing.T, dir string) string {
			b := bytes.Clone(goodBytes)
			b[5000] ^= 1
			return writeFile(t, dir, b)
		}, "does not match"},
		{"raw database without digest", func(t *testing.T, dir string) string { return writeFile(t, dir, dbBytes) }, "no sha256 digest"},
		{"random bytes", func(t *testing.T, dir string) string { return writeFile(t, dir, randomBytes(t, 8192+32)) }, "does not match"},
		{"random bytes with a digest", func(t *testing.T, dir string) string { return snapshottest.WithDigest(t, dir, randomBytes(t, 8192)) }, "not a bbolt database"},
		{"bbolt without the key bucket", func(t *testing.T, dir string) string { return boltFile(t, dir, "meta", nil, nil) }, `without etcd's "key" bucket`},
		{"key bucket with a key that is no revision", func(t *testing.T, dir string) string {
			return boltFile(t, dir, "key", []byte("not-a-revision"), []byte("x"))
		}, "not a revision"},
		{"key bucket with a value that is no KeyValue", func(t *testing.T, dir string) string {
			return boltFile(t, dir, "key", mvcc.RevToBytes(mvcc.Revision{Main: 2}, mvcc.NewRevBytes()), []byte{0xff, 0xff, 0xff})
		}, "not an etcd KeyValue"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := tt.file(t, t.TempDir())
			s, err := OpenSnapshot(path)
			if err == nil {
				s.Close()
				t.Fatal("opened")
			}
			msg := err.Error()
			if !errors.Is(err, ErrBadSnapshot) || !strings.Contains(msg, tt.want) || !strings.Contains(msg, path) ||
				!strings.Contains(msg, "etcdctl snapshot save") || strings.Contains(msg, "\n") {
				t.Errorf("error %q: want one line, ErrBadSnapshot, naming %s, %q and the fix", msg, path, tt.want)
			}
		})
	}
}

func writeFile(t *testing.T, dir string, b []byte) string {
	t.Helper()
	path := filepath.Join(dir, "file.db")
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func randomBytes(t *testing.T, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

// boltFile is a bbolt database with one bucket (and one entry when key is
// set), with a digest appended: a valid file that is not etcd's.
func boltFile(t *testing.T, dir, bucket string, key, value []byte) string {
	t.Helper()
	raw := filepath.Join(dir, "raw.db")
	db, err := bolt.Open(raw, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		b, err := tx.CreateBucket([]byte(bucket))
		if err != nil || key == nil {
			return err
		}
		return b.Put(key, value)
	})
	db.Close()
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(raw)
	if err != nil {
		t.Fatal(err)
	}
	return snapshottest.WithDigest(t, dir, b)
}
