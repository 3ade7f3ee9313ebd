package azurekv

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/to"
	"github.com/Azure/azure-sdk-for-go/sdk/security/keyvault/azkeys"
	"sigs.k8s.io/yaml"

	"github.com/kms-v2/kms-plugin/e2e/keyvault-emulator/emulator"
	"github.com/kms-v2/kms-plugin/internal/fipstest"
	"github.com/kms-v2/kms-plugin/providers"
)

func validConfig() Config {
	return Config{
		VaultURL: "https://myvault.vault.azure.net/",
		KeyName:  "k8s-kek",
		Auth:     Auth{Mode: AuthWorkloadIdentity},
	}
}

func TestValidate(t *testing.T) {
	cases := []struct {
		name    string
		mutate  func(c *Config)
		wantErr string // substring naming the field; "" = valid
	}{
		{"Minimal", func(c *Config) {}, ""},
		{"AllFields", func(c *Config) {
			c.KeyVersion = "0123456789abcdef0123456789abcdef"
			c.Algorithm, c.KeyType, c.KeySize = "RSA-OAEP", "RSA-HSM", 4096
			c.Auth = Auth{Mode: AuthClientSecret, TenantID: "t", ClientID: "c", ClientSecretFile: "/s", AuthorityHost: "https://login.microsoftonline.us/"}
			c.UnwrapCache = &UnwrapCache{Size: 10, TTL: Duration(time.Minute)}
		}, ""},
		{"CacheOff", func(c *Config) { c.UnwrapCache = &UnwrapCache{Size: 0} }, ""},
		{"MissingVaultURL", func(c *Config) { c.VaultURL = "" }, "vaultURL: missing"},
		{"HTTPVault", func(c *Config) { c.VaultURL = "http://myvault.vault.azure.net/" }, "vaultURL"},
		{"VaultWithPath", func(c *Config) { c.VaultURL = "https://myvault.vault.azure.net/keys/x" }, "vaultURL"},
		{"MissingKeyName", func(c *Config) { c.KeyName = "" }, "keyName"},
		{"BadKeyName", func(c *Config) { c.KeyName = "k8s_kek" }, "keyName"},
		{"BadKeyVersion", func(c *Config) { c.KeyVersion = "../x" }, "keyVersion"},
		{"DeterministicAlgorithm", func(c *Config) { c.Algorithm = "A256KW" }, "algorithm"},
		{"RSA15", func(c *Config) { c.Algorithm = "RSA1_5" }, "algorithm"},
		{"ECKey", func(c *Config) { c.KeyType = "EC" }, "keyType"},
		{"OddKeySize", func(c *Config) { c.KeySize = 1024 }, "keySize"},
		{"NegativeCache", func(c *Config) { c.UnwrapCache = &UnwrapCache{Size: -1} }, "unwrapCache.size"},
		{"LongCacheTTL", func(c *Config) { c.UnwrapCache = &UnwrapCache{Size: 1, TTL: Duration(2 * time.Hour)} }, "unwrapCache.ttl"},
		{"MissingMode", func(c *Config) { c.Auth.Mode = "" }, "auth.mode: missing"},
		{"UnknownMode", func(c *Config) { c.Auth.Mode = "password" }, "auth.mode"},
		{"SecretWithoutFile", func(c *Config) { c.Auth = Auth{Mode: AuthClientSecret, TenantID: "t", ClientID: "c"} }, "auth.clientSecretFile"},
		{"SecretWithoutTenant", func(c *Config) { c.Auth = Auth{Mode: AuthClientSecret, ClientID: "c", ClientSecretFile: "/s"} }, "auth.tenantID"},
		{"CertWithoutFile", func(c *Config) { c.Auth = Auth{Mode: AuthClientCertificate, TenantID: "t", ClientID: "c"} }, "auth.clientCertificateFile"},
		{"SecretFileInWrongMode", func(c *Config) { c.Auth.ClientSecretFile = "/s" }, "auth.clientSecretFile"},
		{"TokenFileInWrongMode", func(c *Config) { c.Auth = Auth{Mode: AuthManagedIdentity, TokenFile: "/t"} }, "auth.tokenFile"},
		{"HTTPAuthority", func(c *Config) { c.Auth.AuthorityHost = "http://login" }, "auth.authorityHost"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := validConfig()
			tc.mutate(&c)
			err := c.Validate()
			switch {
			case tc.wantErr == "" && err != nil:
				t.Fatalf("Validate: got %v, want nil", err)
			case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
				t.Fatalf("Validate: got %v, want an error naming %q", err, tc.wantErr)
			case err != nil && strings.Contains(err.Error(), "\n"):
				t.Fatalf("Validate: error spans lines: %q", err)
			}
		})
	}
}

