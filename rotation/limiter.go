package rotation

import (
	"context"
	"net/http"
	"strconv"
	"sync"
	"time"
)

// Limiter bounds how many rewrite requests are in flight and adapts the bound
// (AIMD) to what the apiserver shows: it grows by one per window of
// successful requests while latency stays near the baseline seen at low
// load, shrinks multiplicatively when latency climbs past Tolerance times
// that baseline, and halves and pauses on a 429 for as long as Retry-After
// asks. The rewrite therefore takes the capacity the control plane has
// spare and gives it back when other clients need it. Safe for concurrent
// use.
type Limiter struct {
	min, max  float64
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
}

// LimiterConfig sets the bounds of a Limiter.
type LimiterConfig struct {
	// Min and Max bound the concurrency (defaults 1 and 32).
	Min, Max int
	// Initial is the starting concurrency (default min(4, Max)).
	Initial int
	// Tolerance is how many times the baseline latency may be reached
	// before the limit shrinks (default 2).
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
	if cfg.Tolerance <= 1 {
		cfg.Tolerance = 2
	}
	return &Limiter{
		min: float64(cfg.Min), max: float64(cfg.Max), tolerance: cfg.Tolerance,
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
			l.limit = max(l.min, l.limit*0.7)
			l.lastDecrease = now
		}
		return
	}
	l.limit = min(l.max, l.limit+1/l.limit)
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
	Limit     int
	InFlight  int
	Latency   time.Duration
	Baseline  time.Duration
	Throttled int64
}

// Stats returns the current state.
func (l *Limiter) Stats() LimiterStats {
	l.mu.Lock()
	defer l.mu.Unlock()
	return LimiterStats{
		Limit: int(l.limit), InFlight: l.inFlight, Throttled: l.throttled,
		Latency:  time.Duration(l.ewma * float64(time.Second)),
		Baseline: time.Duration(l.baseline * float64(time.Second)),
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
