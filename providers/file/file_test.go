package file

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/tink-crypto/tink-go/v2/insecurecleartextkeyset"
	"google.golang.org/protobuf/proto"

	"github.com/kms-v2/kms-plugin/providers"
	"github.com/kms-v2/kms-plugin/providers/providertest"
)

func newKeyset(t testing.TB) Config {
	t.Helper()
	cfg := Config{Path: filepath.Join(t.TempDir(), "keyset.json")}
	if _, err := Init(context.Background(), cfg, nil); err != nil {
		t.Fatalf("Init: %v", err)
	}
	return cfg
}

func open(t testing.TB, cfg Config) *Provider {
	t.Helper()
	p, err := New(context.Background(), cfg, nil)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

func TestConformance(t *testing.T) {
	providertest.Run(t, func(t *testing.T) providers.Provider { return open(t, newKeyset(t)) })
}

func TestInitRefusesExisting(t *testing.T) {
	cfg := newKeyset(t)
	before, _ := os.ReadFile(cfg.Path)
	if _, err := Init(context.Background(), cfg, nil); !errors.Is(err, providers.ErrRefused) {
		t.Fatalf("second Init: got %v, want ErrRefused", err)
	}
	after, _ := os.ReadFile(cfg.Path)
	if string(before) != string(after) {
		t.Fatal("second Init changed the keyset file")
	}
	fi, err := os.Stat(cfg.Path)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := fi.Mode().Perm(), os.FileMode(0o600); got != want {
		t.Fatalf("keyset mode %v, want %v", got, want)
	}
}

func TestNewErrors(t *testing.T) {
	dir := t.TempDir()
	worldReadable := newKeyset(t)
	if err := os.Chmod(worldReadable.Path, 0o644); err != nil {
		t.Fatal(err)
	}
	garbage := filepath.Join(dir, "garbage.json")
	if err := os.WriteFile(garbage, []byte(`{"name":"x"`), 0o600); err != nil {
		t.Fatal(err)
	}
	unknownField := filepath.Join(dir, "unknown.json")
	if err := os.WriteFile(unknownField, []byte(`{"name":"x","keyset":{},"extra":1}`), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		path string
		want string
	}{
		{"missing", filepath.Join(dir, "nope.json"), "kmsctl keys init"},
		{"world readable", worldReadable.Path, "chmod 600"},
		{"truncated json", garbage, "not a kms-plugin keyset file"},
		{"unknown field", unknownField, "unknown field"},
		{"empty path", "", "path: missing"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := New(context.Background(), Config{Path: tt.path}, nil)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("New: got %v, want an error containing %q", err, tt.want)
			}
			if strings.Contains(err.Error(), "\n") {
				t.Fatalf("error is not one line: %q", err)
			}
		})
	}
}

