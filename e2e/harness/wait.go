package harness

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// permanent wraps an error that makes further polling pointless (the
// process died), so a wait fails at once instead of at its deadline.
type permanent struct{ err error }

func (p permanent) Error() string { return p.err.Error() }
func (p permanent) Unwrap() error { return p.err }

// StopPolling marks err as final: Poll returns it at once.
func StopPolling(err error) error { return permanent{err} }

// Poll calls f every interval until it returns nil, returns a permanent
// error, or ctx ends; the error then carries f's last complaint, which is
// what a reader of the failure needs.
func Poll(ctx context.Context, interval time.Duration, f func() error) error {
	start := time.Now()
	for {
		err := f()
		if err == nil {
			return nil
		}
		var p permanent
		if errors.As(err, &p) {
			return p.err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("gave up after %s: %w", time.Since(start).Round(time.Millisecond), err)
		case <-time.After(interval):
		}
	}
}
