package plugin

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/net/netutil"
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

// Limits of the health server. Its clients are kubelet's probes and a
// Prometheus scrape: a few short requests a minute, no request body.
const (
	// healthReadTimeout bounds reading a whole request, headers included.
	healthReadTimeout = 5 * time.Second
	// healthWriteTimeout bounds writing a response, /metrics included.
	healthWriteTimeout = 10 * time.Second
	// healthIdleTimeout bounds a keep-alive connection between requests.
	healthIdleTimeout = 5 * time.Second
	// healthMaxHeaderBytes bounds a request's headers (Go's default is
	// 1 MiB); a probe sends a few hundred bytes.
	healthMaxHeaderBytes = 4 << 10
	// maxHealthConns caps open connections; see connCap.
	maxHealthConns = 64
)

// Pacing of health bind retries: the first 1 s after a failure, doubling
// to at most 10 s, so a port taken for hours costs a line every 10 s.
const (
	healthBindRetry    = time.Second
	healthBindRetryMax = 10 * time.Second
)

// ServeHealth serves HealthHandler(s, gatherer) on addr until ctx ends.
//
// The endpoint is optional to the plugin's job and the socket is not:
// failing to bind addr (the port taken by another process, or by a
// previous instance still shutting down) must not stop the plugin serving
// every apiserver. So a failed bind is logged, counted in
// kms_plugin_health_bind_errors_total and retried (see healthBindRetry)
// until it works or ctx ends; so is a server that stops on its own.
func (s *Service) ServeHealth(ctx context.Context, addr string, gatherer prometheus.Gatherer) {
	s.serveHTTP(ctx, httpEndpoint{name: "health", addr: addr, handler: HealthHandler(s, gatherer), bindErrs: s.m.healthBindErrs})
}

// MetricsHandler serves /metrics from gatherer and nothing else: the
// metrics listener may face the cluster network, and health details
// (provider names and error classes on /healthz?verbose) stay on the
// loopback health listener.
func MetricsHandler(gatherer prometheus.Gatherer) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(gatherer, promhttp.HandlerOpts{}))
	return mux
}

// ServeMetrics serves MetricsHandler(gatherer) on addr until ctx ends,
// with the health listener's limits and its bind-and-retry rule (failures
// counted in kms_plugin_metrics_bind_errors_total): a scrape port must
// never stop the socket being served.
func (s *Service) ServeMetrics(ctx context.Context, addr string, gatherer prometheus.Gatherer) {
	s.serveHTTP(ctx, httpEndpoint{name: "metrics", addr: addr, handler: MetricsHandler(gatherer), bindErrs: s.m.metricsBindErrs})
}

// httpEndpoint is one optional HTTP listener of the plugin.
type httpEndpoint struct {
	// name is "health" or "metrics", for log lines.
	name     string
	addr     string
	handler  http.Handler
	bindErrs prometheus.Counter
}