func TestConfigYAML(t *testing.T) {
	in := `
vaultURL: https://myvault.vault.azure.net/
keyName: k8s-kek
caFile: ca.pem
unwrapCache: {size: 50, ttl: 90s}
auth:
  mode: clientSecret
  tenantID: t
  clientID: c
  clientSecretFile: secret
`
	var c Config
	if err := yaml.UnmarshalStrict([]byte(in), &c); err != nil {
		t.Fatal(err)
	}
	c.ResolvePaths("/etc/kms-plugin")
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	if got, want := c.Auth.ClientSecretFile, "/etc/kms-plugin/secret"; got != want {
		t.Errorf("clientSecretFile = %q, want %q", got, want)
	}
	if got, want := c.CAFile, "/etc/kms-plugin/ca.pem"; got != want {
		t.Errorf("caFile = %q, want %q", got, want)
	}
	if got, want := time.Duration(c.UnwrapCache.TTL), 90*time.Second; c.UnwrapCache.Size != 50 || got != want {
		t.Errorf("unwrapCache = %+v, want size 50 ttl %s", c.UnwrapCache, want)
	}
	if err := yaml.UnmarshalStrict([]byte("unwrapCache: {ttl: soon}"), &c); err == nil {
		t.Error("a bad duration parsed")
	}
}

// props builds a listed version for newState tests.
func props(id string, created int64, enabled bool, tags map[string]string) *azkeys.KeyProperties {
	kid := azkeys.ID("https://v.vault.azure.net:443/keys/k/" + id)
	p := &azkeys.KeyProperties{KID: &kid, Attributes: &azkeys.KeyAttributes{
		Enabled: to.Ptr(enabled), Created: to.Ptr(time.Unix(created, 0)),
	}, Tags: map[string]*string{}}
	for k, v := range tags {
		p.Tags[k] = to.Ptr(v)
	}
	return p
}

func TestPrimarySelection(t *testing.T) {
	tag := func(id string) map[string]string { return map[string]string{PrimaryTag: id} }
	future := time.Now().Add(time.Hour)
	notYet := props("nbf", 50, true, nil)
	notYet.Attributes.NotBefore = &future
	cases := []struct {
		name   string
		pinned string
		list   []*azkeys.KeyProperties
		want   string // version; "" = none
	}{
		{"NewestEnabled", "", []*azkeys.KeyProperties{props("a", 1, true, nil), props("b", 2, true, nil), props("c", 3, false, nil)}, "b"},
		{"ListOrderDoesNotMatter", "", []*azkeys.KeyProperties{props("b", 2, true, nil), props("a", 1, true, nil)}, "b"},
		{"SameSecondTieBreaksOnID", "", []*azkeys.KeyProperties{props("b", 1, true, nil), props("a", 1, true, nil)}, "b"},
		{"TagWins", "", []*azkeys.KeyProperties{props("a", 1, true, tag("a")), props("b", 2, true, nil)}, "a"},
		{"CopiedTagDoesNotCount", "", []*azkeys.KeyProperties{props("a", 1, true, tag("a")), props("b", 2, true, tag("a"))}, "a"},
		{"TwoTaggedNewestWins", "", []*azkeys.KeyProperties{props("a", 1, true, tag("a")), props("b", 2, true, tag("b")), props("c", 3, true, nil)}, "b"},
		{"DisabledTaggedFallsBack", "", []*azkeys.KeyProperties{props("a", 1, true, nil), props("b", 2, false, tag("b"))}, "a"},
		{"Pinned", "a", []*azkeys.KeyProperties{props("a", 1, true, nil), props("b", 2, true, tag("b"))}, "a"},
		{"PinnedDisabled", "a", []*azkeys.KeyProperties{props("a", 1, false, nil), props("b", 2, true, nil)}, ""},
		{"PinnedMissing", "z", []*azkeys.KeyProperties{props("a", 1, true, nil)}, ""},
		{"NotYetValidSkipped", "", []*azkeys.KeyProperties{props("a", 1, true, nil), notYet}, "a"},
		{"AllDisabled", "", []*azkeys.KeyProperties{props("a", 1, false, nil)}, ""},
		{"Empty", "", nil, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			st := newState("v.vault.azure.net", "k", tc.pinned, tc.list, time.Now())
			got := ""
			if st.primary != nil {
				got = st.primary.id
				if want := "azurekv:v.vault.azure.net/k/" + got; st.primary.keyID != want {
					t.Errorf("key_id = %q, want %q", st.primary.keyID, want)
				}
			}
			if got != tc.want {
				t.Fatalf("primary = %q, want %q (reason %q)", got, tc.want, st.reason)
			}
			if got == "" && st.reason == "" {
				t.Fatal("no primary and no reason")
			}
		})
	}
}

