// Package providertest is the conformance suite every key provider runs: the
// behaviour package plugin and the rotation orchestrator rely on, checked the
// same way for the file keyset, PKCS#11 and Azure Key Vault backends.
//
// A backend's test calls Run with a function that returns a fresh provider
// holding exactly one (primary) key version. Lifecycle cases run only when the
// provider implements providers.Rotator.
package providertest

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/kms-v2/kms-plugin/providers"
)

// NewFunc returns a fresh provider with one primary key version, and
// registers its cleanup with t.
type NewFunc func(t *testing.T) providers.Provider

// Run runs every conformance case against providers made by newProvider.
func Run(t *testing.T, newProvider NewFunc) {
	t.Helper()
	cases := []struct {
		name     string
		rotation bool
		run      func(t *testing.T, p providers.Provider)
	}{
		{"RoundTrip", false, testRoundTrip},
		{"NonDeterministic", false, testNonDeterministic},
		{"PrimaryKeyIDMatchesEncrypt", false, testPrimaryMatchesEncrypt},
		{"SizeLimits", false, testSizeLimits},
		{"UnknownKeyID", false, testUnknownKeyID},
		{"TamperedCiphertext", false, testTampered},
		{"OwnsItsKeyIDs", false, testOwns},
		{"ForeignKeyIDIsRejected", true, testForeignKeyID},
		{"CreatePromoteKeepsOldData", true, testCreatePromote},
		{"PrimaryCannotBeDisabled", true, testPrimaryNotDisabled},
		{"DisabledKeyCannotDecrypt", true, testDisabled},
		{"PromoteRefusesDisabled", true, testPromoteDisabled},
		{"KeyIDsAreNeverReused", true, testNoReuse},
		{"ConcurrentUseDuringPromote", true, testConcurrent},
		{"StatsReportPrimaryCreated", true, testStatsPrimaryCreated},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := newProvider(t)
			if c.rotation {
				if _, ok := p.(providers.Rotator); !ok {
					t.Skip("provider does not implement providers.Rotator")
				}
			}
			c.run(t, p)
		})
	}
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return c
}

