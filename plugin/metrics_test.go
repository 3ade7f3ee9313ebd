package plugin

import (
	"context"
	"crypto/fips140"
	"errors"
	"maps"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"
	kmsapi "k8s.io/kms/apis/v2"

	"github.com/kms-v2/kms-plugin/providers"
	"github.com/kms-v2/kms-plugin/providers/multi"
)

// TestFIPS140Gauge: kms_plugin_fips140_enabled is registered and follows
// crypto/fips140.Enabled (make test-fips runs this under fips140=only,
// where it must read 1; make unit without it, where it must read 0).
func TestFIPS140Gauge(t *testing.T) {
	reg := prometheus.NewRegistry()
	NewMetrics(reg)
	want := "0"
	if fips140.Enabled() {
		want = "1"
	}
	exp := `# HELP kms_plugin_fips140_enabled 1 when the Go cryptography runs in FIPS 140-3 mode (crypto/fips140.Enabled: GODEBUG fips140=on or only, the default in a GOFIPS140 build), else 0.
# TYPE kms_plugin_fips140_enabled gauge
kms_plugin_fips140_enabled ` + want + "\n"
	if err := testutil.GatherAndCompare(reg, strings.NewReader(exp), "kms_plugin_fips140_enabled"); err != nil {
		t.Fatal(err)
	}
	t.Logf("fips140.Enabled() = %v", fips140.Enabled())
}