func TestClassify(t *testing.T) {
	resp := func(status int, body string) error {
		r := &http.Response{StatusCode: status, Status: http.StatusText(status), Header: http.Header{},
			Body: http.NoBody, Request: &http.Request{Method: "POST"}}
		r.Body = nopBody(body)
		return &azcore.ResponseError{StatusCode: status, RawResponse: r}
	}
	cases := []struct {
		name string
		op   op
		err  error
		want error
	}{
		{"BadCiphertext", opUnwrap, resp(400, `{"error":{"code":"BadParameter","message":"The parameter is incorrect."}}`), providers.ErrInvalidCiphertext},
		{"BadRequest", opWrap, resp(400, `{"error":{"code":"BadParameter"}}`), providers.ErrInvalidInput},
		{"Unauthorized", opGet, resp(401, ``), providers.ErrPermissionDenied},
		{"Forbidden", opUnwrap, resp(403, `{"error":{"code":"Forbidden","message":"Access denied"}}`), providers.ErrPermissionDenied},
		{"ForbiddenByRbac", opCreate, resp(403, `{"error":{"code":"Forbidden","message":"Caller is not authorized to perform action on resource.\r\nAction: 'Microsoft.KeyVault/vaults/keys/create/action'\r\n","innererror":{"code":"ForbiddenByRbac"}}}`), providers.ErrPermissionDenied},
		{"Disabled", opUnwrap, resp(403, `{"error":{"code":"Forbidden","message":"x","innererror":{"code":"KeyDisabled"}}}`), providers.ErrKeyDisabled},
		{"NotFound", opGet, resp(404, `{"error":{"code":"KeyNotFound"}}`), providers.ErrKeyNotFound},
		{"Throttled", opUnwrap, resp(429, ``), providers.ErrUnavailable},
		{"ServerError", opUnwrap, resp(500, ``), providers.ErrUnavailable},
		{"Unavailable", opWrap, resp(503, ``), providers.ErrUnavailable},
		{"Transport", opWrap, errors.New("dial tcp: connection refused"), providers.ErrUnavailable},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got := classify(tc.op, "k/v", tc.err)
			if !errors.Is(got, tc.want) {
				t.Fatalf("classify = %v, want %v", got, tc.want)
			}
			if strings.Contains(got.Error(), "\n") {
				t.Fatalf("classify error spans lines: %q", got)
			}
		})
	}
}

// TestClassifyForbiddenByRbac: a role that lacks an operation yields one
// line that names the refused data action and the roles each side needs,
// so `kmsctl keys create` run with the plugin's identity says what to do.
func TestClassifyForbiddenByRbac(t *testing.T) {
	body := `{"error":{"code":"Forbidden","message":"Caller is not authorized to perform action on resource.\r\nIf role assignments changed recently, please observe propagation time.\r\nCaller: appid=p\r\nAction: 'Microsoft.KeyVault/vaults/keys/update/action'\r\n","innererror":{"code":"ForbiddenByRbac"}}}`
	r := &http.Response{StatusCode: 403, Status: "Forbidden", Header: http.Header{}, Body: nopBody(body), Request: &http.Request{Method: "PATCH"}}
	got := classify(opUpdate, "k/v", &azcore.ResponseError{StatusCode: 403, RawResponse: r}).Error()
	for _, want := range []string{"HTTP 403 Forbidden", "does not grant Microsoft.KeyVault/vaults/keys/update/action", "Key Vault Crypto Officer", "Key Vault Crypto Service Encryption User"} {
		if !strings.Contains(got, want) {
			t.Errorf("classify = %q, want it to contain %q", got, want)
		}
	}
	if strings.ContainsAny(got, "\r\n") {
		t.Errorf("classify error spans lines: %q", got)
	}
	noResp := classify(opUpdate, "k/v", &azcore.ResponseError{StatusCode: 403})
	if !errors.Is(noResp, providers.ErrPermissionDenied) {
		t.Errorf("403 without a response: %v, want ErrPermissionDenied", noResp)
	}
}