// Seed returns a random 32-byte seed like the ones kube-apiserver sends.
func Seed(t testing.TB) []byte {
	b := make([]byte, providers.SeedSize)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

func mustEncrypt(t *testing.T, p providers.Provider, pt []byte) providers.Sealed {
	t.Helper()
	s, err := p.Encrypt(ctx(t), pt)
	if err != nil {
		t.Fatalf("Encrypt: %v", err)
	}
	return s
}

func mustDecrypt(t *testing.T, p providers.Provider, s providers.Sealed, want []byte) {
	t.Helper()
	got, err := p.Decrypt(ctx(t), s)
	if err != nil {
		t.Fatalf("Decrypt(%s): %v", s.KeyID, err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("Decrypt(%s) = %x, want %x", s.KeyID, got, want)
	}
}

func clone(s providers.Sealed) providers.Sealed {
	c := providers.Sealed{KeyID: s.KeyID, Ciphertext: bytes.Clone(s.Ciphertext)}
	if s.Annotations != nil {
		c.Annotations = map[string][]byte{}
		for k, v := range s.Annotations {
			c.Annotations[k] = bytes.Clone(v)
		}
	}
	return c
}

func testRoundTrip(t *testing.T, p providers.Provider) {
	seed := Seed(t)
	s := mustEncrypt(t, p, seed)
	if bytes.Contains(s.Ciphertext, seed) {
		t.Fatal("ciphertext contains the plaintext seed")
	}
	if err := providers.ValidateAnnotations(s.Annotations); err != nil {
		t.Fatalf("Encrypt returned invalid annotations: %v", err)
	}
	mustDecrypt(t, p, s, seed)
	if err := p.Check(ctx(t)); err != nil {
		t.Fatalf("Check on a healthy provider: %v", err)
	}
}

func testNonDeterministic(t *testing.T, p providers.Provider) {
	seed := Seed(t)
	a, b := mustEncrypt(t, p, seed), mustEncrypt(t, p, seed)
	if bytes.Equal(a.Ciphertext, b.Ciphertext) {
		t.Fatal("two encryptions of the same seed gave the same ciphertext; the apiserver's DEK cache needs them to differ")
	}
}

func testPrimaryMatchesEncrypt(t *testing.T, p providers.Provider) {
	want, err := p.PrimaryKeyID(ctx(t))
	if err != nil {
		t.Fatalf("PrimaryKeyID: %v", err)
	}
	if _, err := providers.ParseKeyID(want); err != nil {
		t.Fatalf("PrimaryKeyID returned an invalid key_id: %v", err)
	}
	if got := mustEncrypt(t, p, Seed(t)).KeyID; got != want {
		t.Fatalf("Encrypt stamped key_id %q, PrimaryKeyID says %q", got, want)
	}
}

func testSizeLimits(t *testing.T, p providers.Provider) {
	s := mustEncrypt(t, p, Seed(t))
	if n := len(s.Ciphertext); n == 0 || n > providers.MaxCiphertextSize {
		t.Fatalf("ciphertext is %d bytes, want 1..%d", n, providers.MaxCiphertextSize)
	}
	if n := len(s.KeyID); n == 0 || n > providers.MaxKeyIDSize {
		t.Fatalf("key_id is %d bytes, want 1..%d", n, providers.MaxKeyIDSize)
	}
	for _, n := range []int{0, 31, 33} {
		if _, err := p.Encrypt(ctx(t), make([]byte, n)); !errors.Is(err, providers.ErrInvalidInput) {
			t.Errorf("Encrypt of %d bytes: got %v, want ErrInvalidInput (the apiserver always sends a %d-byte seed)", n, err, providers.SeedSize)
		}
	}
	big := clone(s)
	big.Ciphertext = make([]byte, providers.MaxCiphertextSize+1)
	if _, err := p.Decrypt(ctx(t), big); err == nil {
		t.Error("Decrypt of an oversized ciphertext succeeded")
	}
}

func testUnknownKeyID(t *testing.T, p providers.Provider) {
	s := clone(mustEncrypt(t, p, Seed(t)))
	s.KeyID += "0"
	_, err := p.Decrypt(ctx(t), s)
	if !errors.Is(err, providers.ErrKeyNotFound) && !errors.Is(err, providers.ErrInvalidCiphertext) {
		t.Fatalf("Decrypt with an unknown key_id: got %v, want ErrKeyNotFound", err)
	}
	s.KeyID = "nosuchbackend:x"
	if _, err := p.Decrypt(ctx(t), s); !errors.Is(err, providers.ErrKeyNotFound) {
		t.Fatalf("Decrypt with a foreign backend's key_id: got %v, want ErrKeyNotFound", err)
	}
	s.KeyID = ""
	if _, err := p.Decrypt(ctx(t), s); err == nil {
		t.Fatal("Decrypt with an empty key_id succeeded")
	}
}

func testTampered(t *testing.T, p providers.Provider) {
	s := mustEncrypt(t, p, Seed(t))
	for i := range s.Ciphertext {
		bad := clone(s)
		bad.Ciphertext[i] ^= 0x01
		if _, err := p.Decrypt(ctx(t), bad); !errors.Is(err, providers.ErrInvalidCiphertext) {
			t.Fatalf("Decrypt with byte %d flipped: got %v, want ErrInvalidCiphertext", i, err)
		}
	}
	for _, n := range []int{0, 1, len(s.Ciphertext) - 1} {
		bad := clone(s)
		bad.Ciphertext = bad.Ciphertext[:n]
		if _, err := p.Decrypt(ctx(t), bad); !errors.Is(err, providers.ErrInvalidCiphertext) {
			t.Fatalf("Decrypt truncated to %d bytes: got %v, want ErrInvalidCiphertext", n, err)
		}
	}
	random := clone(s)
	random.Ciphertext = Seed(t)
	if _, err := p.Decrypt(ctx(t), random); !errors.Is(err, providers.ErrInvalidCiphertext) {
		t.Fatalf("Decrypt of random bytes: got %v, want ErrInvalidCiphertext", err)
	}
}

// testOwns checks the answer a plugin serving several providers routes
// Decrypt by: a provider owns its own versions, and owns neither another
// backend's key_id nor one of its own backend made by another instance.
// Every backend's key_id starts its name with the instance (keyset name,
// token label, vault host), so prefixing that names another instance.
func testOwns(t *testing.T, p providers.Provider) {
	primary, err := p.PrimaryKeyID(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	own := []string{primary}
	if r, ok := p.(providers.Rotator); ok {
		v, err := r.CreateVersion(ctx(t))
		if err != nil {
			t.Fatal(err)
		}
		own = append(own, v.KeyID)
	}
	for _, id := range own {
		if !p.Owns(id) {
			t.Errorf("Owns(%q) = false for its own version", id)
		}
	}
	k, err := providers.ParseKeyID(primary)
	if err != nil {
		t.Fatal(err)
	}
	foreign := []string{
		providers.KeyID{Backend: "nosuchbackend", Name: k.Name}.String(),
		providers.KeyID{Backend: k.Backend, Name: "other-" + k.Name}.String(),
		"", "garbage",
	}
	for _, id := range foreign {
		if p.Owns(id) {
			t.Errorf("Owns(%q) = true; the primary is %q", id, primary)
		}
	}
}

func rotator(p providers.Provider) providers.Rotator { return p.(providers.Rotator) }

// newPrimary creates a version and promotes it, returning old and new key_ids.
func newPrimary(t *testing.T, p providers.Provider) (string, string) {
	t.Helper()
	old, err := p.PrimaryKeyID(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	v, err := rotator(p).CreateVersion(ctx(t))
	if err != nil {
		t.Fatalf("CreateVersion: %v", err)
	}
	if v.State != providers.StateEnabled {
		t.Fatalf("CreateVersion made a %s version, want %s (not primary until promoted)", v.State, providers.StateEnabled)
	}
	if cur, _ := p.PrimaryKeyID(ctx(t)); cur != old {
		t.Fatalf("CreateVersion changed the primary from %q to %q", old, cur)
	}
	if err := rotator(p).Promote(ctx(t), v.KeyID); err != nil {
		t.Fatalf("Promote(%s): %v", v.KeyID, err)
	}
	return old, v.KeyID
}

func testForeignKeyID(t *testing.T, p providers.Provider) {
	s := mustEncrypt(t, p, Seed(t))
	v, err := rotator(p).CreateVersion(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	moved := clone(s)
	moved.KeyID = v.KeyID
	if _, err := p.Decrypt(ctx(t), moved); !errors.Is(err, providers.ErrInvalidCiphertext) {
		t.Fatalf("Decrypt of a ciphertext relabelled with another valid key_id: got %v, want ErrInvalidCiphertext", err)
	}
}

func testCreatePromote(t *testing.T, p providers.Provider) {
	seed := Seed(t)
	before := mustEncrypt(t, p, seed)
	old, newID := newPrimary(t, p)
	if old == newID {
		t.Fatal("new version has the old key_id")
	}
	if got, _ := p.PrimaryKeyID(ctx(t)); got != newID {
		t.Fatalf("after Promote, PrimaryKeyID = %q, want %q", got, newID)
	}
	after := mustEncrypt(t, p, seed)
	if after.KeyID != newID {
		t.Fatalf("after Promote, Encrypt stamped %q, want %q", after.KeyID, newID)
	}
	mustDecrypt(t, p, before, seed)
	mustDecrypt(t, p, after, seed)
	vs, err := rotator(p).Versions(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	states := map[string]providers.KeyState{}
	for _, v := range vs {
		states[v.KeyID] = v.State
	}
	if states[old] != providers.StateEnabled || states[newID] != providers.StatePrimary {
		t.Fatalf("Versions after promote: %v; want %s enabled and %s primary", vs, old, newID)
	}
}

func testPrimaryNotDisabled(t *testing.T, p providers.Provider) {
	id, err := p.PrimaryKeyID(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := rotator(p).Disable(ctx(t), id); !errors.Is(err, providers.ErrRefused) {
		t.Fatalf("Disable(primary): got %v, want ErrRefused", err)
	}
	mustDecrypt(t, p, mustEncrypt(t, p, []byte("0123456789abcdef0123456789abcdef")), []byte("0123456789abcdef0123456789abcdef"))
}

func testDisabled(t *testing.T, p providers.Provider) {
	seed := Seed(t)
	s := mustEncrypt(t, p, seed)
	old, _ := newPrimary(t, p)
	if err := rotator(p).Disable(ctx(t), old); err != nil {
		t.Fatalf("Disable(%s): %v", old, err)
	}
	if _, err := p.Decrypt(ctx(t), s); !errors.Is(err, providers.ErrKeyDisabled) {
		t.Fatalf("Decrypt under a disabled key: got %v, want ErrKeyDisabled", err)
	}
	if err := rotator(p).Enable(ctx(t), old); err != nil {
		t.Fatalf("Enable(%s): %v", old, err)
	}
	mustDecrypt(t, p, s, seed)
}

func testPromoteDisabled(t *testing.T, p providers.Provider) {
	v, err := rotator(p).CreateVersion(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := rotator(p).Disable(ctx(t), v.KeyID); err != nil {
		t.Fatalf("Disable(%s): %v", v.KeyID, err)
	}
	if err := rotator(p).Promote(ctx(t), v.KeyID); !errors.Is(err, providers.ErrRefused) {
		t.Fatalf("Promote(disabled): got %v, want ErrRefused", err)
	}
	if err := rotator(p).Promote(ctx(t), "nosuchbackend:x"); err == nil {
		t.Fatal("Promote of an unknown key_id succeeded")
	}
}

func testNoReuse(t *testing.T, p providers.Provider) {
	seen := map[string]bool{}
	first, _ := p.PrimaryKeyID(ctx(t))
	seen[first] = true
	for i := 0; i < 5; i++ {
		v, err := rotator(p).CreateVersion(ctx(t))
		if err != nil {
			t.Fatal(err)
		}
		if seen[v.KeyID] {
			t.Fatalf("CreateVersion reused key_id %q", v.KeyID)
		}
		seen[v.KeyID] = true
	}
}

// testConcurrent encrypts and decrypts from many goroutines while the primary
// changes; every Sealed must decrypt and carry a key_id that was primary at
// some point. Run under -race.
func testConcurrent(t *testing.T, p providers.Provider) {
	var mu sync.Mutex
	valid := map[string]bool{}
	first, _ := p.PrimaryKeyID(ctx(t))
	valid[first] = true
	stop := make(chan struct{})
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				seed := make([]byte, providers.SeedSize)
				_, _ = rand.Read(seed)
				s, err := p.Encrypt(context.Background(), seed)
				if err != nil {
					errs <- err
					return
				}
				got, err := p.Decrypt(context.Background(), s)
				if err != nil || !bytes.Equal(got, seed) {
					errs <- errors.Join(errors.New("round trip during promote failed"), err)
					return
				}
				mu.Lock()
				ok := valid[s.KeyID]
				mu.Unlock()
				if !ok {
					// The key may have been promoted an instant before we
					// recorded it; recheck after the promote below records it.
					time.Sleep(50 * time.Millisecond)
					mu.Lock()
					ok = valid[s.KeyID]
					mu.Unlock()
					if !ok {
						errs <- errors.New("Encrypt stamped a key_id that was never primary: " + s.KeyID)
						return
					}
				}
			}
		}()
	}
	for i := 0; i < 3; i++ {
		v, err := rotator(p).CreateVersion(ctx(t))
		if err != nil {
			t.Fatal(err)
		}
		mu.Lock()
		valid[v.KeyID] = true
		mu.Unlock()
		if err := rotator(p).Promote(ctx(t), v.KeyID); err != nil {
			t.Fatal(err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	close(stop)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// testStatsPrimaryCreated: a provider that reports Stats gives the
// creation time Versions lists for the primary, before and after a
// promote (the plugin exports it as the primary key's age).
func testStatsPrimaryCreated(t *testing.T, p providers.Provider) {
	r, ok := p.(providers.Reporter)
	if !ok {
		t.Skip("provider does not implement providers.Reporter")
	}
	check := func(when string) {
		t.Helper()
		vs, err := rotator(p).Versions(ctx(t))
		if err != nil {
			t.Fatal(err)
		}
		for _, v := range vs {
			if v.State == providers.StatePrimary {
				if got := r.Stats().PrimaryCreated; !got.Equal(v.Created) || got.IsZero() {
					t.Fatalf("%s: Stats().PrimaryCreated = %v, want the primary %s's %v", when, got, v.KeyID, v.Created)
				}
				return
			}
		}
		t.Fatalf("%s: Versions lists no primary: %v", when, vs)
	}
	check("at start")
	newPrimary(t, p)
	if rf, ok := p.(providers.Refresher); ok {
		if err := rf.Refresh(ctx(t)); err != nil {
			t.Fatal(err)
		}
	}
	check("after promote")
}
