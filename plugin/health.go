package plugin

import (
	"fmt"
	"io"
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// HealthHandler serves /healthz and /readyz (both 200 "ok" while Status
// would report ok, 503 with the reason otherwise; no backend call on the
// request path; ?verbose adds a line per configured provider) and /metrics
// from gatherer.
func HealthHandler(s *Service, gatherer prometheus.Gatherer) http.Handler {
	mux := http.NewServeMux()
	health := func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		ok, why := s.Healthy()
		if !ok {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
		fmt.Fprintln(w, why)
		if r.URL.Query().Has("verbose") {
			writeEntries(w, s.Entries())
		}
	}
	mux.HandleFunc("/healthz", health)
	mux.HandleFunc("/readyz", health)
	// /livez answers as long as the process serves HTTP: a backend outage
	// must not get the plugin restarted, it would not fix the backend.
	mux.HandleFunc("/livez", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.Handle("/metrics", promhttp.HandlerFor(gatherer, promhttp.HandlerOpts{}))
	return mux
}

// writeEntries writes one line per provider: its role and health.
func writeEntries(w io.Writer, es []EntryHealth) {
	for _, e := range es {
		role := "decrypts"
		if e.Encrypts {
			role = "encrypts"
		}
		fmt.Fprintf(w, "provider %s (%s): %s\n", e.Name, role, e.Health)
	}
}
