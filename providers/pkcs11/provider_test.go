//go:build cgo

package pkcs11

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/miekg/pkcs11"

	"github.com/kms-v2/kms-plugin/providers"
	"github.com/kms-v2/kms-plugin/providers/pkcs11/pkcs11test"
	"github.com/kms-v2/kms-plugin/providers/providertest"
)

func testCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func testLogger(t testing.TB) hclog.Logger {
	return hclog.New(&hclog.LoggerOptions{Name: t.Name(), Level: hclog.Warn, Output: testWriter{t}})
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(b), "\n"))
	return len(b), nil
}

func configFor(tk pkcs11test.Token) Config {
	return Config{Module: tk.Module, TokenLabel: tk.Label, PinFile: tk.PinFile, KeyLabel: "k8s-kek"}
}

// newInitialized makes a token with one primary key and a provider on it.
func newInitialized(t testing.TB) (*Provider, Config) {
	t.Helper()
	tk := pkcs11test.NewToken(t, "")
	cfg := configFor(tk)
	if _, err := Init(testCtx(t), cfg, testLogger(t)); err != nil {
		t.Fatalf("Init: %v", err)
	}
	return mustNew(t, cfg), cfg
}

func mustNew(t testing.TB, cfg Config) *Provider {
	t.Helper()
	p, err := New(testCtx(t), cfg, testLogger(t))
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

func TestConformance(t *testing.T) {
	providertest.Run(t, func(t *testing.T) providers.Provider {
		p, _ := newInitialized(t)
		return p
	})
}

func TestCiphertextLayout(t *testing.T) {
	p, _ := newInitialized(t)
	s, err := p.Encrypt(testCtx(t), providertest.Seed(t))
	if err != nil {
		t.Fatal(err)
	}
	if got, want := len(s.Ciphertext), 1+12+32+16; got != want {
		t.Errorf("ciphertext length = %d, want %d (version, IV, seed, tag)", got, want)
	}
	if got, want := s.Ciphertext[0], byte(1); got != want {
		t.Errorf("format byte = %d, want %d", got, want)
	}
	if got, want := s.KeyID, "pkcs11:"+p.cfg.TokenLabel+"/k8s-kek-1"; got != want {
		t.Errorf("key_id = %q, want %q", got, want)
	}
	if len(s.Annotations) != 0 {
		t.Errorf("annotations = %v, want none", s.Annotations)
	}
}

// TestKeyObjectAttributes reads the generated key back from the token: the
// properties that make it an HSM-held key must be set by the token itself.
func TestKeyObjectAttributes(t *testing.T) {
	p, _ := newInitialized(t)
	st, _ := p.current()
	var attrs []*pkcs11.Attribute
	err := p.tok.do(testCtx(t), func(h pkcs11.SessionHandle) error {
		var err error
		attrs, err = p.tok.mod.ctx.GetAttributeValue(h, st.primary.handle, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, nil),
			pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, nil),
			pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, nil),
			pkcs11.NewAttribute(pkcs11.CKA_NEVER_EXTRACTABLE, nil),
			pkcs11.NewAttribute(pkcs11.CKA_ALWAYS_SENSITIVE, nil),
			pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, nil),
		})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	for i, c := range []struct {
		name string
		want bool
	}{
		{"CKA_TOKEN", true}, {"CKA_SENSITIVE", true}, {"CKA_EXTRACTABLE", false},
		{"CKA_NEVER_EXTRACTABLE", true}, {"CKA_ALWAYS_SENSITIVE", true}, {"CKA_PRIVATE", true},
	} {
		if got := boolAttr(attrs[i]); got != c.want {
			t.Errorf("%s = %v, want %v", c.name, got, c.want)
		}
	}
	if st.primary.created.IsZero() || time.Since(st.primary.created) > time.Hour {
		t.Errorf("created = %v, want about now", st.primary.created)
	}
}

func TestInitRefusesSecondInit(t *testing.T) {
	_, cfg := newInitialized(t)
	_, err := Init(testCtx(t), cfg, testLogger(t))
	if !errors.Is(err, providers.ErrRefused) {
		t.Fatalf("second Init: got %v, want ErrRefused", err)
	}
}

