//go:build cgo

package pkcs11

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"errors"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/pkcs11"

	"github.com/kms-v2/kms-plugin/plugin/plugintest"
	"github.com/kms-v2/kms-plugin/providers"
	"github.com/kms-v2/kms-plugin/providers/pkcs11/tpmtest"
	"github.com/kms-v2/kms-plugin/providers/providertest"
)

// The RSA-OAEP-256 mode against a TPM 2.0 (swtpm behind tpm2-abrmd, as a
// PKCS#11 token through tpm2-pkcs11), the token the mode exists for.
// SoftHSM2 2.6 cannot stand in: its RSA-OAEP takes SHA-1 only.
//
// The TPM tests live in this package, next to the SoftHSM2 ones, because
// one process can use both modules one after the other: the module
// registry finalizes and unloads a library when its last provider closes,
// so the next test's C_Initialize reads the new token's environment. They
// cannot run in parallel with each other (t.Setenv), which tests of this
// package never do. One TPM serves every subtest of TestTPM, each subtest
// on its own key label, because starting one takes seconds.

// tpmConfig is an RSA-OAEP-256 config for keyLabel on tp. 2048-bit keys:
// what every TPM 2.0 makes, and the fastest on swtpm.
func tpmConfig(tp tpmtest.TPM, keyLabel string) Config {
	return Config{Module: tp.Module, TokenLabel: tp.Label, PinFile: tp.PinFile, KeyLabel: keyLabel, Algorithm: AlgorithmRSAOAEP, KeySize: 2048}
}

// tpmLabels numbers the key labels of one TPM's subtests.
type tpmLabels struct {
	tp tpmtest.TPM
	n  atomic.Int64
}

// fresh returns a provider on a new key label holding one version.
func (l *tpmLabels) fresh(t testing.TB) (*Provider, Config) {
	t.Helper()
	cfg := tpmConfig(l.tp, "kek"+strconv.FormatInt(l.n.Add(1), 10))
	start := time.Now()
	if _, err := Init(testCtx(t), cfg, testLogger(t)); err != nil {
		t.Fatalf("Init: %v", err)
	}
	t.Logf("Init with a %d-bit key pair: %s", cfg.KeySize, time.Since(start).Round(time.Millisecond))
	return mustNew(t, cfg), cfg
}

// counting makes p's token unwraps countable.
func counting(p *Provider) *atomic.Int64 {
	var calls atomic.Int64
	unwrap := p.unwrap
	p.unwrap = func(ctx context.Context, v *version, ct []byte) ([]byte, error) {
		calls.Add(1)
		return unwrap(ctx, v, ct)
	}
	return &calls
}

func TestTPM(t *testing.T) {
	tp := tpmtest.Start(t, "")
	tp.SetEnv(t)
	labels := &tpmLabels{tp: tp}
	for _, c := range []struct {
		name string
		run  func(t *testing.T, l *tpmLabels)
	}{
		{"Conformance", tpmConformance},
		{"PluginContract", tpmContract},
		{"KeyPairAttributes", tpmKeyPairAttributes},
		{"KeyPairWithoutQuirksTable", tpmWithoutQuirks},
		{"CiphertextOfAnotherVersion", tpmOtherVersion},
		{"IdenticalDecryptsShareOneUnwrap", tpmCoalescing},
		{"DisabledVersionNotServedFromCache", tpmDisabledCached},
		{"FailedUnwrapsSpoilNoSession", tpmFailedUnwraps},
		{"OtherProcessRotates", tpmOtherProcess},
		{"StoreLockedByAnotherProcess", tpmStoreLocked},
	} {
		t.Run(c.name, func(t *testing.T) { c.run(t, labels) })
	}
}

func tpmConformance(t *testing.T, l *tpmLabels) {
	providertest.Run(t, func(t *testing.T) providers.Provider {
		p, _ := l.fresh(t)
		return p
	})
}

func tpmContract(t *testing.T, l *tpmLabels) {
	p, _ := l.fresh(t)
	plugintest.Contract(t, p)
}

