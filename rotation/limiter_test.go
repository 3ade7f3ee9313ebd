package rotation

import (
	"context"
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