// TestFollowersSeePromote runs two providers on one token, as two plugin
// instances would: a promote through one becomes the other's primary at its
// next Refresh, and a disable through one is enforced for the other by the
// token even before it refreshes.
func TestFollowersSeePromote(t *testing.T) {
	a, cfg := newInitialized(t)
	b := mustNew(t, cfg)
	ctx := testCtx(t)
	old, _ := a.PrimaryKeyID(ctx)
	seed := providertest.Seed(t)
	sealedOld, err := b.Encrypt(ctx, seed)
	if err != nil {
		t.Fatal(err)
	}

	v, err := a.CreateVersion(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// b has not refreshed, but Decrypt of an unknown key_id refreshes once.
	sealedNew, err := a.Encrypt(ctx, seed)
	if err != nil {
		t.Fatal(err)
	}
	if sealedNew.KeyID != old {
		t.Fatalf("CreateVersion changed a's primary to %s", sealedNew.KeyID)
	}
	if err := a.Promote(ctx, v.KeyID); err != nil {
		t.Fatal(err)
	}
	if got, _ := b.PrimaryKeyID(ctx); got != old {
		t.Fatalf("b's primary before Refresh = %s, want the cached %s (PrimaryKeyID makes no token call)", got, old)
	}
	if err := b.Refresh(ctx); err != nil {
		t.Fatal(err)
	}
	if got, _ := b.PrimaryKeyID(ctx); got != v.KeyID {
		t.Fatalf("b's primary after Refresh = %s, want %s", got, v.KeyID)
	}
	roundTrip(t, b, a, seed, v.KeyID)

	if err := a.Disable(ctx, old); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Decrypt(ctx, sealedOld); !errors.Is(err, providers.ErrKeyDisabled) {
		t.Fatalf("b decrypting under a version a disabled, before b refreshed: got %v, want ErrKeyDisabled", err)
	}
	if err := b.Enable(ctx, old); err != nil {
		t.Fatal(err)
	}
	if got, err := a.Decrypt(ctx, sealedOld); err != nil || !bytes.Equal(got, seed) {
		t.Fatalf("a decrypting after b re-enabled: %v", err)
	}
}

func writePin(t *testing.T, dir, pin string, mode os.FileMode) string {
	t.Helper()
	path := filepath.Join(dir, "pin-"+strings.ReplaceAll(t.Name(), "/", "_"))
	if err := os.WriteFile(path, []byte(pin), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, mode); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestNewRefusesBadSetups checks that each broken setup fails New with a
// clear error that names the thing to fix.
func TestNewRefusesBadSetups(t *testing.T) {
	tk := pkcs11test.NewToken(t, "")
	good := configFor(tk)
	if _, err := Init(testCtx(t), good, testLogger(t)); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	cases := []struct {
		name     string
		edit     func(c *Config)
		wantErr  error // nil: only the message is checked
		wantText string
	}{
		{"WrongPIN", func(c *Config) { c.PinFile = writePin(t, dir, "not-the-pin\n", 0o600) }, providers.ErrPermissionDenied, "PIN"},
		{"WorldReadablePIN", func(c *Config) { c.PinFile = writePin(t, dir, tk.PIN, 0o644) }, nil, "chmod 600"},
		{"OthersReadablePIN", func(c *Config) { c.PinFile = writePin(t, dir, tk.PIN, 0o604) }, nil, "chmod 600"},
		{"EmptyPIN", func(c *Config) { c.PinFile = writePin(t, dir, "\n", 0o600) }, nil, "empty"},
		{"MissingPinFile", func(c *Config) { c.PinFile = filepath.Join(dir, "nope") }, os.ErrNotExist, "pinFile"},
		{"MissingModule", func(c *Config) { c.Module = filepath.Join(dir, "libnope.so") }, providers.ErrUnavailable, "libnope.so"},
		{"NotAModule", func(c *Config) { c.Module = c.PinFile }, providers.ErrUnavailable, "cannot be loaded"},
		{"MissingToken", func(c *Config) { c.TokenLabel = "no-such-token" }, providers.ErrUnavailable, `"no-such-token"`},
		{"NoKeyYet", func(c *Config) { c.KeyLabel = "other" }, nil, "kmsctl keys init"},
		{"InvalidConfig", func(c *Config) { c.Module = "libsofthsm2.so" }, nil, "absolute"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			cfg := good
			c.edit(&cfg)
			p, err := New(testCtx(t), cfg, testLogger(t))
			if err == nil {
				p.Close()
				t.Fatal("New succeeded, want an error")
			}
			if c.wantErr != nil && !errors.Is(err, c.wantErr) {
				t.Errorf("got %v, want %v", err, c.wantErr)
			}
			if !strings.Contains(err.Error(), c.wantText) {
				t.Errorf("got %q, want it to mention %q", err, c.wantText)
			}
			if strings.Contains(err.Error(), tk.PIN) {
				t.Errorf("error %q contains the PIN", err)
			}
		})
	}
	// The good config still works: nothing above locked or broke the token.
	p := mustNew(t, good)
	if err := p.Check(testCtx(t)); err != nil {
		t.Fatal(err)
	}
}

// roundTrip encrypts seed with enc, checks it used key version want, and
// checks dec decrypts it back.
func roundTrip(t *testing.T, enc, dec providers.Provider, seed []byte, want string) {
	t.Helper()
	ctx := testCtx(t)
	s, err := enc.Encrypt(ctx, seed)
	if err != nil {
		t.Fatal(err)
	}
	if s.KeyID != want {
		t.Fatalf("encrypted with %s, want %s", s.KeyID, want)
	}
	if got, err := dec.Decrypt(ctx, s); err != nil || !bytes.Equal(got, seed) {
		t.Fatalf("cannot decrypt the ciphertext of %s: %v", want, err)
	}
}

// rawToken attaches to a token outside any Provider, for tests that plant
// or remove objects the way another application would.
func rawToken(t *testing.T, cfg Config) *token {
	t.Helper()
	mod, err := openModule(cfg.Module)
	if err != nil {
		t.Fatal(err)
	}
	pin, err := readPIN(cfg.PinFile)
	if err != nil {
		t.Fatal(err)
	}
	cfg.Sessions = 2
	tok := newToken(mod, cfg, pin, hclog.NewNullLogger())
	t.Cleanup(func() { tok.close(); mod.release() })
	return tok
}

// TestRefusesUnsafeKeyObjects plants a key object under the provider's
// label whose value could leave the token; the provider must refuse it.
func TestRefusesUnsafeKeyObjects(t *testing.T) {
	cases := []struct {
		name                   string
		sensitive, extractable bool
	}{
		{"Extractable", true, true},
		{"NotSensitive", false, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			tk := pkcs11test.NewToken(t, "")
			cfg := configFor(tk)
			if _, err := Init(testCtx(t), cfg, testLogger(t)); err != nil {
				t.Fatal(err)
			}
			tok := rawToken(t, cfg)
			err := tok.doRW(testCtx(t), func(h pkcs11.SessionHandle) error {
				_, err := tok.mod.ctx.GenerateKey(h, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)}, []*pkcs11.Attribute{
					pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
					pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
					pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, 32),
					pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
					pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
					pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, c.sensitive),
					pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, c.extractable),
					pkcs11.NewAttribute(pkcs11.CKA_LABEL, "k8s-kek-2"),
				})
				return err
			})
			if err != nil {
				t.Fatal(err)
			}
			p, err := New(testCtx(t), cfg, testLogger(t))
			if err == nil {
				p.Close()
				t.Fatal("New accepted a token with an unsafe key object")
			}
			if !errors.Is(err, ErrUnsafeKey) || !strings.Contains(err.Error(), "k8s-kek-2") {
				t.Fatalf("got %v, want ErrUnsafeKey naming k8s-kek-2", err)
			}
		})
	}
}

