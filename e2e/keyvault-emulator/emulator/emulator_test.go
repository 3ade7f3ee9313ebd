package emulator

import (
	"crypto/tls"
	"encoding/json"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/kms-v2/kms-plugin/internal/fipstest"
)

// The SDK-level behaviour is tested through the real azkeys client in
// providers/azurekv; these cases pin the wire details the SDK depends on.
func TestWire(t *testing.T) {
	dir := t.TempDir()
	e, err := Start(Options{Dir: dir, Clients: map[string]string{"c": "s"}, KeySize: fipstest.RSABits(1024)})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	if b, err := os.ReadFile(e.CAFile); err != nil || !strings.Contains(string(b), "BEGIN CERTIFICATE") {
		t.Fatalf("ca.pem: %v", err)
	}
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: e.CAPool}}}
	do := func(method, path, token string, body io.Reader, form bool) *http.Response {
		t.Helper()
		req, _ := http.NewRequest(method, e.URL+path, body)
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		if form {
			req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		}
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { resp.Body.Close() })
		return resp
	}
	token := func(secret string) (int, string) {
		form := url.Values{"grant_type": {"client_credentials"}, "client_id": {"c"}, "client_secret": {secret},
			"scope": {DefaultResource + "/.default openid"}}
		resp := do("POST", e.TenantID+"/oauth2/v2.0/token", "", strings.NewReader(form.Encode()), true)
		var out struct {
			AccessToken string `json:"access_token"`
		}
		_ = json.NewDecoder(resp.Body).Decode(&out)
		return resp.StatusCode, out.AccessToken
	}

	cases := []struct {
		name string
		run  func(t *testing.T)
	}{
		{"ChallengeWithoutToken", func(t *testing.T) {
			resp := do("GET", "keys/k?api-version=7.5", "", nil, false)
			want := `Bearer authorization="` + e.URL + e.TenantID + `", resource="https://vault.azure.net"`
			if got := resp.Header.Get("WWW-Authenticate"); resp.StatusCode != 401 || got != want {
				t.Fatalf("got %d %q, want 401 %q", resp.StatusCode, got, want)
			}
		}},
		{"WrongSecretRefused", func(t *testing.T) {
			if code, _ := token("nope"); code != http.StatusUnauthorized {
				t.Fatalf("token with a wrong secret: got %d, want 401", code)
			}
		}},
		{"TokenOpensVault", func(t *testing.T) {
			code, tok := token("s")
			if code != 200 || tok == "" {
				t.Fatalf("token: got %d", code)
			}
			if resp := do("GET", "keys/none?api-version=7.5", tok, nil, false); resp.StatusCode != http.StatusNotFound {
				t.Fatalf("get of a missing key with a token: got %d, want 404", resp.StatusCode)
			}
		}},
		{"ThrottleSendsRetryAfter", func(t *testing.T) {
			e.Throttle(1, 1500*time.Millisecond)
			resp := do("GET", "keys/k?api-version=7.5", "", nil, false)
			if resp.StatusCode != 429 || resp.Header.Get("Retry-After") != "2" || resp.Header.Get("retry-after-ms") != "1500" {
				t.Fatalf("got %d Retry-After %q retry-after-ms %q, want 429, 2, 1500", resp.StatusCode,
					resp.Header.Get("Retry-After"), resp.Header.Get("retry-after-ms"))
			}
			if resp := do("GET", "keys/k?api-version=7.5", "", nil, false); resp.StatusCode != 401 {
				t.Fatalf("after the one throttled request: got %d, want 401", resp.StatusCode)
			}
		}},
		{"Outage503", func(t *testing.T) {
			e.SetOutage(OutageUnavailable)
			defer e.SetOutage(OutageNone)
			if resp := do("GET", "keys/k?api-version=7.5", "", nil, false); resp.StatusCode != 503 {
				t.Fatalf("got %d, want 503", resp.StatusCode)
			}
		}},
		{"AccessRevokedThenRestored", func(t *testing.T) {
			_, tok := token("s")
			e.SetAccessRevoked(true)
			defer e.SetAccessRevoked(false)
			resp := do("GET", "keys/none?api-version=7.5", tok, nil, false)
			var out struct {
				Error struct {
					Code       string
					InnerError struct{ Code string }
				}
			}
			_ = json.NewDecoder(resp.Body).Decode(&out)
			if resp.StatusCode != http.StatusForbidden || out.Error.Code != "Forbidden" || out.Error.InnerError.Code != "ForbiddenByRbac" {
				t.Fatalf("revoked: got %d %+v, want 403 Forbidden/ForbiddenByRbac", resp.StatusCode, out)
			}
			// The challenge still comes first: revocation is about the
			// identity, not the token.
			if resp := do("GET", "keys/none?api-version=7.5", "", nil, false); resp.StatusCode != http.StatusUnauthorized {
				t.Fatalf("revoked, no token: got %d, want 401", resp.StatusCode)
			}
			e.SetAccessRevoked(false)
			if resp := do("GET", "keys/none?api-version=7.5", tok, nil, false); resp.StatusCode != http.StatusNotFound {
				t.Fatalf("restored, same token: got %d, want 404", resp.StatusCode)
			}
		}},
		{"RotateKeepsTypeDropsTags", func(t *testing.T) {
			if _, err := e.CreateKey("hsm", KeyOptions{Kty: "RSA-HSM", Tags: map[string]string{"a": "b"}}); err != nil {
				t.Fatal(err)
			}
			kid, err := e.RotateKey("hsm")
			if err != nil {
				t.Fatal(err)
			}
			_, tok := token("s")
			resp := do("GET", "keys/hsm?api-version=7.5", tok, nil, false)
			var out struct {
				Key  struct{ Kid, Kty string }
				Tags map[string]string
			}
			_ = json.NewDecoder(resp.Body).Decode(&out)
			if out.Key.Kid != kid || out.Key.Kty != "RSA-HSM" || len(out.Tags) != 0 {
				t.Fatalf("latest version %+v, want kid %s, RSA-HSM, no tags", out, kid)
			}
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, tc.run)
	}
	if c := e.Counts(); c.Throttled != 1 || c.Tokens < 2 {
		t.Errorf("counts %+v, want 1 throttled and at least 2 tokens", c)
	}
}

