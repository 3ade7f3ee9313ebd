package plugin

import (
	"crypto/fips140"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"

	"github.com/kms-v2/kms-plugin/providers"
	"github.com/kms-v2/kms-plugin/providers/multi"
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
	metricsBindErrs prometheus.Counter
	socketLost      prometheus.Counter
	peersRefused    prometheus.Counter
	fips140Enabled  prometheus.Gauge
	buildInfo       *prometheus.GaugeVec
	reporters       *reporterCollector

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
		metricsBindErrs: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kms_plugin_metrics_bind_errors_total",
			Help: "Failed attempts to bind the metrics address; the socket is served regardless, and the bind is retried.",
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
		buildInfo: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "kms_plugin_build_info",
			Help: "1, labelled with the running binary's version, commit, Go version and FIPS 140-3 mode (off, on or only), as `kms-plugin version` prints them.",
		}, []string{"version", "commit", "goversion", "fips140"}),
		reporters: &reporterCollector{},
	}
	// Fixed for the life of the process: the mode cannot change after start.
	if fips140.Enabled() {
		m.fips140Enabled.Set(1)
	}
	m.initRequests()
	if reg != nil {
		reg.MustRegister(m.requests, m.requestDuration, m.providerOps, m.providerErrors, m.primaryKey, m.reloads, m.healthy, m.providerHealthy,
			m.logsDropped, m.healthBindErrs, m.metricsBindErrs, m.socketLost, m.peersRefused, m.fips140Enabled, m.buildInfo, m.reporters)
	}
	return m
}

// SetBuildInfo sets kms_plugin_build_info; the binary calls it once at
// start with what `version` prints (the plugin package cannot read the
// release stamp itself).
func (m *Metrics) SetBuildInfo(version, commit, goVersion, fipsMode string) {
	m.buildInfo.Reset()
	m.buildInfo.WithLabelValues(version, commit, goVersion, fipsMode).Set(1)
}

// Methods are the KMS v2 methods, as requests are labelled.
var methods = []string{"Status", "Encrypt", "Decrypt"}

// requestCodes are the gRPC codes a request can end with: OK, every code
// classify maps a provider error to, InvalidArgument for a malformed
// request and ResourceExhausted for one gRPC refuses as too large.
var requestCodes = []codes.Code{
	codes.OK, codes.InvalidArgument, codes.NotFound, codes.FailedPrecondition, codes.PermissionDenied,
	codes.Unavailable, codes.DeadlineExceeded, codes.Canceled, codes.ResourceExhausted, codes.Internal,
}

// initRequests creates every request series at 0, so rate() and alerts
// on a code that has not happened yet have a series from the first scrape
// (a series that appears at its first increment loses that increment to
// rate()).
func (m *Metrics) initRequests() {
	for _, method := range methods {
		m.requestDuration.WithLabelValues(method)
		for _, c := range requestCodes {
			m.requests.WithLabelValues(method, c.String())
		}
	}
	m.logsDropped.WithLabelValues(reasonRateLimited)
}

// Operations are the calls into a provider, as its metrics label them.
const (
	opEncrypt = "encrypt"
	opDecrypt = "decrypt"
	opCheck   = "check"
	opRefresh = "refresh"
)

// watch starts exporting entries' own stats (see reporterCollector) and
// creates their series at 0, as initRequests does for requests: every
// operation each entry can be asked for, with every error class, and its
// health and reload results.
func (m *Metrics) watch(entries []multi.Entry) {
	m.reporters.entries.Store(&entries)
	for i, e := range entries {
		ops := []string{opDecrypt, opCheck}
		if i == 0 {
			ops = append(ops, opEncrypt)
		}
		if _, ok := e.Provider.(providers.Refresher); ok {
			ops = append(ops, opRefresh)
			m.reloads.WithLabelValues(e.Name, "ok")
			m.reloads.WithLabelValues(e.Name, "error")
		}
		m.initOps(e.Name, ops)
		m.providerHealthy.WithLabelValues(e.Name)
	}
	// A Decrypt whose key_id no provider owns.
	m.initOps(unrouted, []string{opDecrypt})
}

// initOps creates provider's operation and error series at 0.
func (m *Metrics) initOps(provider string, ops []string) {
	for _, op := range ops {
		m.providerOps.WithLabelValues(provider, op)
		for _, class := range errorClasses {
			m.providerErrors.WithLabelValues(provider, op, class)
		}
	}
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
