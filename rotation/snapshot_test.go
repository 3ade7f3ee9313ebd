package rotation

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/kms-v2/kms-plugin/providers"
	"github.com/kms-v2/kms-plugin/rotation/etcdlayout"
	"github.com/kms-v2/kms-plugin/rotation/etcdlayout/snapshottest"
)

// apiserverSnapshot is a snapshot of an apiserver's etcd under /registry:
// the kube-system namespace, secrets under two key versions (one of them
// deleted and one overwritten since), a plaintext configmap, an
// undecodable secret when asked, and a KMS value outside the prefix.
func apiserverSnapshot(t *testing.T, undecodable bool) string {
	ops := []snapshottest.Op{
		snapshottest.Put("/registry/namespaces/kube-system", []byte("k8s\x00ns")),
		snapshottest.Put("/registry/secrets/ns/a", kmsValue(t, "file:k/1")),
		snapshottest.Put("/registry/secrets/ns/b", kmsValue(t, "file:k/1")),
		snapshottest.Put("/registry/secrets/ns/c", kmsValue(t, "file:k/0")),
		snapshottest.Delete("/registry/secrets/ns/c"),
		snapshottest.Put("/registry/secrets/ns/d", kmsValue(t, "file:k/0")),
		snapshottest.Put("/registry/secrets/ns/d", kmsValue(t, "file:k/2")),
		snapshottest.Put("/registry/configmaps/ns/e", []byte("k8s\x00cm")),
		snapshottest.Put("/elsewhere/secrets/ns/f", kmsValue(t, "file:k/9")),
	}
	if undecodable {
		ops = append(ops, snapshottest.Put("/registry/secrets/ns/g", []byte(etcdlayout.KMSv2Prefix+"test:\xff\xff")))
	}
	return snapshottest.Write(t, ops...)
}

func TestReadSnapshotNeeds(t *testing.T) {
	path := apiserverSnapshot(t, false)
	n, err := ReadSnapshotNeeds(context.Background(), path, etcdlayout.Default())
	if err != nil {
		t.Fatal(err)
	}
	if got, want := fmt.Sprint(n.Keys), "[{test file:k/1 2} {test file:k/2 1}]"; got != want {
		t.Errorf("keys: got %s, want %s (a deleted or overwritten object needs nothing, nor one outside the prefix)", got, want)
	}
	if got, want := fmt.Sprint(n.KeyIDs(), n.Providers()), "[file:k/1 file:k/2] [test]"; got != want {
		t.Errorf("key_ids and providers: got %s, want %s", got, want)
	}
	if got, want := fmt.Sprint(n.Objects, n.Plaintext, n.Other, n.Undecodable), "5 2 0 0"; got != want {
		t.Errorf("objects, plaintext, other, undecodable: got %s, want %s", got, want)
	}
	if n.Snapshot != path || n.Revision == 0 {
		t.Errorf("snapshot %q at revision %d: want %s at its revision", n.Snapshot, n.Revision, path)
	}
}

func TestReadSnapshotNeedsRefusesAnotherPrefix(t *testing.T) {
	path := apiserverSnapshot(t, false)
	layout, err := etcdlayout.New("/elsewhere")
	if err != nil {
		t.Fatal(err)
	}
	_, err = ReadKeepReadable(context.Background(), []string{path}, layout)
	if !errors.Is(err, ErrWrongEtcd) || !strings.Contains(err.Error(), "--etcd-prefix") || !strings.Contains(err.Error(), path) {
		t.Errorf("err: got %v, want ErrWrongEtcd naming %s and --etcd-prefix", err, path)
	}
	_, err = ReadKeepReadable(context.Background(), []string{path + ".missing"}, etcdlayout.Default())
	if !errors.Is(err, etcdlayout.ErrBadSnapshot) || !strings.HasPrefix(err.Error(), "--keep-readable: ") {
		t.Errorf("err: got %v, want ErrBadSnapshot under --keep-readable", err)
	}
}