// TestRoles pins the per-client roles: a Crypto Service Encryption User
// reads, wraps and unwraps but is refused (403 ForbiddenByRbac, naming the
// data action) everything that creates or changes a version; a Crypto
// Officer, and a client registered without a role, may do everything.
func TestRoles(t *testing.T) {
	e, err := Start(Options{
		Clients: map[string]string{"user": "su", "legacy": "sl"},
		Roles:   map[string]Role{"user": RoleCryptoServiceEncryptionUser},
		KeySize: fipstest.RSABits(1024),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	e.AddClientWithRole("officer", "so", RoleCryptoOfficer)
	kid, err := e.CreateKey("k", KeyOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ver := kid[strings.LastIndex(kid, "/")+1:]
	c := roleClient{t: t, e: e, hc: &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: e.CAPool}}}}
	user, officer, legacy := c.token("user", "su"), c.token("officer", "so"), c.token("legacy", "sl")
	wrapped := c.want(user, "POST", "keys/k/"+ver+"/wrapkey", `{"alg":"RSA-OAEP-256","value":"AAAA"}`, 200)
	var w struct{ Value string }
	_ = json.Unmarshal(wrapped, &w)
	allowed := []struct{ method, path, body string }{
		{"GET", "keys/k", ""},
		{"GET", "keys/k/" + ver, ""},
		{"GET", "keys/k/versions", ""},
		{"POST", "keys/k/" + ver + "/unwrapkey", `{"alg":"RSA-OAEP-256","value":"` + w.Value + `"}`},
	}
	for _, r := range allowed {
		c.want(user, r.method, r.path, r.body, 200)
	}
	refused := []struct{ method, path, body, action string }{
		{"POST", "keys/k/create", `{"kty":"RSA"}`, "Microsoft.KeyVault/vaults/keys/create/action"},
		{"PATCH", "keys/k/" + ver, `{"tags":{"a":"b"}}`, "Microsoft.KeyVault/vaults/keys/update/action"},
		{"POST", "keys/k/rotate", "", "Microsoft.KeyVault/vaults/keys/rotate/action"},
	}
	before := e.Counts()
	for _, r := range refused {
		body := c.want(user, r.method, r.path, r.body, http.StatusForbidden)
		var out struct {
			Error struct {
				Code, Message string
				InnerError    struct{ Code string }
			}
		}
		_ = json.Unmarshal(body, &out)
		if out.Error.Code != "Forbidden" || out.Error.InnerError.Code != "ForbiddenByRbac" ||
			!strings.Contains(out.Error.Message, "Action: '"+r.action+"'") || !strings.Contains(out.Error.Message, "appid=user") {
			t.Errorf("%s %s as the encryption user: got %+v, want Forbidden/ForbiddenByRbac naming %s", r.method, r.path, out.Error, r.action)
		}
	}
	if got := e.Counts(); got.Create != before.Create || got.Update != before.Update || got.Rotate != before.Rotate {
		t.Errorf("refused operations reached the key: counts %+v, before %+v", got, before)
	}
	for _, tok := range []string{officer, legacy} {
		for _, r := range refused {
			c.want(tok, r.method, r.path, r.body, 200)
		}
	}
	// A role change applies to tokens already issued.
	e.AddClientWithRole("user", "su", RoleCryptoOfficer)
	c.want(user, "POST", "keys/k/create", `{"kty":"RSA"}`, 200)
}

// roleClient calls the emulator over HTTPS as one of its clients.
type roleClient struct {
	t  *testing.T
	e  *Emulator
	hc *http.Client
}

// token gets an access token with the client-credentials grant.
func (c roleClient) token(id, secret string) string {
	c.t.Helper()
	form := url.Values{"grant_type": {"client_credentials"}, "client_id": {id}, "client_secret": {secret},
		"scope": {DefaultResource + "/.default"}}
	resp, err := c.hc.Post(c.e.URL+c.e.TenantID+"/oauth2/v2.0/token", "application/x-www-form-urlencoded", strings.NewReader(form.Encode()))
	if err != nil {
		c.t.Fatal(err)
	}
	defer resp.Body.Close()
	var out struct {
		AccessToken string `json:"access_token"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil || out.AccessToken == "" {
		c.t.Fatalf("token for %s: HTTP %d, %v", id, resp.StatusCode, err)
	}
	return out.AccessToken
}

// want sends one Key Vault request and fails unless it gets status; it
// returns the body.
func (c roleClient) want(token, method, path, body string, status int) []byte {
	c.t.Helper()
	req, _ := http.NewRequest(method, c.e.URL+path+"?api-version=7.5", strings.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+token)
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.hc.Do(req)
	if err != nil {
		c.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != status {
		c.t.Fatalf("%s %s: got %d %s, want %d", method, path, resp.StatusCode, b, status)
	}
	return b
}