// tpmKeyPairAttributes reads a version back: the private key must be held
// by the token, restricted to RSA-OAEP, and the ciphertext framed as
// documented.
func tpmKeyPairAttributes(t *testing.T, l *tpmLabels) {
	p, _ := l.fresh(t)
	st, _ := p.current()
	var attrs []*pkcs11.Attribute
	var signErr error
	err := p.tok.do(testCtx(t), func(h pkcs11.SessionHandle) error {
		var err error
		attrs, err = p.tok.mod.ctx.GetAttributeValue(h, st.primary.handle, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, nil),
			pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, nil),
			pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, nil),
			pkcs11.NewAttribute(pkcs11.CKA_ALWAYS_SENSITIVE, nil),
			pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, nil),
			pkcs11.NewAttribute(pkcs11.CKA_NEVER_EXTRACTABLE, nil),
			pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, nil),
			pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, nil),
			pkcs11.NewAttribute(pkcs11.CKA_ALLOWED_MECHANISMS, nil),
		})
		if err != nil {
			return err
		}
		signErr = p.tok.mod.ctx.SignInit(h, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_SHA256_RSA_PKCS, nil)}, st.primary.handle)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for i, c := range []struct {
		name string
		want bool
	}{
		{"CKA_TOKEN", true}, {"CKA_PRIVATE", true}, {"CKA_SENSITIVE", true}, {"CKA_ALWAYS_SENSITIVE", true},
		{"CKA_EXTRACTABLE", false}, {"CKA_NEVER_EXTRACTABLE", true}, {"CKA_DECRYPT", true}, {"CKA_UNWRAP", false},
	} {
		if got := boolAttr(attrs[i]); got != c.want {
			t.Errorf("%s = %v, want %v", c.name, got, c.want)
		}
	}
	if got := ulongAttr(&pkcs11.Attribute{Value: attrs[8].Value}); len(attrs[8].Value) != strconv.IntSize/8 || got != pkcs11.CKM_RSA_PKCS_OAEP {
		t.Errorf("CKA_ALLOWED_MECHANISMS = %x, want CKM_RSA_PKCS_OAEP only", attrs[8].Value)
	}
	if signErr == nil {
		t.Error("C_SignInit with the key accepted, want it refused (the key may only decrypt with RSA-OAEP)")
	}
	s, err := p.Encrypt(testCtx(t), providertest.Seed(t))
	if err != nil {
		t.Fatal(err)
	}
	if got, want := len(s.Ciphertext), 1+256; got != want || s.Ciphertext[0] != formatRSA {
		t.Errorf("ciphertext: %d bytes, format %d; want %d bytes, format %d", got, s.Ciphertext[0], want, formatRSA)
	}
}

// tpmWithoutQuirks creates a version as for a library missing from
// knownQuirks: the template asking for CKA_SIGN false is refused, and the
// second one without it must still make a working version.
func tpmWithoutQuirks(t *testing.T, l *tpmLabels) {
	p, _ := l.fresh(t)
	p.tok.mod.use.Lock()
	p.tok.mod.signingRSAKeys = false
	p.tok.mod.use.Unlock()
	t.Cleanup(func() {
		p.tok.mod.use.Lock()
		p.tok.mod.signingRSAKeys = true
		p.tok.mod.use.Unlock()
	})
	ctx := testCtx(t)
	v, err := p.CreateVersion(ctx)
	if err != nil {
		t.Fatalf("CreateVersion after a refused template: %v", err)
	}
	if err := p.Promote(ctx, v.KeyID); err != nil {
		t.Fatal(err)
	}
	seed := providertest.Seed(t)
	s, err := p.Encrypt(ctx, seed)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := p.Decrypt(ctx, s); err != nil || !bytes.Equal(got, seed) || s.KeyID != v.KeyID {
		t.Fatalf("round trip with %s (made by the second template): %v", v.KeyID, err)
	}
}

