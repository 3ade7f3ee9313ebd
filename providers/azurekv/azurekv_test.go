package azurekv

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/kms-v2/kms-plugin/e2e/keyvault-emulator/emulator"
	"github.com/kms-v2/kms-plugin/providers"
	"github.com/kms-v2/kms-plugin/providers/providertest"
)

const (
	testClientID = "kms-plugin-test"
	testSecret   = "s3cret-for-tests"
	testKey      = "k8s-kek"
)

// startEmulator serves a fresh emulator with one registered client.
func startEmulator(t testing.TB, opts emulator.Options) *emulator.Emulator {
	t.Helper()
	if opts.Dir == "" {
		opts.Dir = t.TempDir()
	}
	opts.Clients = map[string]string{testClientID: testSecret}
	e, err := emulator.Start(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Close() })
	return e
}

// testConfig authenticates with a client secret through the emulator's
// Entra endpoints and trusts its CA, as an operator's config would.
func testConfig(t testing.TB, e *emulator.Emulator) Config {
	t.Helper()
	secret := filepath.Join(t.TempDir(), "client-secret")
	if err := os.WriteFile(secret, []byte(testSecret+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return Config{
		VaultURL: e.URL,
		KeyName:  testKey,
		KeySize:  2048,
		CAFile:   e.CAFile,
		Auth: Auth{
			Mode: AuthClientSecret, TenantID: e.TenantID, ClientID: testClientID,
			ClientSecretFile: secret, AuthorityHost: e.URL,
		},
	}
}

func testLogger(t testing.TB) hclog.Logger {
	return hclog.New(&hclog.LoggerOptions{Name: t.Name(), Level: hclog.Warn, Output: os.Stderr})
}

func ctxT(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// newProvider runs Init then New against e.
func newProvider(t testing.TB, e *emulator.Emulator, cfg Config) *Provider {
	t.Helper()
	if _, err := Init(ctxT(t), cfg, testLogger(t)); err != nil {
		t.Fatalf("Init: %v", err)
	}
	p, err := New(ctxT(t), cfg, testLogger(t))
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

func TestConformance(t *testing.T) {
	providertest.Run(t, func(t *testing.T) providers.Provider {
		e := startEmulator(t, emulator.Options{})
		return newProvider(t, e, testConfig(t, e))
	})
}

func TestNewWithoutKeyTellsToInit(t *testing.T) {
	e := startEmulator(t, emulator.Options{})
	_, err := New(ctxT(t), testConfig(t, e), testLogger(t))
	if !errors.Is(err, providers.ErrKeyNotFound) || !strings.Contains(err.Error(), "kmsctl keys init") {
		t.Fatalf("New before init: got %v, want ErrKeyNotFound telling to run `kmsctl keys init`", err)
	}
}

func TestInitTwiceIsRefused(t *testing.T) {
	e := startEmulator(t, emulator.Options{})
	cfg := testConfig(t, e)
	newProvider(t, e, cfg)
	if _, err := Init(ctxT(t), cfg, testLogger(t)); !errors.Is(err, providers.ErrRefused) {
		t.Fatalf("second Init: got %v, want ErrRefused", err)
	}
}

func TestWrongSecretIsPermissionDenied(t *testing.T) {
	e := startEmulator(t, emulator.Options{})
	cfg := testConfig(t, e)
	if err := os.WriteFile(cfg.Auth.ClientSecretFile, []byte("wrong"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := Init(ctxT(t), cfg, testLogger(t))
	if !errors.Is(err, providers.ErrPermissionDenied) {
		t.Fatalf("Init with a wrong secret: got %v, want ErrPermissionDenied", err)
	}
}

// Secret and certificate files are refused, before any call, when other
// local users could read them: the credential in them would be given away.
func TestSecretFilesMustBePrivate(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string, mode os.FileMode) string {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(path, mode); err != nil {
			t.Fatal(err)
		}
		return path
	}
	secret := func(path string) Auth {
		return Auth{Mode: AuthClientSecret, TenantID: "t", ClientID: "c", ClientSecretFile: path}
	}
	cert := func(path string) Auth {
		return Auth{Mode: AuthClientCertificate, TenantID: "t", ClientID: "c", ClientCertificateFile: path}
	}
	cases := []struct {
		name string
		auth Auth
		want []string // in the one-line error
	}{
		{"WorldReadableSecret", secret(write("secret-644", testSecret, 0o644)), []string{"auth.clientSecretFile", "mode 0644", "chmod 600"}},
		{"GroupWritableSecret", secret(write("secret-660", testSecret, 0o660)), []string{"auth.clientSecretFile", "chmod 600"}},
		{"EmptySecret", secret(write("secret-empty", "\n", 0o600)), []string{"auth.clientSecretFile", "empty"}},
		{"WorldReadableCertificate", cert(write("cert-644", "-----BEGIN CERTIFICATE-----", 0o644)), []string{"auth.clientCertificateFile", "chmod 600"}},
		{"PrivateButNotACertificate", cert(write("cert-600", "not pem", 0o600)), []string{"auth.clientCertificateFile", "want PEM"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg := validConfig()
			cfg.VaultURL = "https://127.0.0.1:1/" // never reached: the files are refused first
			cfg.Auth = tc.auth
			_, err := New(ctxT(t), cfg, testLogger(t))
			if err == nil {
				t.Fatal("New succeeded")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("New: got %q, want it to contain %q", err, w)
				}
			}
			if strings.Contains(err.Error(), "\n") || strings.Contains(err.Error(), testSecret) {
				t.Errorf("New: error %q spans lines or shows the secret", err)
			}
		})
	}
}

func TestWorkloadIdentity(t *testing.T) {
	e := startEmulator(t, emulator.Options{})
	tokenFile := filepath.Join(t.TempDir(), "sa-token")
	if err := os.WriteFile(tokenFile, []byte("projected-service-account-token"), 0o600); err != nil {
		t.Fatal(err)
	}
	e.AddFederatedToken("wi-client", "projected-service-account-token")
	cfg := testConfig(t, e)
	cfg.Auth = Auth{Mode: AuthWorkloadIdentity, TenantID: e.TenantID, ClientID: "wi-client", TokenFile: tokenFile, AuthorityHost: e.URL}
	p := newProvider(t, e, cfg)
	seed := providertest.Seed(t)
	s, err := p.Encrypt(ctxT(t), seed)
	if err != nil {
		t.Fatalf("Encrypt: %v", err)
	}
	got, err := p.Decrypt(ctxT(t), s)
	if err != nil || !bytes.Equal(got, seed) {
		t.Fatalf("Decrypt = %x, %v; want the seed", got, err)
	}
}

func TestKeyIDFormat(t *testing.T) {
	e := startEmulator(t, emulator.Options{})
	p := newProvider(t, e, testConfig(t, e))
	id, err := p.PrimaryKeyID(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	vs, _ := p.Versions(ctxT(t))
	want := "azurekv:" + strings.TrimSuffix(strings.TrimPrefix(e.URL, "https://"), "/") + "/" + testKey + "/"
	if !strings.HasPrefix(id, want) || len(vs) != 1 || vs[0].KeyID != id {
		t.Fatalf("key_id = %q (versions %v), want %s<version>", id, vs, want)
	}
}

// A version Key Vault's rotation policy adds (POST rotate) becomes primary
// after Refresh when no tag pins another, and old data keeps decrypting.
func TestRotationPolicyVersionBecomesPrimary(t *testing.T) {
	e := startEmulator(t, emulator.Options{})
	p := newProvider(t, e, testConfig(t, e))
	seed := providertest.Seed(t)
	before, err := p.Encrypt(ctxT(t), seed)
	if err != nil {
		t.Fatal(err)
	}
	kid, err := e.RotateKey(testKey)
	if err != nil {
		t.Fatal(err)
	}
	ver := kid[strings.LastIndex(kid, "/")+1:]
	if got, _ := p.PrimaryKeyID(ctxT(t)); strings.HasSuffix(got, ver) {
		t.Fatalf("primary switched to %s before any refresh", got)
	}
	if err := p.Refresh(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	got, _ := p.PrimaryKeyID(ctxT(t))
	if !strings.HasSuffix(got, "/"+ver) {
		t.Fatalf("after Refresh primary = %q, want the rotated version %s", got, ver)
	}
	after, err := p.Encrypt(ctxT(t), seed)
	if err != nil || after.KeyID != got {
		t.Fatalf("Encrypt after rotation: %v, key_id %q, want %q", err, after.KeyID, got)
	}
	for _, s := range []providers.Sealed{before, after} {
		if pt, err := p.Decrypt(ctxT(t), s); err != nil || !bytes.Equal(pt, seed) {
			t.Fatalf("Decrypt(%s) = %v", s.KeyID, err)
		}
	}
}

// With a tag pinning the primary, a rotation-policy version waits.
func TestTagWinsOverNewest(t *testing.T) {
	e := startEmulator(t, emulator.Options{})
	p := newProvider(t, e, testConfig(t, e))
	v, err := p.CreateVersion(ctxT(t)) // tags the current primary
	if err != nil {
		t.Fatal(err)
	}
	first, _ := p.PrimaryKeyID(ctxT(t))
	if _, err := e.RotateKey(testKey); err != nil {
		t.Fatal(err)
	}
	if err := p.Refresh(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	if got, _ := p.PrimaryKeyID(ctxT(t)); got != first {
		t.Fatalf("primary = %q after rotate with a tag present, want the tagged %q", got, first)
	}
	if err := p.Promote(ctxT(t), v.KeyID); err != nil {
		t.Fatal(err)
	}
	if got, _ := p.PrimaryKeyID(ctxT(t)); got != v.KeyID {
		t.Fatalf("primary = %q after Promote, want %q", got, v.KeyID)
	}
}

// A second instance (a follower) learns of a new version when it first
// sees its key_id, without waiting for its background refresh.
func TestUnknownVersionTriggersOneRefresh(t *testing.T) {
	e := startEmulator(t, emulator.Options{})
	cfg := testConfig(t, e)
	leader := newProvider(t, e, cfg)
	follower, err := New(ctxT(t), cfg, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer follower.Close()
	v, err := leader.CreateVersion(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := leader.Promote(ctxT(t), v.KeyID); err != nil {
		t.Fatal(err)
	}
	seed := providertest.Seed(t)
	s, err := leader.Encrypt(ctxT(t), seed)
	if err != nil {
		t.Fatal(err)
	}
	e.ResetCounts()
	got, err := follower.Decrypt(ctxT(t), s)
	if err != nil || !bytes.Equal(got, seed) {
		t.Fatalf("follower Decrypt of a new version: %v", err)
	}
	if c := e.Counts(); c.List != 1 || c.Unwrap != 1 {
		t.Fatalf("follower made %d list and %d unwrap calls, want 1 and 1", c.List, c.Unwrap)
	}
	if id, _ := follower.PrimaryKeyID(ctxT(t)); id != v.KeyID {
		t.Fatalf("follower primary = %q after its refresh, want %q", id, v.KeyID)
	}
}

func TestPinnedVersion(t *testing.T) {
	e := startEmulator(t, emulator.Options{})
	cfg := testConfig(t, e)
	p := newProvider(t, e, cfg)
	first, _ := p.PrimaryKeyID(ctxT(t))
	if _, err := e.RotateKey(testKey); err != nil {
		t.Fatal(err)
	}
	cfg.KeyVersion = first[strings.LastIndex(first, "/")+1:]
	pinned, err := New(ctxT(t), cfg, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer pinned.Close()
	if got, _ := pinned.PrimaryKeyID(ctxT(t)); got != first {
		t.Fatalf("pinned primary = %q, want %q", got, first)
	}
	vs, _ := pinned.Versions(ctxT(t))
	if err := pinned.Promote(ctxT(t), vs[len(vs)-1].KeyID); !errors.Is(err, providers.ErrRefused) {
		t.Fatalf("Promote with a pinned version: got %v, want ErrRefused", err)
	}
}

// 64 identical concurrent Decrypts make one unwrap call, and a repeat is
// served from the cache.
func TestConcurrentDecryptsCoalesce(t *testing.T) {
	e := startEmulator(t, emulator.Options{})
	p := newProvider(t, e, testConfig(t, e))
	seed := providertest.Seed(t)
	s, err := p.Encrypt(ctxT(t), seed)
	if err != nil {
		t.Fatal(err)
	}
	e.ResetCounts()
	e.SetLatency(100 * time.Millisecond) // keep the first call in flight while the others arrive
	var wg sync.WaitGroup
	start := make(chan struct{})
	errs := make(chan error, 64)
	for i := 0; i < 64; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			got, err := p.Decrypt(context.Background(), s)
			if err == nil && !bytes.Equal(got, seed) {
				err = errors.New("wrong seed")
			}
			if err != nil {
				errs <- err
			}
		}()
	}
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if got := e.Counts().Unwrap; got != 1 {
		t.Fatalf("64 concurrent Decrypts made %d unwrap calls, want 1", got)
	}
	if _, err := p.Decrypt(ctxT(t), s); err != nil {
		t.Fatal(err)
	}
	if got := e.Counts().Unwrap; got != 1 {
		t.Fatalf("a cached Decrypt made another unwrap call: %d in total, want 1", got)
	}
}

// During a 429 storm every call ends within the apiserver's deadline,
// either successfully or with ErrUnavailable; Check reports it; the vault
// sees a bounded number of requests; and service resumes afterwards.
func TestThrottlingStorm(t *testing.T) {
	e := startEmulator(t, emulator.Options{})
	p := newProvider(t, e, testConfig(t, e))
	e.ResetCounts()
	e.Throttle(-1, 300*time.Millisecond)
	const callers, rounds = 16, 5
	var wg sync.WaitGroup
	errs := make(chan error, callers*rounds)
	for i := 0; i < callers; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for r := 0; r < rounds; r++ {
				ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
				start := time.Now()
				_, err := p.Encrypt(ctx, make([]byte, 32))
				cancel()
				if d := time.Since(start); d > 3100*time.Millisecond {
					errs <- errors.New("a call outlived the 3s deadline: " + d.String())
				}
				if err != nil && !errors.Is(err, providers.ErrUnavailable) {
					errs <- err
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if err := p.Check(ctxT(t)); !errors.Is(err, providers.ErrUnavailable) {
		t.Errorf("Check during the storm: got %v, want ErrUnavailable", err)
	}
	// Without the breaker: callers*rounds calls of 3 tries each (240).
	c := e.Counts()
	t.Logf("storm: %d vault requests, %d throttled", c.Requests, c.Throttled)
	if got, most := c.Requests, int64(3*(callers+p.breaker.threshold)); got > most {
		t.Errorf("the storm made %d vault requests, want at most %d", got, most)
	}
	e.Throttle(0, 0)
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := p.Check(ctxT(t))
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("Check after the storm: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if _, err := p.Encrypt(ctxT(t), make([]byte, 32)); err != nil {
		t.Fatalf("Encrypt after the storm: %v", err)
	}
}

// A short burst of 429s is absorbed by the retries.
func TestShortThrottleIsRetried(t *testing.T) {
	e := startEmulator(t, emulator.Options{})
	p := newProvider(t, e, testConfig(t, e))
	e.ResetCounts()
	e.Throttle(2, 50*time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	if _, err := p.Encrypt(ctx, make([]byte, 32)); err != nil {
		t.Fatalf("Encrypt through two 429s: %v", err)
	}
	if c := e.Counts(); c.Throttled != 2 || c.Wrap != 1 {
		t.Fatalf("counts %+v, want 2 throttled and 1 wrap", c)
	}
}

// A vault that answers slowly but within the apiserver's 3 s deadline is
// healthy: no single try is cut short before the caller's own deadline.
func TestSlowVaultStaysHealthy(t *testing.T) {
	e := startEmulator(t, emulator.Options{})
	p := newProvider(t, e, testConfig(t, e))
	e.SetLatency(2900 * time.Millisecond)
	defer e.SetLatency(0)
	// The plugin's check and refresh run under a 5 s timeout.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := p.Check(ctx); err != nil {
		t.Fatalf("Check against a vault answering in 2.9 s: %v", err)
	}
	ctx, cancel = context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := p.Refresh(ctx); err != nil {
		t.Fatalf("Refresh against a vault answering in 2.9 s: %v", err)
	}
}

// During an outage Check fails and cached unwraps are still served.
func TestOutage(t *testing.T) {
	for _, tc := range []struct {
		name   string
		outage emulator.Outage
	}{
		{"503", emulator.OutageUnavailable},
		{"ConnectionReset", emulator.OutageConnReset},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := startEmulator(t, emulator.Options{})
			p := newProvider(t, e, testConfig(t, e))
			seed := providertest.Seed(t)
			s, err := p.Encrypt(ctxT(t), seed)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := p.Decrypt(ctxT(t), s); err != nil {
				t.Fatal(err)
			}
			e.SetOutage(tc.outage)
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
			defer cancel()
			if err := p.Check(ctx); !errors.Is(err, providers.ErrUnavailable) {
				t.Fatalf("Check during outage: got %v, want ErrUnavailable", err)
			}
			got, err := p.Decrypt(ctx, s)
			if err != nil || !bytes.Equal(got, seed) {
				t.Fatalf("cached Decrypt during outage: %v", err)
			}
			if _, err := p.Encrypt(ctx, seed); !errors.Is(err, providers.ErrUnavailable) {
				t.Fatalf("Encrypt during outage: got %v, want ErrUnavailable", err)
			}
			if id, err := p.PrimaryKeyID(ctx); err != nil || id != s.KeyID {
				t.Fatalf("PrimaryKeyID during outage = %q, %v; want the cached %q", id, err, s.KeyID)
			}
		})
	}
}

func TestDisabledVersionIsNotServedFromCache(t *testing.T) {
	e := startEmulator(t, emulator.Options{})
	p := newProvider(t, e, testConfig(t, e))
	seed := providertest.Seed(t)
	s, _ := p.Encrypt(ctxT(t), seed)
	if _, err := p.Decrypt(ctxT(t), s); err != nil {
		t.Fatal(err)
	}
	// Move the primary on, so the old version may be disabled.
	v, err := p.CreateVersion(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Promote(ctxT(t), v.KeyID); err != nil {
		t.Fatal(err)
	}
	// Disabled in the portal, seen at the next refresh.
	if err := e.SetEnabled(testKey, s.KeyID[strings.LastIndex(s.KeyID, "/")+1:], false); err != nil {
		t.Fatal(err)
	}
	if err := p.Refresh(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Decrypt(ctxT(t), s); !errors.Is(err, providers.ErrKeyDisabled) {
		t.Fatalf("Decrypt under a version disabled in the vault: got %v, want ErrKeyDisabled", err)
	}
}

func TestPreflightWarnings(t *testing.T) {
	for _, tc := range []struct {
		name       string
		recovery   string
		exportable bool
		want       []string
	}{
		{"Protected", emulator.RecoveryProtected, false, nil},
		{"Purgeable", emulator.RecoveryPurgeable, false, []string{"purge protection"}},
		{"Exportable", emulator.RecoveryProtected, true, []string{"exportable"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := startEmulator(t, emulator.Options{RecoveryLevel: tc.recovery})
			if _, err := e.CreateKey(testKey, emulator.KeyOptions{Exportable: tc.exportable}); err != nil {
				t.Fatal(err)
			}
			var buf syncBuffer
			p, err := New(ctxT(t), testConfig(t, e), hclog.New(&hclog.LoggerOptions{Output: &buf, Level: hclog.Warn}))
			if err != nil {
				t.Fatal(err)
			}
			defer p.Close()
			got := buf.String()
			for _, w := range tc.want {
				if !strings.Contains(got, w) {
					t.Errorf("log %q lacks a warning about %q", got, w)
				}
			}
			if tc.want == nil && strings.Contains(got, "pre-flight") {
				t.Errorf("unexpected pre-flight warning: %q", got)
			}
		})
	}
}

// The emulator supports RSA-HSM keys and the provider accepts them.
func TestRSAHSMKey(t *testing.T) {
	e := startEmulator(t, emulator.Options{})
	cfg := testConfig(t, e)
	cfg.KeyType = "RSA-HSM"
	p := newProvider(t, e, cfg)
	seed := providertest.Seed(t)
	s, err := p.Encrypt(ctxT(t), seed)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := p.Decrypt(ctxT(t), s); err != nil || !bytes.Equal(got, seed) {
		t.Fatalf("Decrypt: %v", err)
	}
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
