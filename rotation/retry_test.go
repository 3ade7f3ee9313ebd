package rotation

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"testing/synctest"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/util/wait"
)

// TestRetry runs Rewriter.retry in a synctest bubble, so the real back-off
// (200 ms doubling to 5 s, +0..20% jitter) passes in fake time and the
// pauses can be checked exactly.
func TestRetry(t *testing.T) {
	unavailable := func(call int) error {
		return apierrors.NewServiceUnavailable(fmt.Sprintf("apiserver restarting (call %d)", call))
	}
	conflict := apierrors.NewConflict(schema.GroupResource{Resource: "secrets"}, "s1", errors.New("object was modified"))
	tests := []struct {
		name     string
		attempts int
		// timeout, when set, ends ctx that long after retry starts.
		timeout time.Duration
		// op answers the call-th call (from 1); cancel ends ctx.
		op        func(call int, cancel func()) error
		wantCalls int
		wantNil   bool
		wantErr   func(error) bool
		// The time retry takes is all pauses: between the un-jittered sum
		// and that sum +20%.
		wantMin, wantMax time.Duration
		// jittered pauses are longer than the un-jittered sum.
		jittered bool
	}{
		{
			name:     "succeeds after 2 failures",
			attempts: 8,
			op: func(call int, _ func()) error {
				if call <= 2 {
					return unavailable(call)
				}
				return nil
			},
			wantCalls: 3, wantNil: true,
			wantMin: 600 * time.Millisecond, wantMax: 720 * time.Millisecond, jittered: true,
		},
		{
			name:      "a 409 is permanent: no retry, and the caller still sees a conflict",
			attempts:  8,
			op:        func(int, func()) error { return conflict },
			wantCalls: 1, wantErr: apierrors.IsConflict,
		},
		{
			name:      "a 404 is permanent",
			attempts:  8,
			op:        func(int, func()) error { return apierrors.NewNotFound(schema.GroupResource{Resource: "secrets"}, "s1") },
			wantCalls: 1, wantErr: apierrors.IsNotFound,
		},
		{
			name:     "ctx cancelled while op runs: no further try",
			attempts: 8,
			op: func(call int, cancel func()) error {
				cancel()
				return unavailable(call)
			},
			wantCalls: 1, wantErr: apierrors.IsServiceUnavailable,
		},
		{
			name:     "ctx ends during a pause: stops then, returns op's error, not ctx's",
			attempts: 8,
			// Tries at 0, 200-240 ms and 600-720 ms; the next pause (800 ms
			// or more) is cut at 1 s.
			timeout:   time.Second,
			op:        func(call int, _ func()) error { return unavailable(call) },
			wantCalls: 3, wantErr: apierrors.IsServiceUnavailable,
			wantMin: time.Second, wantMax: time.Second,
		},
		{
			name:      "gives up after Attempts and returns the last error",
			attempts:  3,
			op:        func(call int, _ func()) error { return unavailable(call) },
			wantCalls: 3, wantErr: apierrors.IsServiceUnavailable,
			wantMin: 600 * time.Millisecond, wantMax: 720 * time.Millisecond,
		},
		{
			name: "default Attempts is 8, pauses capped at 5 s",
			// 200+400+800+1600+3200+5000+5000 ms; a back-off that stops at
			// the cap gives up after 5 tries.
			op:        func(call int, _ func()) error { return unavailable(call) },
			wantCalls: 8, wantErr: apierrors.IsServiceUnavailable,
			wantMin: 16200 * time.Millisecond, wantMax: 19440 * time.Millisecond, jittered: true,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				ctx, cancel := context.WithCancel(t.Context())
				defer cancel()
				if tt.timeout > 0 {
					ctx, cancel = context.WithTimeout(ctx, tt.timeout)
					defer cancel()
				}
				w := &Rewriter{Attempts: tt.attempts}
				calls := 0
				var last error
				start := time.Now()
				err := w.retry(ctx, func() error {
					calls++
					last = tt.op(calls, cancel)
					return last
				})
				took := time.Since(start)
				if calls != tt.wantCalls {
					t.Errorf("op ran %d times, want %d", calls, tt.wantCalls)
				}
				if tt.wantNil {
					if err != nil {
						t.Errorf("retry = %v, want nil", err)
					}
				} else {
					if err != last { //nolint:errorlint // retry must return op's error itself, unwrapped
						t.Errorf("retry = %v, want op's last error %v", err, last)
					}
					if !tt.wantErr(err) {
						t.Errorf("retry = %v: wrong kind of error", err)
					}
					if wait.Interrupted(err) || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
						t.Errorf("retry = %v: the back-off's or ctx's error, not op's", err)
					}
				}
				if took < tt.wantMin || took > tt.wantMax {
					t.Errorf("retry took %v, want %v..%v", took, tt.wantMin, tt.wantMax)
				}
				if tt.jittered && took == tt.wantMin {
					t.Errorf("retry took exactly %v: the pauses have no jitter to spread many workers' retries", took)
				}
			})
		})
	}
}
