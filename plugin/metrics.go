package plugin

import (
	"crypto/fips140"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the plugin's Prometheus collectors. Labels carry methods,
// codes, error classes and key_id hashes, never key material or error text.
type Metrics struct {
	requests        *prometheus.CounterVec
	requestDuration *prometheus.HistogramVec
	providerOps     *prometheus.HistogramVec
	providerErrors  *prometheus.CounterVec
	primaryKey      *prometheus.GaugeVec
	reloads         *prometheus.CounterVec
	healthy         prometheus.Gauge
	providerHealthy *prometheus.GaugeVec
	logsDropped     *prometheus.CounterVec
	healthBindErrs  prometheus.Counter
	socketLost      prometheus.Counter
	peersRefused    prometheus.Counter
	fips140Enabled  prometheus.Gauge

	mu             sync.Mutex
	currentPrimary string
}

// NewMetrics creates the collectors and registers them with reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kms_plugin_requests_total",
			Help: "KMS v2 gRPC requests by method and gRPC code.",
		}, []string{"method", "code"}),
		requestDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "kms_plugin_request_duration_seconds",
			Help:    "KMS v2 gRPC request latency by method.",
			Buckets: []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5},
		}, []string{"method"}),
		providerOps: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "kms_plugin_provider_operation_duration_seconds",
			Help:    "Latency of calls into each configured key provider by operation.",
			Buckets: []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5},
		}, []string{"provider", "operation"}),
		providerErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kms_plugin_provider_errors_total",
			Help: "Failed calls into each configured key provider by operation and error class (provider \"none\": a Decrypt whose key_id no provider owns).",
		}, []string{"provider", "operation", "class"}),
		primaryKey: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "kms_plugin_primary_key_info",
			Help: "1 for the key_id hash (sha256:hex, as kube-apiserver labels it) Status currently reports.",
		}, []string{"key_id_hash"}),
		reloads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kms_plugin_key_state_reloads_total",
			Help: "Background reloads of key state from each configured provider by result.",
		}, []string{"provider", "result"}),
		healthy: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "kms_plugin_healthy",
			Help: "1 while Status reports ok: the encrypting provider's last check passed and is fresh.",
		}),
		providerHealthy: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "kms_plugin_provider_healthy",
			Help: "1 while each configured provider's last background check passed; a decrypt-only provider at 0 fails reads of objects still under it.",
		}, []string{"provider"}),
		logsDropped: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kms_plugin_log_lines_dropped_total",
			Help: "Log lines not written, by reason (rate_limited: over the request log budget).",
		}, []string{"reason"}),
		healthBindErrs: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kms_plugin_health_bind_errors_total",
			Help: "Failed attempts to bind the health address; the socket is served regardless, and the bind is retried.",
		}),
		socketLost: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kms_plugin_socket_lost_total",
			Help: "Times the socket path was found deleted or replaced by another file; the plugin binds it again, or exits when another process holds it.",
		}),
		peersRefused: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kms_plugin_peers_refused_total",
			Help: "Connections to the socket closed because the peer's uid and gid are not in allowedPeers (or could not be read).",
		}),
		fips140Enabled: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "kms_plugin_fips140_enabled",
			Help: "1 when the Go cryptography runs in FIPS 140-3 mode (crypto/fips140.Enabled: GODEBUG fips140=on or only, the default in a GOFIPS140 build), else 0.",
		}),
	}
	// Fixed for the life of the process: the mode cannot change after start.
	if fips140.Enabled() {
		m.fips140Enabled.Set(1)
	}
	// Present from the start, so an alert on its rate has a series.
	m.logsDropped.WithLabelValues(reasonRateLimited)
	if reg != nil {
		reg.MustRegister(m.requests, m.requestDuration, m.providerOps, m.providerErrors, m.primaryKey, m.reloads, m.healthy, m.providerHealthy,
			m.logsDropped, m.healthBindErrs, m.socketLost, m.peersRefused, m.fips140Enabled)
	}
	return m
}

// reasonRateLimited labels log lines dropped by a request log budget.
const reasonRateLimited = "rate_limited"

// setPrimary records the current primary key_id hash.
func (m *Metrics) setPrimary(hash string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if hash == m.currentPrimary {
		return
	}
	if m.currentPrimary != "" {
		m.primaryKey.DeleteLabelValues(m.currentPrimary)
	}
	m.primaryKey.WithLabelValues(hash).Set(1)
	m.currentPrimary = hash
}