// tpmOtherVersion presents version 1's ciphertext under version 2's key_id,
// both versions of the same size, and a ciphertext made with the right
// public key but framed for the AES format: both must fail.
func tpmOtherVersion(t *testing.T, l *tpmLabels) {
	p, _ := l.fresh(t)
	ctx := testCtx(t)
	s1, err := p.Encrypt(ctx, providertest.Seed(t))
	if err != nil {
		t.Fatal(err)
	}
	v2, err := p.CreateVersion(ctx)
	if err != nil {
		t.Fatal(err)
	}
	moved := providers.Sealed{KeyID: v2.KeyID, Ciphertext: s1.Ciphertext}
	if _, err := p.Decrypt(ctx, moved); !errors.Is(err, providers.ErrInvalidCiphertext) {
		t.Errorf("version 1's ciphertext under %s: got %v, want ErrInvalidCiphertext", v2.KeyID, err)
	}
	aesFramed := providers.Sealed{KeyID: s1.KeyID, Ciphertext: append([]byte{formatV1}, s1.Ciphertext[1:]...)}
	if _, err := p.Decrypt(ctx, aesFramed); !errors.Is(err, providers.ErrInvalidCiphertext) {
		t.Errorf("ciphertext with the AES format byte: got %v, want ErrInvalidCiphertext", err)
	}
}

// tpmCoalescing decrypts one ciphertext from 50 goroutines at once: one
// token unwrap serves them all, and the cache serves later reads.
func tpmCoalescing(t *testing.T, l *tpmLabels) {
	p, _ := l.fresh(t)
	ctx := testCtx(t)
	seed := providertest.Seed(t)
	s, err := p.Encrypt(ctx, seed)
	if err != nil {
		t.Fatal(err)
	}
	calls := counting(p)
	// Hold the first unwrap until every caller has had time to ask.
	gate := make(chan struct{})
	unwrap := p.unwrap
	p.unwrap = func(ctx context.Context, v *version, ct []byte) ([]byte, error) {
		<-gate
		return unwrap(ctx, v, ct)
	}
	const callers = 50
	var wg sync.WaitGroup
	errs := make(chan error, callers)
	for range callers {
		wg.Go(func() {
			got, err := p.Decrypt(ctx, s)
			if err == nil && !bytes.Equal(got, seed) {
				err = errors.New("wrong seed")
			}
			errs <- err
		})
	}
	time.Sleep(200 * time.Millisecond)
	close(gate)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatalf("concurrent Decrypt: %v", err)
		}
	}
	if got := calls.Load(); got != 1 {
		t.Fatalf("%d concurrent Decrypts of one ciphertext made %d token unwraps, want 1", callers, got)
	}
	for range 10 {
		if _, err := p.Decrypt(ctx, s); err != nil {
			t.Fatal(err)
		}
	}
	if got := calls.Load(); got != 1 {
		t.Fatalf("after 10 more Decrypts: %d token unwraps, want still 1 (cached)", got)
	}
}