func TestCheckSnapshotNotEmpty(t *testing.T) {
	c := &Census{Store: "etcd snapshot s.db", Prefix: "/registry", Resources: []ResourceCensus{{Resource: "secrets", Total: 3}, {Resource: "configmaps"}}}
	err := CheckSnapshotNotEmpty(c)
	if !errors.Is(err, ErrWrongEtcd) || !strings.Contains(err.Error(), "no configmaps under /registry") {
		t.Errorf("err: got %v, want ErrWrongEtcd naming configmaps", err)
	}
	c.Resources[1].Total = 1
	if err := CheckSnapshotNotEmpty(c); err != nil {
		t.Errorf("err: got %v, want none", err)
	}
}

func TestKeepReadableBlocker(t *testing.T) {
	needs := func(undecodable int, keyIDs ...string) *SnapshotNeeds {
		n := &SnapshotNeeds{Snapshot: "s.db", Needs: Needs{Undecodable: undecodable}}
		for _, k := range keyIDs {
			n.Keys = append(n.Keys, KeyNeed{Provider: "test", KeyID: k, Objects: 1})
		}
		return n
	}
	is := func(id string) func(string) bool { return func(k string) bool { return k == id } }
	tests := []struct {
		name   string
		keep   KeepReadable
		doomed func(string) bool
		want   string
	}{
		{"no snapshots", nil, is("file:k/1"), ""},
		{"needs another version", KeepReadable{needs(0, "file:k/2")}, is("file:k/1"), ""},
		{"needs the doomed version", KeepReadable{needs(0, "file:k/2"), needs(0, "file:k/1")}, is("file:k/1"), "snapshot s.db still needs key_id file:k/1"},
		{"undecodable values", KeepReadable{needs(2)}, is("file:k/1"), "2 undecodable values"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := tt.keep.Blocker(tt.doomed)
			if (tt.want == "") != (got == "") || !strings.Contains(got, tt.want) {
				t.Errorf("got %q, want %q", got, tt.want)
			}
		})
	}
}

func TestRunRetireKeepsWhatASnapshotNeeds(t *testing.T) {
	snapshotOf := func(keyID string) KeepReadable {
		return KeepReadable{{Snapshot: "before.db", Needs: Needs{Keys: []KeyNeed{{Provider: "test", KeyID: keyID, Objects: 3}}}}}
	}
	tests := []struct {
		name      string
		keep      KeepReadable
		wantState providers.KeyState
	}{
		{"snapshot needs the old version", snapshotOf("file:k/1"), providers.StateEnabled},
		{"snapshot needs only the new version", snapshotOf("file:k/2"), providers.StateDisabled},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := newCluster(t, time.Hour, 5, 0)
			o := opts(t, "secrets")
			o.Force, o.Retire, o.KeepReadable = true, true, tt.keep
			rep, err := c.rotation(t).Run(context.Background(), o)
			if got, want := c.rot.state("file:k/1"), tt.wantState; got != want {
				t.Errorf("old key: got %s, want %s", got, want)
			}
			if tt.wantState == providers.StateDisabled {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if !errors.Is(err, ErrRetireRefused) || !strings.Contains(rep.RetireRefused, "snapshot before.db still needs key_id file:k/1") {
				t.Errorf("err %v, refusal %q: want ErrRetireRefused naming the snapshot and file:k/1", err, rep.RetireRefused)
			}
		})
	}
}

func TestRunRetireKeepsADecryptOnlyProviderASnapshotNeeds(t *testing.T) {
	c := newCluster(t, time.Hour, 10, 0)
	seed(t, c.etcd, "configmaps", "old:v/1", 7)
	old, oldRot := oldProvider()
	rot := c.rotation(t)
	rot.DecryptOnly = []DecryptOnly{old}
	o := opts(t, "secrets", "configmaps")
	o.Retire = true
	o.KeepReadable = KeepReadable{{Snapshot: "before.db", Needs: Needs{Keys: []KeyNeed{{Provider: "old", KeyID: "old:v/2", Objects: 1}}}}}
	rep, err := rot.Run(context.Background(), o)
	if !errors.Is(err, ErrRetireRefused) || !strings.Contains(rep.RetireRefused, "old:v/2") {
		t.Fatalf("err %v, refusal %q: want ErrRetireRefused naming old:v/2", err, rep.RetireRefused)
	}
	if got := oldRot.state("old:v/2"); got != providers.StateEnabled {
		t.Errorf("old:v/2 is %s, want it kept enabled for the snapshot", got)
	}
}