// TestFollowerPicksUpChanges is the multi-plugin case: one instance (kmsctl)
// promotes, another (a running plugin) follows after a refresh, and
// decrypts data made with a version it has never seen by refreshing once.
func TestFollowerPicksUpChanges(t *testing.T) {
	cfg := newKeyset(t)
	admin, follower := open(t, cfg), open(t, cfg)
	ctx := context.Background()
	v, err := admin.CreateVersion(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := admin.Promote(ctx, v.KeyID); err != nil {
		t.Fatal(err)
	}
	seed := providertest.Seed(t)
	sealed, err := admin.Encrypt(ctx, seed)
	if err != nil {
		t.Fatal(err)
	}
	// Unknown key_id: the follower refreshes once and succeeds.
	got, err := follower.Decrypt(ctx, sealed)
	if err != nil || string(got) != string(seed) {
		t.Fatalf("follower Decrypt of a new version: %v", err)
	}
	if got, _ := follower.PrimaryKeyID(ctx); got != v.KeyID {
		t.Fatalf("follower primary %q, want %q", got, v.KeyID)
	}
}

func TestRefreshKeepsStateOnBadFile(t *testing.T) {
	cfg := newKeyset(t)
	p := open(t, cfg)
	want, _ := p.PrimaryKeyID(context.Background())
	if err := os.WriteFile(cfg.Path, []byte("not json"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := p.Check(context.Background()); !errors.Is(err, providers.ErrUnavailable) {
		t.Fatalf("Check after corrupting the file: got %v, want ErrUnavailable", err)
	}
	if got, _ := p.PrimaryKeyID(context.Background()); got != want {
		t.Fatalf("primary changed to %q after a failed refresh, want %q", got, want)
	}
	if _, err := p.Encrypt(context.Background(), providertest.Seed(t)); err != nil {
		t.Fatalf("Encrypt with the last good state: %v", err)
	}
}

func FuzzDecrypt(f *testing.F) {
	cfg := newKeyset(f)
	p := open(f, cfg)
	id, _ := p.PrimaryKeyID(context.Background())
	s, _ := p.Encrypt(context.Background(), make([]byte, 32))
	f.Add(s.Ciphertext, id)
	f.Add([]byte{formatV1}, id)
	f.Add([]byte{}, "file:x/1")
	f.Fuzz(func(t *testing.T, ct []byte, keyID string) {
		pt, err := p.Decrypt(context.Background(), providers.Sealed{KeyID: keyID, Ciphertext: ct})
		if err == nil && (keyID != id || len(pt) != 32) {
			t.Fatalf("Decrypt accepted foreign input: key_id %q, %d bytes", keyID, len(pt))
		}
	})
}

// FuzzParseKeyset: the keyset file is parsed on every refresh. Any bytes
// parse without a panic; a keyset that parses encodes (as kmsctl writes it)
// to a file that parses to the same name, creation times and keys, and
// builds the same state: the same key_ids, primary and enabled flags.
func FuzzParseKeyset(f *testing.F) {
	cfg := newKeyset(f)
	good, _ := os.ReadFile(cfg.Path)
	f.Add(good)
	f.Add([]byte(`{}`))
	f.Add([]byte(`{"name":"x","keyset":{}}`))
	f.Add([]byte(`{"name":"Bad","created":{},"keyset":{"primaryKeyId":1,"key":[]}}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		l, err := parseKeyset(data)
		if err != nil {
			return
		}
		st, stErr := buildState(l) // must not panic
		out, err := encode(l.doc, l.handle)
		if err != nil {
			t.Fatalf("a parsed keyset does not encode: %v", err)
		}
		l2, err := parseKeyset(out)
		if err != nil {
			t.Fatalf("a parsed keyset, encoded, does not parse: %v\n%s", err, out)
		}
		if l2.doc.Name != l.doc.Name || !reflect.DeepEqual(l2.doc.Created, l.doc.Created) {
			t.Fatalf("round trip changed the document: %+v became %+v", l.doc, l2.doc)
		}
		if !proto.Equal(insecurecleartextkeyset.KeysetMaterial(l.handle), insecurecleartextkeyset.KeysetMaterial(l2.handle)) {
			t.Fatal("round trip changed the key material")
		}
		st2, stErr2 := buildState(l2)
		if (stErr == nil) != (stErr2 == nil) {
			t.Fatalf("round trip changed whether the state builds: %v, then %v", stErr, stErr2)
		}
		if stErr != nil {
			return
		}
		if st2.name != st.name || st2.primary.keyID != st.primary.keyID || len(st2.order) != len(st.order) {
			t.Fatalf("round trip changed the state: %s/%s/%d became %s/%s/%d", st.name, st.primary.keyID, len(st.order), st2.name, st2.primary.keyID, len(st2.order))
		}
		for i, e := range st.order {
			e2 := st2.order[i]
			if e2.keyID != e.keyID || e2.enabled != e.enabled || !e2.created.Equal(e.created) {
				t.Fatalf("round trip changed key %d: %+v became %+v", i, e, e2)
			}
			if k, err := providers.ParseKeyID(e.keyID); err != nil || k.Backend != Backend {
				t.Fatalf("key_id %q does not parse as this backend's: %v", e.keyID, err)
			}
		}
	})
}
