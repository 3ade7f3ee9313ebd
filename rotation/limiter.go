package rotation

import (
	"context"
	"net/http"
	"strconv"
	"sync"
	"time"
)

// Limiter bounds how many rewrite requests are in flight and adapts the bound
// (AIMD) to what the apiserver shows, and halves and pauses on a 429 for as
// long as Retry-After asks.
//
// The signal is the latency of a probe: a cheap request another client
// would send, timed by the Rewriter every ProbeInterval while it rewrites
// and compared with the probe's median on the idle apiserver before the
// rewrite started (SetProbeBaseline). The limit grows slowly while the
// smoothed probe latency stays within Tolerance times that idle baseline
// and shrinks multiplicatively when it climbs past it. The patches' own
// latency is not used then: measured under the rewrite's own load, its
// baseline already includes the queueing the rewrite causes, so it let
// other clients' p99 rise to 3-4x idle in make bench-rotation.
//
// Without a probe baseline the patches' latency drives the limit as a
// fallback: it grows by one per window of successful patches while their
// latency stays near the lowest seen, and shrinks when it climbs past
// Tolerance times that. Safe for concurrent use.
type Limiter struct {
	min, max  float64
	floor     float64
	tolerance float64
	now       func() time.Time

	mu           sync.Mutex
	changed      chan struct{}
	limit        float64
	inFlight     int
	ewma         float64 // seconds
	baseline     float64 // seconds
	pauseUntil   time.Time
	lastDecrease time.Time
	throttled    int64

	probeBase float64 // seconds; 0 until SetProbeBaseline
	probeEWMA float64 // seconds
}

// Probe control constants, tuned with make bench-rotation (see
// docs/BENCHMARKS.md). A probe every ProbeInterval with a smoothing weight
// of 0.3 reacts within a few hundred milliseconds while one slow probe (a
// garbage collection, a scheduling hiccup) moves the average by less than
// a third of its excess.
const (
	probeWeight = 0.3
	// probeGrowth is added to the limit per probe within tolerance: about
	// +2 per second at the default interval, slow enough that the limit
	// does not overshoot between two probes.
	probeGrowth = 0.1
	// probeDecreaseGap spaces decreases so the effect of one shows in the
	// probes (a few of them, through the average) before the next.
	probeDecreaseGap = 300 * time.Millisecond
)

// LimiterConfig sets the bounds of a Limiter.
type LimiterConfig struct {
	// Min and Max bound the concurrency (defaults 1 and 32).
	Min, Max int
	// Floor is the lowest limit latency alone may set (default min(2,
	// Max)); only a 429, API Priority and Fairness's own signal, takes
	// it lower, down to Min. On a control plane slowed by something else
	// (a neighbour's build, a busy etcd) rising latency would otherwise
	// drive the rewrite to one patch at a time, slower than the serial
	// `kubectl get | kubectl replace` an operator could run instead: two
	// patches in flight keep at least that rate, and under the shipped
	// FlowSchema they wait in the rotation's own priority level, not in
	// other clients' queues.
	Floor int
	// Initial is the starting concurrency (default min(4, Max)).
	Initial int
	// Tolerance is how many times the baseline latency (the probe's on the
	// idle apiserver, else the patches' lowest) may be reached before the
	// limit shrinks (default 2).
	Tolerance float64
}

// NewLimiter returns a Limiter from cfg with defaults filled in.
func NewLimiter(cfg LimiterConfig) *Limiter {
	if cfg.Min <= 0 {
		cfg.Min = 1
	}
	if cfg.Max <= 0 {
		cfg.Max = 32
	}
	if cfg.Max < cfg.Min {
		cfg.Max = cfg.Min
	}
	if cfg.Initial <= 0 {
		cfg.Initial = min(4, cfg.Max)
	}
	cfg.Initial = max(cfg.Min, min(cfg.Initial, cfg.Max))
	if cfg.Floor <= 0 {
		cfg.Floor = 2
	}
	cfg.Floor = max(cfg.Min, min(cfg.Floor, cfg.Max))
	if cfg.Tolerance <= 1 {
		cfg.Tolerance = 2
	}
	return &Limiter{
		min: float64(cfg.Min), max: float64(cfg.Max), floor: float64(cfg.Floor), tolerance: cfg.Tolerance,
		now: time.Now, changed: make(chan struct{}), limit: float64(cfg.Initial),
	}
}

// Acquire waits for a slot (or ctx).
func (l *Limiter) Acquire(ctx context.Context) error {
	for {
		l.mu.Lock()
		now := l.now()
		if l.inFlight < int(l.limit) && !now.Before(l.pauseUntil) {
			l.inFlight++
			l.mu.Unlock()
			return nil
		}
		ch := l.changed
		var t *time.Timer
		var wait <-chan time.Time
		if now.Before(l.pauseUntil) {
			t = time.NewTimer(l.pauseUntil.Sub(now))
			wait = t.C
		}
		l.mu.Unlock()
		select {
		case <-ctx.Done():
		case <-ch:
		case <-wait:
		}
		if t != nil {
			t.Stop()
		}
		if err := ctx.Err(); err != nil {
			return err
		}
	}
}

// Release frees a slot and feeds the request's latency into the controller.
// ok says the request was answered normally (any status but 429/5xx).
func (l *Limiter) Release(latency time.Duration, ok bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.inFlight--
	if ok {
		l.observe(latency.Seconds())
	}
	l.notify()
}