// serveHTTP serves e until ctx ends, binding again after a failed bind
// or a server that stopped on its own (see ServeHealth).
func (s *Service) serveHTTP(ctx context.Context, e httpEndpoint) {
	wait, failures := healthBindRetry, 0
	for {
		ln, err := net.Listen("tcp", e.addr)
		if err == nil {
			wait = healthBindRetry
			if failures > 0 {
				s.log.Info(e.name+" endpoint listening", "addr", ln.Addr().String(), "failed_binds", failures)
			} else {
				s.log.Info(e.name+" endpoint listening", "addr", ln.Addr().String())
			}
			err = serveOn(ctx, e.name, ln, e.handler)
			if ctx.Err() != nil {
				return
			}
			s.log.Error(e.name+" server stopped; binding again", "addr", e.addr, "error", err, "retry_in_seconds", wait.Seconds())
		} else {
			failures++
			e.bindErrs.Inc()
			s.log.Error("cannot bind the "+e.name+" address; the socket is served, the "+e.name+" endpoint is retried", "addr", e.addr, "error", err, "retry_in_seconds", wait.Seconds())
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
		wait = min(2*wait, healthBindRetryMax)
	}
}

// serveHealth serves HealthHandler(s, gatherer) on ln until ctx ends, then
// closes it.
func (s *Service) serveHealth(ctx context.Context, ln net.Listener, gatherer prometheus.Gatherer) error {
	return serveOn(ctx, "health", ln, HealthHandler(s, gatherer))
}

// serveOn serves h (the name endpoint) on ln until ctx ends, then closes it. Timeouts, header
// size and connections are bounded (see connCap), so no client of the
// port can grow the plugin's memory.
func serveOn(ctx context.Context, name string, ln net.Listener, h http.Handler) error {
	srv := newHealthServer(h)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(netutil.LimitListener(ln, maxHealthConns)) }()
	select {
	case err := <-served:
		return fmt.Errorf("%s %s: %w", name, ln.Addr(), err)
	case <-ctx.Done():
	}
	_ = srv.Close()
	if err := <-served; !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("%s %s: %w", name, ln.Addr(), err)
	}
	return nil
}

// newHealthServer returns an http.Server for h with the limits above. It
// must serve a listener capped at maxHealthConns (netutil.LimitListener).
func newHealthServer(h http.Handler) *http.Server {
	conns := &connCap{max: maxHealthConns, conns: map[net.Conn]connState{}}
	return &http.Server{
		Handler:        h,
		ReadTimeout:    healthReadTimeout,
		WriteTimeout:   healthWriteTimeout,
		IdleTimeout:    healthIdleTimeout,
		MaxHeaderBytes: healthMaxHeaderBytes,
		ConnState:      conns.track,
	}
}

// connCap keeps the health server within maxHealthConns connections
// without letting idle ones starve the probes.
//
// netutil.LimitListener stops accepting at the cap, so connections beyond
// it wait in the kernel's accept backlog rather than in the plugin's
// memory (each accepted connection costs about 20 KiB of buffers and
// goroutine stack: 8,000 idle ones took the plugin from 21 to 174 MiB,
// past its 128 MiB limit). A cap alone, though, lets idle connections hold
// every slot, and kubelet's probe would queue behind thousands of them
// until their timeouts, and fail. So when a connection takes the last
// slot, the oldest one not being answered is closed to free a slot for
// the next: idle after a keep-alive response, or not yet done sending its
// headers (net/http reports both alike until the headers are in, so a
// flood of slow headers cannot hold the slots either; a probe sends its
// request at once and is the newest). A connection whose request is being
// answered is never closed for this; it ends within the write timeout,
// and only while all 64 are being answered do new ones wait.
type connCap struct {
	max   int
	mu    sync.Mutex
	conns map[net.Conn]connState
}

// connState is what connCap knows of one open connection.
type connState struct {
	state http.ConnState
	since time.Time
}

// track is the server's ConnState hook.
func (c *connCap) track(conn net.Conn, state http.ConnState) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if state == http.StateClosed || state == http.StateHijacked {
		delete(c.conns, conn)
		return
	}
	c.conns[conn] = connState{state: state, since: time.Now()}
	if state == http.StateNew && len(c.conns) >= c.max {
		c.evictLocked(conn)
	}
}

// evictLocked closes the connection other than keep that has been
// longest in its state without being answered, if there is one.
func (c *connCap) evictLocked(keep net.Conn) {
	var victim net.Conn
	var oldest time.Time
	for conn, st := range c.conns {
		if conn == keep || st.state == http.StateActive {
			continue
		}
		if victim == nil || st.since.Before(oldest) {
			victim, oldest = conn, st.since
		}
	}
	if victim != nil {
		delete(c.conns, victim)
		_ = victim.Close() // releases its LimitListener slot
	}
}

// open is how many connections are open.
func (c *connCap) open() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.conns)
}
