package azurekv

import (
	"fmt"
	"sync"
	"time"

	"github.com/kms-v2/kms-plugin/providers"
)

// breaker stops calls to a vault that keeps failing, so an outage or a
// throttling storm does not pile up goroutines, sockets and retries while
// every caller waits out its deadline. After threshold consecutive
// outage-class failures (or one 429 whose Retry-After says to stay away) it
// opens: calls fail at once with ErrUnavailable. When the open period ends,
// one call goes through as a probe; its success closes the breaker, its
// failure opens it again. Safe for concurrent use.
type breaker struct {
	threshold int
	minOpen   time.Duration
	maxOpen   time.Duration
	now       func() time.Time
	onChange  func(open bool, until time.Time, cause error)

	mu        sync.Mutex
	failures  int
	openUntil time.Time
	probing   bool
	open      bool
}

func newBreaker(onChange func(bool, time.Time, error)) *breaker {
	return &breaker{threshold: 5, minOpen: time.Second, maxOpen: 30 * time.Second, now: time.Now, onChange: onChange}
}

// allow reports whether a call may go out; when it may, done must be called
// with its result.
func (b *breaker) allow() (done func(err error), err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	probe := false
	if b.open {
		if now := b.now(); now.Before(b.openUntil) || b.probing {
			return nil, fmt.Errorf("azurekv: circuit open after repeated failures, retrying after %s: %w",
				b.openUntil.Format(time.RFC3339), providers.ErrUnavailable)
		}
		b.probing, probe = true, true
	}
	return func(err error) { b.record(err, probe) }, nil
}

func (b *breaker) record(err error, probe bool) {
	b.mu.Lock()
	if probe {
		b.probing = false
	}
	if !countsAsOutage(err) {
		// Any answer that is not an outage (success, or a 400 for a bad
		// ciphertext) shows the vault is reachable.
		wasOpen := b.open
		b.failures, b.open = 0, false
		b.mu.Unlock()
		if wasOpen && b.onChange != nil {
			b.onChange(false, time.Time{}, err)
		}
		return
	}
	b.failures++
	ra := retryAfter(err)
	if !(probe || b.failures >= b.threshold || ra > b.minOpen) {
		b.mu.Unlock()
		return
	}
	d := max(ra, b.minOpen)
	d = min(d, b.maxOpen)
	b.open, b.openUntil = true, b.now().Add(d)
	until := b.openUntil
	b.mu.Unlock()
	if b.onChange != nil {
		b.onChange(true, until, err)
	}
}

// state reports the breaker's state for metrics: open while calls fail
// fast or wait for the probe's turn, half open while the probe is out.
func (b *breaker) state() providers.BreakerState {
	b.mu.Lock()
	defer b.mu.Unlock()
	switch {
	case !b.open:
		return providers.BreakerClosed
	case b.probing:
		return providers.BreakerHalfOpen
	}
	return providers.BreakerOpen
}
