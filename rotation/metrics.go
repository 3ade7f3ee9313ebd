package rotation

import (
	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the Prometheus collectors of one rotation run, for
// `kmsctl rotate --metrics-addr`. Labels carry resources, outcomes, phases
// and key_id hashes, never object data.
type Metrics struct {
	objects      *prometheus.CounterVec
	patchLatency prometheus.Histogram
	phase        *prometheus.GaugeVec
	stale        *prometheus.GaugeVec
	concurrency  prometheus.GaugeFunc
}

// NewMetrics creates the collectors and registers them with reg. l may be
// nil; when set its current limit is exported.
func NewMetrics(reg prometheus.Registerer, l *Limiter) *Metrics {
	m := &Metrics{
		objects: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kmsctl_rotate_objects_total",
			Help: "Objects the rewrite handled, by resource and outcome (rewritten, unchanged, conflict, skipped, error).",
		}, []string{"resource", "outcome"}),
		patchLatency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "kmsctl_rotate_patch_duration_seconds",
			Help:    "Latency of the resourceVersion-only patches.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 14),
		}),
		phase: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "kmsctl_rotate_phase",
			Help: "1 for the phase the run is in.",
		}, []string{"phase"}),
		stale: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "kmsctl_rotate_stale_objects",
			Help: "Objects under a key other than the primary at the last census, by resource.",
		}, []string{"resource"}),
	}
	cs := []prometheus.Collector{m.objects, m.patchLatency, m.phase, m.stale}
	if l != nil {
		m.concurrency = prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "kmsctl_rotate_concurrency_limit",
			Help: "Current adaptive limit of patches in flight.",
		}, func() float64 { return float64(l.Stats().Limit) })
		cs = append(cs, m.concurrency)
	}
	if reg != nil {
		reg.MustRegister(cs...)
	}
	return m
}

func (m *Metrics) setPhase(name string) {
	if m == nil {
		return
	}
	m.phase.Reset()
	m.phase.WithLabelValues(name).Set(1)
}

func (m *Metrics) setCensus(c *Census) {
	if m == nil || c == nil {
		return
	}
	for _, r := range c.Resources {
		m.stale.WithLabelValues(r.Resource).Set(float64(r.Stale))
	}
}
