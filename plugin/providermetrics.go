package plugin

import (
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/kms-v2/kms-plugin/providers"
	"github.com/kms-v2/kms-plugin/providers/multi"
)

// Descriptions of the metrics read from providers.Reporter at scrape time.
var (
	primaryCreatedDesc = prometheus.NewDesc("kms_plugin_primary_key_created_timestamp_seconds",
		"When the primary key version (the one Encrypt uses) was created, in unix seconds, as the encrypting provider records it; absent when it does not.",
		[]string{"provider"}, nil)
	cacheLookupsDesc = prometheus.NewDesc("kms_plugin_provider_cache_lookups_total",
		"Lookups in each provider's caches by result (hit or miss); cache unwrap: seeds kept after a slow unwrap, key_state: the snapshot of key versions a Decrypt's key_id is looked up in (a miss reloads it from the backend).",
		[]string{"provider", "cache", "result"}, nil)
	breakerStateDesc = prometheus.NewDesc("kms_plugin_provider_breaker_state",
		"1 for the state each provider's circuit breaker is in (closed: calls go out; open: calls fail fast; half_open: one probe call is out), 0 for the others.",
		[]string{"provider", "state"}, nil)
)

// reporterCollector exports what each configured provider reports about
// itself (providers.Reporter), read on every scrape: the provider's own
// counters stay the source of truth, so no number is copied or can drift.
// Providers that do not implement providers.Reporter export nothing here.
type reporterCollector struct {
	// entries are the Service's providers, in order; nil until New.
	entries atomic.Pointer[[]multi.Entry]
}

// Describe sends the descriptions of every metric Collect may send.
func (c *reporterCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- primaryCreatedDesc
	ch <- cacheLookupsDesc
	ch <- breakerStateDesc
}

// Collect reads every provider's Stats.
func (c *reporterCollector) Collect(ch chan<- prometheus.Metric) {
	es := c.entries.Load()
	if es == nil {
		return
	}
	for i, e := range *es {
		r, ok := e.Provider.(providers.Reporter)
		if !ok {
			continue
		}
		collectStats(ch, e.Name, r.Stats(), i == 0)
	}
}

// collectStats sends one provider's stats; encrypts says whether its
// primary is the one Encrypt uses (a decrypt-only provider's primary is
// never used, so its age means nothing).
func collectStats(ch chan<- prometheus.Metric, provider string, st providers.Stats, encrypts bool) {
	if encrypts && !st.PrimaryCreated.IsZero() {
		ch <- prometheus.MustNewConstMetric(primaryCreatedDesc, prometheus.GaugeValue,
			float64(st.PrimaryCreated.UnixNano())/1e9, provider)
	}
	for _, cs := range st.Caches {
		ch <- prometheus.MustNewConstMetric(cacheLookupsDesc, prometheus.CounterValue, float64(cs.Hits), provider, cs.Cache, "hit")
		ch <- prometheus.MustNewConstMetric(cacheLookupsDesc, prometheus.CounterValue, float64(cs.Misses), provider, cs.Cache, "miss")
	}
	if st.Breaker == "" {
		return
	}
	for _, s := range providers.BreakerStates {
		ch <- prometheus.MustNewConstMetric(breakerStateDesc, prometheus.GaugeValue, boolGauge(s == st.Breaker), provider, string(s))
	}
}
