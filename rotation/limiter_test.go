package rotation

import (
	"context"
	"strconv"
	"testing"
	"time"
)

func TestLimiterAIMD(t *testing.T) {
	tests := []struct {
		name string
		// feed drives the limiter; it returns nothing.
		feed      func(l *Limiter)
		wantAbove int
		wantBelow int
	}{
		{
			name: "steady latency grows the limit to the max",
			feed: func(l *Limiter) {
				for range 1000 {
					l.inFlight++
					l.Release(10*time.Millisecond, true)
				}
			},
			wantAbove: 31, wantBelow: 33,
		},
		{
			name: "latency far above the baseline shrinks it",
			feed: func(l *Limiter) {
				for range 200 {
					l.inFlight++
					l.Release(10*time.Millisecond, true)
				}
				for range 50 {
					l.inFlight++
					l.Release(200*time.Millisecond, true)
					l.lastDecrease = time.Time{} // let every sample count
				}
			},
			wantAbove: 0, wantBelow: 3,
		},
		{
			name: "a 429 halves it",
			feed: func(l *Limiter) {
				l.limit = 16
				l.Throttled(0)
			},
			wantAbove: 7, wantBelow: 9,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l := NewLimiter(LimiterConfig{Max: 32})
			tt.feed(l)
			got := l.Stats().Limit
			if got <= tt.wantAbove || got >= tt.wantBelow {
				t.Errorf("limit: got %d, want in (%d, %d)", got, tt.wantAbove, tt.wantBelow)
			}
		})
	}
}

func TestLimiterRetryAfterPauses(t *testing.T) {
	l := NewLimiter(LimiterConfig{Max: 4})
	l.Throttled(time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	if err := l.Acquire(ctx); err == nil {
		t.Fatalf("Acquire during a Retry-After pause: got a slot after %s, want to wait", time.Since(start))
	}
	if err := l.Acquire(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got, want := time.Since(start), 900*time.Millisecond; got < want {
		t.Errorf("slot after %s, want at least %s", got, want)
	}
}

func TestLimiterBoundsInFlight(t *testing.T) {
	l := NewLimiter(LimiterConfig{Max: 2, Initial: 2})
	ctx := context.Background()
	for range 2 {
		if err := l.Acquire(ctx); err != nil {
			t.Fatal(err)
		}
	}
	short, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	if err := l.Acquire(short); err == nil {
		t.Fatal("third Acquire with limit 2: got a slot, want to wait")
	}
	l.Release(time.Millisecond, true)
	if err := l.Acquire(ctx); err != nil {
		t.Fatalf("Acquire after Release: %v", err)
	}
}

// fakeClock is a settable clock for the limiter's decrease spacing.
type fakeClock struct{ t time.Time }

func (c *fakeClock) now() time.Time          { return c.t }
func (c *fakeClock) advance(d time.Duration) { c.t = c.t.Add(d) }

func TestLimiterProbe(t *testing.T) {
	const idle = 2 * time.Millisecond
	tests := []struct {
		name    string
		initial int
		// feed sends probe latencies (and patch latencies) 50 ms apart.
		feed func(l *Limiter, c *fakeClock)
		want int
	}{
		{
			name: "probes at the idle latency ramp the limit up slowly", initial: 1,
			feed: func(l *Limiter, c *fakeClock) {
				for range 20 { // one second
					c.advance(50 * time.Millisecond)
					l.ObserveProbe(idle)
				}
			},
			want: 3, // 1 + 20*0.1
		},
		{
			name: "probes past the tolerance shrink it, spaced by the decrease gap", initial: 16,
			feed: func(l *Limiter, c *fakeClock) {
				for range 13 { // 650 ms: decreases at 50, 350 and 650 ms
					c.advance(50 * time.Millisecond)
					l.ObserveProbe(4 * idle)
				}
			},
			want: 5, // 16 * 0.7^3 = 5.5
		},
		{
			name: "one slow probe is smoothed away", initial: 4,
			feed: func(l *Limiter, c *fakeClock) {
				l.ObserveProbe(idle)
				c.advance(50 * time.Millisecond)
				l.ObserveProbe(3 * idle) // average 1.6x idle, within 2x
			},
			want: 4,
		},
		{
			name: "slow patches do not shrink it once a probe baseline is set", initial: 8,
			feed: func(l *Limiter, c *fakeClock) {
				for range 50 {
					c.advance(50 * time.Millisecond)
					l.inFlight++
					l.Release(time.Duration(1+l.inFlight)*100*time.Millisecond, true)
				}
			},
			want: 8,
		},
		{
			name: "the limit stays within its bounds", initial: 2,
			feed: func(l *Limiter, c *fakeClock) {
				for range 100 {
					c.advance(time.Second)
					l.ObserveProbe(10 * idle)
				}
				if got := l.Stats().Limit; got != 2 {
					panic("limit under load: " + strconv.Itoa(got) + ", want the floor 2")
				}
				for range 1000 {
					c.advance(50 * time.Millisecond)
					l.ObserveProbe(idle)
				}
			},
			want: 32,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := &fakeClock{t: time.Unix(1e9, 0)}
			l := NewLimiter(LimiterConfig{Max: 32, Initial: tt.initial, Tolerance: 2})
			l.now = c.now
			l.SetProbeBaseline(idle)
			tt.feed(l, c)
			if got := l.Stats().Limit; got != tt.want {
				t.Errorf("limit: got %d, want %d", got, tt.want)
			}
		})
	}
}

func TestLimiterProbeNeedsBaseline(t *testing.T) {
	l := NewLimiter(LimiterConfig{Max: 32, Initial: 4})
	for range 100 {
		l.ObserveProbe(time.Second)
	}
	if got, want := l.Stats().Limit, 4; got != want {
		t.Errorf("limit after probes without a baseline: got %d, want %d (probes ignored)", got, want)
	}
	l.SetProbeBaseline(0)
	if l.HasProbeBaseline() {
		t.Error("HasProbeBaseline after SetProbeBaseline(0): got true, want false")
	}
}

// TestLimiterKeepsSerialRate: latency that stays high, whatever causes it,
// never takes the rewrite below two patches in flight, so it keeps at least
// the rate of the serial kubectl method; a 429 (APF's signal) still takes it
// to one and pauses it.
func TestLimiterKeepsSerialRate(t *testing.T) {
	const idle = 2 * time.Millisecond
	c := &fakeClock{t: time.Unix(1e9, 0)}
	l := NewLimiter(LimiterConfig{Max: 32, Initial: 16, Tolerance: 2})
	l.now = c.now
	l.SetProbeBaseline(idle)
	for range 200 {
		c.advance(time.Second)
		l.ObserveProbe(50 * idle)
		l.inFlight++
		l.Release(time.Second, true) // slow patches too
	}
	ctx := context.Background()
	for i := range 2 {
		short, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
		err := l.Acquire(short)
		cancel()
		if err != nil {
			t.Fatalf("patch %d of 2 under a high probe latency: no slot (limit %d); the rewrite fell below two in flight", i+1, l.Stats().Limit)
		}
	}
	short, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	if err := l.Acquire(short); err == nil {
		t.Fatalf("a third patch under a high probe latency got a slot (limit %d), want the floor of 2", l.Stats().Limit)
	}
	l.Release(time.Second, true)
	l.Release(time.Second, true)
	c.advance(time.Second)
	l.Throttled(time.Millisecond)
	if got := l.Stats().Limit; got != 1 {
		t.Errorf("after a 429 at the floor: limit %d, want 1 (a 429 may go below the floor)", got)
	}
}