// tpmDisabledCached disables a version whose seed is cached: Decrypt must
// refuse it without consulting the cache, and serve it again once enabled.
func tpmDisabledCached(t *testing.T, l *tpmLabels) {
	p, _ := l.fresh(t)
	ctx := testCtx(t)
	seed := providertest.Seed(t)
	s, err := p.Encrypt(ctx, seed)
	if err != nil {
		t.Fatal(err)
	}
	calls := counting(p)
	if _, err := p.Decrypt(ctx, s); err != nil {
		t.Fatal(err)
	}
	v2, err := p.CreateVersion(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Promote(ctx, v2.KeyID); err != nil {
		t.Fatal(err)
	}
	if err := p.Disable(ctx, s.KeyID); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Decrypt(ctx, s); !errors.Is(err, providers.ErrKeyDisabled) {
		t.Fatalf("Decrypt under a disabled version with its seed cached: got %v, want ErrKeyDisabled", err)
	}
	if err := p.Enable(ctx, s.KeyID); err != nil {
		t.Fatal(err)
	}
	if got, err := p.Decrypt(ctx, s); err != nil || !bytes.Equal(got, seed) {
		t.Fatalf("Decrypt after Enable: %v", err)
	}
	if got := calls.Load(); got != 1 {
		t.Fatalf("token unwraps: %d, want 1 (the first Decrypt; the one after Enable is cached)", got)
	}
}

// tpmFailedUnwraps fails one unwrap on every session of the pool at once.
// tpm2-pkcs11 leaves a failed C_Decrypt active on its session; a pool that
// kept those sessions would fail the next good Decrypt, which takes two
// spoiled sessions in a row and gives up.
func tpmFailedUnwraps(t *testing.T, l *tpmLabels) {
	p, _ := l.fresh(t)
	ctx := testCtx(t)
	st, _ := p.current()
	var wg sync.WaitGroup
	for range DefaultSessions {
		// Below the modulus, so the token is asked, but not a wrapped seed.
		bad := make([]byte, st.primary.pub.Size())
		if _, err := rand.Read(bad[1:]); err != nil {
			t.Fatal(err)
		}
		wg.Go(func() {
			_, err := p.Decrypt(ctx, providers.Sealed{KeyID: st.primary.keyID, Ciphertext: frameRSA(bad)})
			if !errors.Is(err, providers.ErrInvalidCiphertext) {
				t.Errorf("Decrypt of random bytes: got %v, want ErrInvalidCiphertext", err)
			}
		})
	}
	wg.Wait()
	seed := providertest.Seed(t)
	ct, err := rsa.EncryptOAEP(sha256.New(), rand.Reader, st.primary.pub, seed, nil)
	if err != nil {
		t.Fatal(err)
	}
	got, err := p.Decrypt(ctx, providers.Sealed{KeyID: st.primary.keyID, Ciphertext: frameRSA(ct)})
	if err != nil || !bytes.Equal(got, seed) {
		t.Fatalf("Decrypt after %d failed unwraps: %v", DefaultSessions, err)
	}
}

// tpmOtherProcess rotates from another process while this one serves:
// tpm2-pkcs11 shows a process only the objects that existed at its
// C_Initialize, so this one must see the new versions after Refresh all
// the same.
func tpmOtherProcess(t *testing.T, l *tpmLabels) {
	cfg := tpmConfig(l.tp, "k8s-kek")
	if _, err := Init(testCtx(t), cfg, testLogger(t)); err != nil {
		t.Fatal(err)
	}
	otherProcessRotates(t, mustNew(t, cfg), cfg, 3)
}

// tpmStoreLocked: tpm2-pkcs11 keeps its objects in SQLite and sets no busy
// timeout, so a plugin's C_Initialize (every Refresh) and kmsctl's object
// writes fail with CKR_GENERAL_ERROR whenever the other process holds the
// store's lock for a moment. Both must wait such a moment out: writes
// while another process writes (it holds the write lock), and Refresh
// while another process commits (it holds the exclusive lock).
func tpmStoreLocked(t *testing.T, l *tpmLabels) {
	p, _ := l.fresh(t)
	ctx := testCtx(t)
	const held = 400 * time.Millisecond

	release := l.tp.LockStoreWrites(t)
	time.AfterFunc(held, release)
	start := time.Now()
	kv, err := p.CreateVersion(ctx)
	if err != nil {
		t.Fatalf("CreateVersion while another process held the store for %v: %v", held, err)
	}
	t.Logf("CreateVersion waited out the lock: %v", time.Since(start).Round(time.Millisecond))

	release = l.tp.LockStoreWrites(t)
	time.AfterFunc(held, release)
	if err := p.Promote(ctx, kv.KeyID); err != nil {
		t.Fatalf("Promote while another process held the store for %v: %v", held, err)
	}

	release = l.tp.LockStore(t)
	time.AfterFunc(held, release)
	if err := p.Refresh(ctx); err != nil {
		t.Fatalf("Refresh while another process held the store for %v: %v", held, err)
	}
	roundTrip(t, p, p, providertest.Seed(t), kv.KeyID)
}
