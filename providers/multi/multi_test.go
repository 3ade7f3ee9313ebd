package multi

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/kms-v2/kms-plugin/providers"
)

// prefixed is a fake provider owning key_ids that start with its prefix;
// its ciphertext is the key_id it was made under, so a wrong route shows.
type prefixed struct {
	prefix   string
	checkErr error
	closed   bool
}

func (p *prefixed) Encrypt(context.Context, []byte) (providers.Sealed, error) {
	return providers.Sealed{KeyID: p.prefix + "1", Ciphertext: []byte(p.prefix)}, nil
}

func (p *prefixed) Decrypt(_ context.Context, s providers.Sealed) ([]byte, error) {
	if string(s.Ciphertext) != p.prefix {
		return nil, providers.ErrInvalidCiphertext
	}
	return make([]byte, providers.SeedSize), nil
}

func (p *prefixed) PrimaryKeyID(context.Context) (string, error) { return p.prefix + "1", nil }
func (p *prefixed) Owns(id string) bool                          { return strings.HasPrefix(id, p.prefix) }
func (p *prefixed) Check(context.Context) error                  { return p.checkErr }
func (p *prefixed) Close() error                                 { p.closed = true; return nil }

func entries(ps ...*prefixed) []Entry {
	var es []Entry
	for _, p := range ps {
		es = append(es, Entry{Name: strings.Trim(p.prefix, ":/"), Scope: providers.ScopeShared, Provider: p})
	}
	return es
}

func TestRoutes(t *testing.T) {
	ctx := context.Background()
	m, err := New(ctx, entries(&prefixed{prefix: "pkcs11:t/"}, &prefixed{prefix: "file:a/"}, &prefixed{prefix: "file:b/"}))
	if err != nil {
		t.Fatal(err)
	}
	s, err := m.Encrypt(ctx, make([]byte, providers.SeedSize))
	if err != nil || s.KeyID != "pkcs11:t/1" {
		t.Fatalf("Encrypt: %v %v, want the first entry's key", s.KeyID, err)
	}
	if id, _ := m.PrimaryKeyID(ctx); id != "pkcs11:t/1" {
		t.Errorf("PrimaryKeyID = %s, want the first entry's", id)
	}
	for _, prefix := range []string{"pkcs11:t/", "file:a/", "file:b/"} {
		if _, err := m.Decrypt(ctx, providers.Sealed{KeyID: prefix + "7", Ciphertext: []byte(prefix)}); err != nil {
			t.Errorf("Decrypt under %s: %v", prefix, err)
		}
	}
	_, err = m.Decrypt(ctx, providers.Sealed{KeyID: "azurekv:v/k/1", Ciphertext: []byte("x")})
	if !errors.Is(err, providers.ErrKeyNotFound) || !strings.Contains(err.Error(), "pkcs11:t, file:a, file:b") {
		t.Errorf("Decrypt of an unowned key_id: %v, want ErrKeyNotFound naming the providers", err)
	}
	if _, err := m.Decrypt(ctx, providers.Sealed{KeyID: "no colon"}); !errors.Is(err, providers.ErrInvalidInput) {
		t.Errorf("Decrypt of a malformed key_id: %v, want ErrInvalidInput", err)
	}
}

func TestNewRefuses(t *testing.T) {
	ctx := context.Background()
	if _, err := New(ctx, nil); err == nil {
		t.Error("New(nil) succeeded")
	}
	a, b := &prefixed{prefix: "file:a/"}, &prefixed{prefix: "file:"}
	if _, err := New(ctx, entries(a, b)); err == nil || !strings.Contains(err.Error(), "both claim key_id file:a/1") {
		t.Errorf("overlapping owners: %v, want a refusal naming the key_id", err)
	}
	es := entries(&prefixed{prefix: "x:"}, &prefixed{prefix: "y:"})
	es[1].Name = es[0].Name
	if _, err := New(ctx, es); err == nil {
		t.Error("two entries of one name accepted")
	}
}

func TestCheckNamesEachFailure(t *testing.T) {
	ctx := context.Background()
	a, b := &prefixed{prefix: "a:", checkErr: providers.ErrUnavailable}, &prefixed{prefix: "b:", checkErr: providers.ErrPermissionDenied}
	m, err := New(ctx, entries(a, b, &prefixed{prefix: "c:"}))
	if err != nil {
		t.Fatal(err)
	}
	err = m.Check(ctx)
	if !errors.Is(err, providers.ErrUnavailable) || !errors.Is(err, providers.ErrPermissionDenied) ||
		!strings.Contains(err.Error(), "provider a:") || !strings.Contains(err.Error(), "provider b:") || strings.Contains(err.Error(), "\n") {
		t.Errorf("Check: %q, want both failures on one line, each named", err)
	}
	if err := m.Close(); err != nil || !a.closed || !b.closed {
		t.Errorf("Close: %v, closed %v %v", err, a.closed, b.closed)
	}
}