type stringBody struct{ *strings.Reader }

func (stringBody) Close() error { return nil }

func nopBody(s string) stringBody { return stringBody{strings.NewReader(s)} }

func TestBreaker(t *testing.T) {
	now := time.Unix(1000, 0)
	b := newBreaker(nil)
	b.now = func() time.Time { return now }
	fail := fmt.Errorf("x: %w", providers.ErrUnavailable)
	for i := 0; i < b.threshold; i++ {
		done, err := b.allow()
		if err != nil {
			t.Fatalf("call %d refused before the threshold: %v", i, err)
		}
		done(fail)
	}
	if _, err := b.allow(); !errors.Is(err, providers.ErrUnavailable) {
		t.Fatalf("after %d failures: got %v, want the breaker open (ErrUnavailable)", b.threshold, err)
	}
	now = now.Add(b.minOpen)
	probe, err := b.allow()
	if err != nil {
		t.Fatalf("after the open period: got %v, want a probe", err)
	}
	if _, err := b.allow(); err == nil {
		t.Fatal("a second call went out while the probe is in flight")
	}
	probe(nil)
	if done, err := b.allow(); err != nil {
		t.Fatalf("after a good probe: got %v, want closed", err)
	} else {
		done(fmt.Errorf("bad ciphertext: %w", providers.ErrInvalidCiphertext))
	}
	if _, err := b.allow(); err != nil {
		t.Fatalf("a bad-input answer opened the breaker: %v", err)
	}
}

// More versions than one list page: the pager follows nextLink.
func TestManyVersionsArePaged(t *testing.T) {
	e := startEmulator(t, emulator.Options{KeySize: fipstest.RSABits(1024)})
	for i := 0; i < 30; i++ {
		if _, err := e.CreateKey(testKey, emulator.KeyOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	cfg := testConfig(t, e)
	p, err := New(ctxT(t), cfg, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	vs, err := p.Versions(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	if len(vs) != 30 || vs[29].State != providers.StatePrimary {
		t.Fatalf("Versions: %d versions, last %+v; want 30 with the newest primary", len(vs), vs[len(vs)-1])
	}
}

// Callers giving up are not a vault outage.
func TestBreakerIgnoresCancellation(t *testing.T) {
	b := newBreaker(nil)
	for i := 0; i < 2*b.threshold; i++ {
		done, err := b.allow()
		if err != nil {
			t.Fatalf("call %d refused: %v", i, err)
		}
		done(classify(opUnwrap, "k/v", context.Canceled))
	}
}

// TestBreakerState: the state metrics report follows the breaker through
// closed, open (failing fast), half open (probe out) and closed again.
func TestBreakerState(t *testing.T) {
	now := time.Unix(1000, 0)
	b := newBreaker(nil)
	b.now = func() time.Time { return now }
	expect := func(step string, want providers.BreakerState) {
		t.Helper()
		if got := b.state(); got != want {
			t.Errorf("%s: state %q, want %q", step, got, want)
		}
	}
	expect("new", providers.BreakerClosed)
	for range b.threshold {
		done, _ := b.allow()
		done(fmt.Errorf("x: %w", providers.ErrUnavailable))
	}
	expect("after threshold failures", providers.BreakerOpen)
	now = now.Add(b.minOpen)
	expect("open period over, no probe yet", providers.BreakerOpen)
	probe, err := b.allow()
	if err != nil {
		t.Fatal(err)
	}
	expect("probe out", providers.BreakerHalfOpen)
	probe(nil)
	expect("after a good probe", providers.BreakerClosed)
}
