package main

import (
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
)

// TestMetricsListener: the optional metrics listener serves /metrics, with
// the build, key age and pre-initialised request series from the first
// scrape, and nothing else (health details stay on the health listener).
func TestMetricsListener(t *testing.T) {
	e := newEnv(t, true)
	health, metrics := freeTCPAddr(t), freeTCPAddr(t)
	e.writeConfig(t, fmt.Sprintf("socket: %s\nhealth: %s\nmetrics:\n  address: %s\nprovider:\n  file:\n    path: keyset.json\n", e.socket, health, metrics))
	startPluginLogs(t, e)
	waitHTTP(t, "http://"+metrics+"/metrics")

	code, body := get(t, "http://"+metrics+"/metrics")
	if code != http.StatusOK {
		t.Fatalf("/metrics = %d", code)
	}
	for _, want := range []string{
		`kms_plugin_build_info{commit="`,
		`kms_plugin_primary_key_created_timestamp_seconds{provider="file"} `,
		`kms_plugin_requests_total{code="Unavailable",method="Encrypt"} 0`,
		`kms_plugin_provider_cache_lookups_total{cache="key_state",provider="file",result="miss"} 0`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
	for _, path := range []string{"/healthz", "/readyz?verbose", "/livez"} {
		if code, _ := get(t, "http://"+metrics+path); code != http.StatusNotFound {
			t.Errorf("%s on the metrics listener = %d, want 404", path, code)
		}
	}
}

// get returns url's status and body.
func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url) //nolint:noctx // a test URL on loopback
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(b)
}