// TestBuildInfo: kms_plugin_build_info is 1 with the labels it was given,
// and a second call replaces the series rather than adding one.
func TestBuildInfo(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := NewMetrics(reg)
	m.SetBuildInfo("v0.0.0", "old", "go0", "off")
	m.SetBuildInfo("v1.2.3", "abc123", "go1.25.0", "only")
	exp := `# HELP kms_plugin_build_info 1, labelled with the running binary's version, commit, Go version and FIPS 140-3 mode (off, on or only), as ` + "`kms-plugin version`" + ` prints them.
# TYPE kms_plugin_build_info gauge
kms_plugin_build_info{commit="abc123",fips140="only",goversion="go1.25.0",version="v1.2.3"} 1
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(exp), "kms_plugin_build_info"); err != nil {
		t.Fatal(err)
	}
}

// TestPreinitialisedSeries: every labelled counter and histogram has its
// known label values at 0 from the first scrape, before any request or
// failure, so rate() counts the first increment and absent() alerts only
// on a missing target.
func TestPreinitialisedSeries(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := NewMetrics(reg)
	if _, err := New(Options{Provider: &refresherProvider{fakeProvider: fakeProvider{keyID: "fake:k/1"}}, Metrics: m}); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name   string
		metric string
		want   int
	}{
		// 3 methods × 10 codes.
		{"requests by method and code", "kms_plugin_requests_total", 30},
		{"request latency by method", "kms_plugin_request_duration_seconds", 3},
		// provider: decrypt, check, encrypt, refresh; none: decrypt.
		{"provider operations", "kms_plugin_provider_operation_duration_seconds", 5},
		// 5 operations × 10 classes.
		{"provider errors by class", "kms_plugin_provider_errors_total", 50},
		{"reloads by result", "kms_plugin_key_state_reloads_total", 2},
		{"provider health", "kms_plugin_provider_healthy", 1},
		{"dropped log lines", "kms_plugin_log_lines_dropped_total", 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := testutil.GatherAndCount(reg, tt.metric)
			if err != nil {
				t.Fatal(err)
			}
			if got != tt.want {
				t.Errorf("%s: got %d series at start, want %d", tt.metric, got, tt.want)
			}
		})
	}
	exp := `# HELP kms_plugin_provider_errors_total Failed calls into each configured key provider by operation and error class (provider "none": a Decrypt whose key_id no provider owns).
# TYPE kms_plugin_provider_errors_total counter
kms_plugin_provider_errors_total{class="unavailable",operation="encrypt",provider="provider"} 0
`
	if err := testutil.GatherAndCompare(filter(reg, `class="unavailable",operation="encrypt"`), strings.NewReader(exp), "kms_plugin_provider_errors_total"); err != nil {
		t.Error(err)
	}
}

// refresherProvider is a fakeProvider that also reloads key state.
type refresherProvider struct{ fakeProvider }

func (*refresherProvider) Refresh(context.Context) error { return nil }

// filter is reg with only the series whose text form contains want.
func filter(reg *prometheus.Registry, want string) prometheus.Gatherer {
	return prometheus.GathererFunc(func() ([]*dto.MetricFamily, error) {
		mfs, err := reg.Gather()
		for _, mf := range mfs {
			var keep []*dto.Metric
			for _, m := range mf.GetMetric() {
				if strings.Contains(labelString(m), want) {
					keep = append(keep, m)
				}
			}
			mf.Metric = keep
		}
		return mfs, err
	})
}

// labelString is m's labels as name="value" pairs, sorted by name.
func labelString(m *dto.Metric) string {
	var parts []string
	for _, l := range m.GetLabel() {
		parts = append(parts, l.GetName()+`="`+l.GetValue()+`"`)
	}
	return strings.Join(parts, ",")
}

// reportingProvider is a fakeProvider that reports stats.
type reportingProvider struct {
	fakeProvider
	stats providers.Stats
}

func (r *reportingProvider) Stats() providers.Stats { return r.stats }

// Owns claims only the provider's own key_id, so several can be entries of
// one service.
func (r *reportingProvider) Owns(keyID string) bool { return keyID == r.keyID }

// TestReporterMetrics: what a provider reports about itself (primary
// creation time, cache lookups, breaker state) is exported under its
// entry name; the creation time only for the encrypting entry, and not at
// all when the provider does not know it.
func TestReporterMetrics(t *testing.T) {
	created := time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)
	enc := &reportingProvider{fakeProvider: fakeProvider{keyID: "fake:enc/1"}, stats: providers.Stats{
		PrimaryCreated: created,
		Caches:         []providers.CacheStats{{Cache: providers.CacheUnwrap, Hits: 7, Misses: 3}},
		Breaker:        providers.BreakerOpen,
	}}
	old := &reportingProvider{fakeProvider: fakeProvider{keyID: "fake:old/1"}, stats: providers.Stats{
		PrimaryCreated: created.Add(-time.Hour),
		Caches:         []providers.CacheStats{{Cache: providers.CacheKeyState, Hits: 1}},
	}}
	unknown := &reportingProvider{fakeProvider: fakeProvider{keyID: "fake:u/1"}}
	tests := []struct {
		name    string
		entries []multi.Entry
		metrics []string
		want    string
	}{
		{
			name:    "encrypting and decrypt-only providers",
			entries: []multi.Entry{{Name: "kv", Provider: enc}, {Name: "old", Provider: old}},
			metrics: []string{"kms_plugin_primary_key_created_timestamp_seconds", "kms_plugin_provider_cache_lookups_total", "kms_plugin_provider_breaker_state"},
			want: `# HELP kms_plugin_primary_key_created_timestamp_seconds ` + primaryCreatedHelp + `
# TYPE kms_plugin_primary_key_created_timestamp_seconds gauge
kms_plugin_primary_key_created_timestamp_seconds{provider="kv"} 1.735787045e+09
# HELP kms_plugin_provider_cache_lookups_total ` + cacheLookupsHelp + `
# TYPE kms_plugin_provider_cache_lookups_total counter
kms_plugin_provider_cache_lookups_total{cache="key_state",provider="old",result="hit"} 1
kms_plugin_provider_cache_lookups_total{cache="key_state",provider="old",result="miss"} 0
kms_plugin_provider_cache_lookups_total{cache="unwrap",provider="kv",result="hit"} 7
kms_plugin_provider_cache_lookups_total{cache="unwrap",provider="kv",result="miss"} 3
# HELP kms_plugin_provider_breaker_state ` + breakerStateHelp + `
# TYPE kms_plugin_provider_breaker_state gauge
kms_plugin_provider_breaker_state{provider="kv",state="closed"} 0
kms_plugin_provider_breaker_state{provider="kv",state="half_open"} 0
kms_plugin_provider_breaker_state{provider="kv",state="open"} 1
`,
		},
		{
			name:    "creation time unknown",
			entries: []multi.Entry{{Name: "u", Provider: unknown}},
			metrics: []string{"kms_plugin_primary_key_created_timestamp_seconds", "kms_plugin_provider_breaker_state"},
			want:    "",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			reg := prometheus.NewRegistry()
			if _, err := New(Options{Entries: tt.entries, Metrics: NewMetrics(reg)}); err != nil {
				t.Fatal(err)
			}
			if err := testutil.GatherAndCompare(reg, strings.NewReader(tt.want), tt.metrics...); err != nil {
				t.Error(err)
			}
		})
	}
}

// Help texts of the reported metrics, as the descriptions carry them.
const (
	primaryCreatedHelp = "When the primary key version (the one Encrypt uses) was created, in unix seconds, as the encrypting provider records it; absent when it does not."
	cacheLookupsHelp   = "Lookups in each provider's caches by result (hit or miss); cache unwrap: seeds kept after a slow unwrap, key_state: the snapshot of key versions a Decrypt's key_id is looked up in (a miss reloads it from the backend)."
	breakerStateHelp   = "1 for the state each provider's circuit breaker is in (closed: calls go out; open: calls fail fast; half_open: one probe call is out), 0 for the others."
)

// TestErrorClasses: errorClasses lists exactly the failure labels
// classify returns, so no class is missing from the series made at 0.
func TestErrorClasses(t *testing.T) {
	errs := []error{
		providers.ErrInvalidInput, providers.ErrInvalidCiphertext, providers.ErrKeyNotFound, providers.ErrKeyDisabled,
		providers.ErrPermissionDenied, providers.ErrUnavailable, providers.ErrRefused,
		context.DeadlineExceeded, context.Canceled, errors.New("other"),
	}
	got := map[string]bool{}
	for _, err := range errs {
		got[classify(err).label] = true
	}
	want := map[string]bool{}
	for _, c := range errorClasses {
		want[c] = true
	}
	if !maps.Equal(got, want) {
		t.Errorf("classify labels %v, errorClasses %v", slices.Sorted(maps.Keys(got)), slices.Sorted(maps.Keys(want)))
	}
}

// TestMetricsCarryNoKeyID: a scrape after requests names the key_id only
// by its hash.
func TestMetricsCarryNoKeyID(t *testing.T) {
	const keyID = "fake:secret-looking-keyset/42"
	reg := prometheus.NewRegistry()
	s, err := New(Options{Provider: &fakeProvider{keyID: keyID}, Metrics: NewMetrics(reg)})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if _, err := s.Status(ctx, &kmsapi.StatusRequest{}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: make([]byte, 32), Uid: "u"}); err != nil {
		t.Fatal(err)
	}
	rec := httptest.NewRecorder()
	HealthHandler(s, reg).ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/metrics", nil))
	body := rec.Body.String()
	if strings.Contains(body, "secret-looking") {
		t.Errorf("/metrics names the key_id in clear:\n%s", body)
	}
	if !strings.Contains(body, providers.HashKeyID(keyID)) {
		t.Errorf("/metrics lacks the key_id hash %s", providers.HashKeyID(keyID))
	}
}
