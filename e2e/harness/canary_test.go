package harness

import (
	"bytes"
	"encoding/base64"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kms-v2/kms-plugin/internal/leakcanary"
)

// TestCheckLeaksFindsALeak: a Secret's value written through the canary
// transport, then found base64url-encoded in a process log, fails Close's
// check with the file, line and label; a clean log passes.
func TestCheckLeaksFindsALeak(t *testing.T) {
	saved := canary
	canary = &leakcanary.Canary{}
	t.Cleanup(func() { canary = saved })

	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	defer srv.Close()
	client := &http.Client{Transport: wrapCanary(http.DefaultTransport)}
	value := []byte("the-plaintext-of-a-secret-0123")
	body := `{"kind":"Secret","data":{"password":"` + base64.StdEncoding.EncodeToString(value) + `"}}`
	resp, err := client.Post(srv.URL+"/api/v1/namespaces/ns/secrets", "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if canary.Len() != 1 {
		t.Fatalf("the transport registered %d secrets, want 1", canary.Len())
	}

	c := &Cluster{Dir: t.TempDir(), logf: t.Logf}
	if err := os.MkdirAll(c.logDir(), 0o700); err != nil {
		t.Fatal(err)
	}
	log := filepath.Join(c.logDir(), "kms-plugin-0.log")
	if err := os.WriteFile(log, []byte("2026-01-01 [INFO] serving\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := c.checkLeaks(); err != nil {
		t.Fatalf("clean logs: %v", err)
	}
	leak := "2026-01-01 [DEBUG] decrypt: value=" + base64.RawURLEncoding.EncodeToString(append([]byte{9}, value...)) + "\n"
	if err := os.WriteFile(log, []byte("2026-01-01 [INFO] serving\n"+leak), 0o600); err != nil {
		t.Fatal(err)
	}
	err = c.checkLeaks()
	if err == nil || !strings.Contains(err.Error(), "kms-plugin-0.log:2: /api/v1/namespaces/ns/secrets data password (base64") {
		t.Fatalf("checkLeaks = %v; want the hit on line 2", err)
	}
	if bytes.Contains([]byte(err.Error()), value) {
		t.Fatal("the report quotes the secret")
	}
}
