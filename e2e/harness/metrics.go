package harness

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"sort"
	"strings"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// Metrics is one scrape of a Prometheus endpoint, by metric family name.
type Metrics map[string]*dto.MetricFamily

// KeyIDHash is how kube-apiserver and the plugin label a key_id in metrics:
// "sha256:" + hex(sha256(key_id)).
func KeyIDHash(keyID string) string {
	sum := sha256.Sum256([]byte(keyID))
	return "sha256:" + hex.EncodeToString(sum[:])
}

// Sum adds the values of every series of the family name whose labels
// include all of want (counters, gauges and untyped; histograms count
// observations). A missing family sums to 0.
func (m Metrics) Sum(name string, want map[string]string) float64 {
	var total float64
	for _, s := range m.series(name, want) {
		switch {
		case s.Counter != nil:
			total += s.Counter.GetValue()
		case s.Gauge != nil:
			total += s.Gauge.GetValue()
		case s.Untyped != nil:
			total += s.Untyped.GetValue()
		case s.Histogram != nil:
			total += float64(s.Histogram.GetSampleCount())
		}
	}
	return total
}

// Has reports whether the family name has a series whose labels include
// all of want.
func (m Metrics) Has(name string, want map[string]string) bool {
	return len(m.series(name, want)) > 0
}

// LabelValues lists the distinct values of label across the family's
// series, sorted.
func (m Metrics) LabelValues(name, label string) []string {
	seen := map[string]bool{}
	for _, s := range m.series(name, nil) {
		for _, l := range s.GetLabel() {
			if l.GetName() == label {
				seen[l.GetValue()] = true
			}
		}
	}
	out := make([]string, 0, len(seen))
	for v := range seen {
		out = append(out, v)
	}
	sort.Strings(out)
	return out
}

func (m Metrics) series(name string, want map[string]string) []*dto.Metric {
	f := m[name]
	if f == nil {
		return nil
	}
	var out []*dto.Metric
	for _, s := range f.GetMetric() {
		have := map[string]string{}
		for _, l := range s.GetLabel() {
			have[l.GetName()] = l.GetValue()
		}
		ok := true
		for k, v := range want {
			if have[k] != v {
				ok = false
				break
			}
		}
		if ok {
			out = append(out, s)
		}
	}
	return out
}

// scrape GETs a Prometheus text endpoint, with a bearer token if given.
func scrape(ctx context.Context, client *http.Client, url, token string) (Metrics, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", "text/plain")
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("scrape %s: %w", url, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, fmt.Errorf("scrape %s: %w", url, err)
	}
	canaryScan("metrics "+url, body)
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("scrape %s: %s: %s", url, resp.Status, strings.TrimSpace(string(body)))
	}
	return ParseMetrics(string(body))
}

// ParseMetrics parses the Prometheus text exposition format.
func ParseMetrics(text string) (Metrics, error) {
	return ParseMetricsReader(strings.NewReader(text))
}

// ParseMetricsReader parses the Prometheus text exposition format from r,
// for endpoints the harness does not scrape itself (e.g. kmsctl's).
func ParseMetricsReader(r io.Reader) (Metrics, error) {
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(r)
	if err != nil {
		return nil, fmt.Errorf("parse metrics: %w", err)
	}
	return Metrics(fams), nil
}