func (l *Limiter) observe(lat float64) {
	if l.probeBase > 0 {
		// The probe drives the limit; keep the patches' average for
		// progress lines only.
		if l.ewma == 0 {
			l.ewma = lat
		}
		l.ewma = 0.8*l.ewma + 0.2*lat
		return
	}
	if l.ewma == 0 {
		l.ewma, l.baseline = lat, lat
		return
	}
	l.ewma = 0.8*l.ewma + 0.2*lat
	if l.ewma < l.baseline {
		l.baseline = l.ewma
	} else {
		// Drift up very slowly, so a baseline caught in an unusually quiet
		// moment does not throttle the rewrite forever.
		l.baseline += (l.ewma - l.baseline) * 0.002
	}
	now := l.now()
	if l.ewma > l.tolerance*l.baseline {
		// Decrease at most once per latency window, so one slow burst does
		// not collapse the limit.
		if now.Sub(l.lastDecrease) > time.Duration(l.ewma*float64(time.Second))+50*time.Millisecond {
			l.limit = max(min(l.floor, l.limit), l.limit*0.7)
			l.lastDecrease = now
		}
		return
	}
	l.limit = min(l.max, l.limit+1/l.limit)
}

// SetProbeBaseline sets the probe's latency on the idle apiserver and from
// then on lets probe latencies (ObserveProbe), not the patches', drive the
// limit. A baseline of zero or less is ignored.
func (l *Limiter) SetProbeBaseline(d time.Duration) {
	if d <= 0 {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.probeBase = d.Seconds()
	l.probeEWMA = 0
}

// HasProbeBaseline reports whether SetProbeBaseline was called.
func (l *Limiter) HasProbeBaseline() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.probeBase > 0
}

// ObserveProbe feeds one probe's latency into the controller: shrink by
// 30% (at most once per probeDecreaseGap) while the smoothed probe latency
// is past Tolerance times the idle baseline, grow by probeGrowth otherwise.
// Without a baseline it does nothing.
func (l *Limiter) ObserveProbe(latency time.Duration) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.probeBase <= 0 {
		return
	}
	lat := latency.Seconds()
	if l.probeEWMA == 0 {
		l.probeEWMA = lat
	} else {
		l.probeEWMA = (1-probeWeight)*l.probeEWMA + probeWeight*lat
	}
	now := l.now()
	if l.probeEWMA > l.tolerance*l.probeBase {
		if now.Sub(l.lastDecrease) >= probeDecreaseGap {
			l.limit = max(min(l.floor, l.limit), l.limit*0.7)
			l.lastDecrease = now
		}
	} else {
		l.limit = min(l.max, l.limit+probeGrowth)
	}
	l.notify()
}

// Throttled records a 429 (or 503 with Retry-After): halve the limit and
// stop starting requests until retryAfter has passed.
func (l *Limiter) Throttled(retryAfter time.Duration) {
	if retryAfter <= 0 {
		retryAfter = time.Second
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.throttled++
	now := l.now()
	if now.Sub(l.lastDecrease) > 200*time.Millisecond {
		l.limit = max(l.min, l.limit/2)
		l.lastDecrease = now
	}
	if until := now.Add(retryAfter); until.After(l.pauseUntil) {
		l.pauseUntil = until
	}
	l.notify()
}

func (l *Limiter) notify() {
	close(l.changed)
	l.changed = make(chan struct{})
}

// LimiterStats is a snapshot for progress lines and metrics.
type LimiterStats struct {
	Limit    int
	InFlight int
	// Latency is the smoothed latency that drives the limit (the probe's
	// once it has a baseline, else the patches'); Baseline is what it is
	// compared with.
	Latency   time.Duration
	Baseline  time.Duration
	Throttled int64
}

// Stats returns the current state.
func (l *Limiter) Stats() LimiterStats {
	l.mu.Lock()
	defer l.mu.Unlock()
	lat, base := l.ewma, l.baseline
	if l.probeBase > 0 {
		lat, base = l.probeEWMA, l.probeBase
	}
	return LimiterStats{
		Limit: int(l.limit), InFlight: l.inFlight, Throttled: l.throttled,
		Latency:  time.Duration(lat * float64(time.Second)),
		Baseline: time.Duration(base * float64(time.Second)),
	}
}

// ObserveTransport wraps an HTTP transport so every response the apiserver
// sends (including the 429s client-go retries on its own, which the caller
// never sees) reaches the limiter. API Priority and Fairness rejects with
// 429 and Retry-After; that is the signal taken.
func (l *Limiter) ObserveTransport(rt http.RoundTripper) http.RoundTripper {
	return roundTripFunc(func(req *http.Request) (*http.Response, error) {
		resp, err := rt.RoundTrip(req)
		if err == nil && (resp.StatusCode == http.StatusTooManyRequests ||
			resp.StatusCode == http.StatusServiceUnavailable && resp.Header.Get("Retry-After") != "") {
			l.Throttled(retryAfter(resp.Header.Get("Retry-After")))
		}
		return resp, err
	})
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// retryAfter parses a Retry-After header in seconds (the form the apiserver
// sends); anything else counts as one second.
func retryAfter(h string) time.Duration {
	if s, err := strconv.Atoi(h); err == nil && s >= 0 {
		return time.Duration(s) * time.Second
	}
	return time.Second
}