func destroy(t *testing.T, tok *token, label string) {
	t.Helper()
	err := tok.doRW(testCtx(t), func(h pkcs11.SessionHandle) error {
		objs, err := findAll(tok.mod.ctx, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_LABEL, label)})
		if err != nil {
			return err
		}
		if len(objs) != 1 {
			t.Fatalf("found %d objects labelled %q, want 1", len(objs), label)
		}
		return tok.mod.ctx.DestroyObject(h, objs[0])
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestKeyObjectDeletedUnderRunningProvider removes key objects while a
// provider uses them: calls fail with clear errors, Check reports it, and
// nothing crashes.
func TestKeyObjectDeletedUnderRunningProvider(t *testing.T) {
	p, cfg := newInitialized(t)
	ctx := testCtx(t)
	seed := providertest.Seed(t)
	s1, err := p.Encrypt(ctx, seed)
	if err != nil {
		t.Fatal(err)
	}
	v2, err := p.CreateVersion(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Promote(ctx, v2.KeyID); err != nil {
		t.Fatal(err)
	}
	tok := rawToken(t, cfg)

	// A non-primary version removed: its data is lost, others keep working.
	destroy(t, tok, "k8s-kek-1")
	if _, err := p.Decrypt(ctx, s1); !errors.Is(err, providers.ErrKeyNotFound) {
		t.Errorf("Decrypt under a removed version: got %v, want ErrKeyNotFound", err)
	}
	if err := p.Check(ctx); err != nil {
		t.Errorf("Check with the primary intact: %v", err)
	}

	// The primary removed.
	destroy(t, tok, "k8s-kek-2")
	if _, err := p.Encrypt(ctx, seed); !errors.Is(err, providers.ErrKeyNotFound) {
		t.Errorf("Encrypt after the primary was removed: got %v, want ErrKeyNotFound", err)
	}
	if err := p.Check(ctx); !errors.Is(err, providers.ErrKeyNotFound) || !strings.Contains(err.Error(), "k8s-kek-2") {
		t.Errorf("Check after the primary was removed: got %v, want ErrKeyNotFound naming k8s-kek-2", err)
	}
	if err := p.Refresh(ctx); !errors.Is(err, providers.ErrKeyNotFound) {
		t.Errorf("Refresh after the primary was removed: got %v, want ErrKeyNotFound", err)
	}

	// A new version gets a fresh number although the highest object is gone.
	v3, err := p.CreateVersion(ctx)
	if err == nil {
		t.Fatalf("CreateVersion with the primary missing succeeded (%s); the state must be repaired first", v3.KeyID)
	}
}

func TestNumbersNeverReused(t *testing.T) {
	p, cfg := newInitialized(t)
	ctx := testCtx(t)
	v2, err := p.CreateVersion(ctx)
	if err != nil {
		t.Fatal(err)
	}
	destroy(t, rawToken(t, cfg), "k8s-kek-2")
	v3, err := p.CreateVersion(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if v3.KeyID == v2.KeyID || !strings.HasSuffix(v3.KeyID, "/k8s-kek-3") {
		t.Fatalf("after removing %s, CreateVersion made %s, want k8s-kek-3", v2.KeyID, v3.KeyID)
	}
	vs, err := p.Versions(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, v := range vs {
		got = append(got, string(v.State)+" "+v.KeyID[strings.LastIndex(v.KeyID, "/")+1:])
	}
	if want := []string{"primary k8s-kek-1", "enabled k8s-kek-3"}; strings.Join(got, ",") != strings.Join(want, ",") {
		t.Fatalf("Versions = %v, want %v", got, want)
	}
}

// TestRecoversLostSessions closes every session of the application behind
// the pool's back, which also logs it out; the next calls must reopen and
// log in again by themselves.
func TestRecoversLostSessions(t *testing.T) {
	p, _ := newInitialized(t)
	ctx := testCtx(t)
	seed := providertest.Seed(t)
	s, err := p.Encrypt(ctx, seed)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		p.tok.mu.Lock()
		slot := p.tok.slot
		p.tok.mu.Unlock()
		if err := p.tok.mod.ctx.CloseAllSessions(slot); err != nil {
			t.Fatal(err)
		}
		if got, err := p.Decrypt(ctx, s); err != nil || !bytes.Equal(got, seed) {
			t.Fatalf("round %d: Decrypt after all sessions were closed: %v", i, err)
		}
		if err := p.Check(ctx); err != nil {
			t.Fatalf("round %d: Check after all sessions were closed: %v", i, err)
		}
		if _, err := p.Encrypt(ctx, seed); err != nil {
			t.Fatalf("round %d: Encrypt after all sessions were closed: %v", i, err)
		}
	}
}

func TestClosedProviderFails(t *testing.T) {
	p, _ := newInitialized(t)
	p.Close()
	if _, err := p.Encrypt(testCtx(t), providertest.Seed(t)); !errors.Is(err, providers.ErrUnavailable) {
		t.Fatalf("Encrypt after Close: got %v, want ErrUnavailable", err)
	}
	if err := p.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}

// TestPINChangedUnderRunningProvider changes the user PIN and drops every
// session, so the provider must log in again with a PIN that is now wrong:
// calls and Check fail with ErrPermissionDenied, and the provider stops
// trying (a real HSM would lock the user after a few attempts).
func TestPINChangedUnderRunningProvider(t *testing.T) {
	p, cfg := newInitialized(t)
	ctx := testCtx(t)
	s, err := p.Encrypt(ctx, providertest.Seed(t))
	if err != nil {
		t.Fatal(err)
	}
	tok := rawToken(t, cfg)
	err = tok.doRW(ctx, func(h pkcs11.SessionHandle) error {
		return tok.mod.ctx.SetPIN(h, tok.pin, "a-new-pin-1234")
	})
	if err != nil {
		t.Fatalf("C_SetPIN: %v", err)
	}
	p.tok.mu.Lock()
	slot := p.tok.slot
	p.tok.mu.Unlock()
	if err := p.tok.mod.ctx.CloseAllSessions(slot); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Decrypt(ctx, s); !errors.Is(err, providers.ErrPermissionDenied) {
		t.Fatalf("Decrypt after the PIN changed: got %v, want ErrPermissionDenied", err)
	}
	err = p.Check(ctx)
	if !errors.Is(err, providers.ErrPermissionDenied) || !strings.Contains(err.Error(), "not retrying") {
		t.Fatalf("Check after the PIN changed: got %v, want ErrPermissionDenied saying it does not retry", err)
	}
	if strings.Contains(err.Error(), tok.pin) || strings.Contains(err.Error(), "a-new-pin-1234") {
		t.Fatalf("error %q contains a PIN", err)
	}
}
