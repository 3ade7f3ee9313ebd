package rotation

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kms-v2/kms-plugin/rotation/etcdlayout"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

// seed stores n secrets per namespace under keyID.
func seed(t testing.TB, e *fakeEtcd, resource, keyID string, n int) {
	for i := range n {
		e.put(fmt.Sprintf("/registry/%s/ns%d/obj-%04d", resource, i%3, i), kmsValue(t, keyID))
	}
}

func newTestRewriter(t testing.TB, a *fakeAPIServer) *Rewriter {
	l := NewLimiter(LimiterConfig{Max: 8})
	return &Rewriter{Client: a.metadata(t, l), Limiter: l, Workers: 8, PageSize: 7, Attempts: 3}
}

func TestRewriteListed(t *testing.T) {
	tests := []struct {
		name          string
		stale, fresh  int
		onPatch       func(key string) (int, string)
		wantRewritten int64
		wantUnchanged int64
		wantConflicts int64
		wantSkipped   int64
		wantErrors    int64
	}{
		{name: "stale objects are rewritten, current ones untouched", stale: 30, fresh: 10, wantRewritten: 30, wantUnchanged: 10},
		{
			name: "409 counts as written meanwhile", stale: 10,
			onPatch: func(key string) (int, string) {
				if strings.HasSuffix(key, "obj-0003") {
					return http.StatusConflict, ""
				}
				return 0, ""
			},
			wantRewritten: 9, wantConflicts: 1,
		},
		{
			name: "404 is skipped", stale: 10,
			onPatch: func(key string) (int, string) {
				if strings.HasSuffix(key, "obj-0004") {
					return http.StatusNotFound, ""
				}
				return 0, ""
			},
			wantRewritten: 9, wantSkipped: 1,
		},
		{
			name: "a persistent 500 is retried then reported", stale: 10,
			onPatch: func(key string) (int, string) {
				if strings.HasSuffix(key, "obj-0005") {
					return http.StatusInternalServerError, ""
				}
				return 0, ""
			},
			wantRewritten: 9, wantErrors: 1,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newFakeEtcd()
			seed(t, e, "secrets", "file:k/1", tt.stale)
			for i := range tt.fresh {
				e.put(fmt.Sprintf("/registry/secrets/fresh/obj-%04d", i), kmsValue(t, "file:k/2"))
			}
			a := newFakeAPIServer(t, e, "file:k/2")
			a.onPatch = tt.onPatch
			st, err := newTestRewriter(t, a).RewriteListed(context.Background(), mustResource(t, "secrets"))
			if err != nil {
				t.Fatal(err)
			}
			for _, c := range []struct {
				what      string
				got, want int64
			}{
				{"rewritten", st.Rewritten, tt.wantRewritten}, {"unchanged", st.Unchanged, tt.wantUnchanged},
				{"conflicts", st.Conflicts, tt.wantConflicts}, {"skipped", st.Skipped, tt.wantSkipped},
				{"errors", st.Errors, tt.wantErrors},
			} {
				if c.got != c.want {
					t.Errorf("%s: got %d, want %d", c.what, c.got, c.want)
				}
			}
		})
	}
}

func TestRewriteRetriesThrottledPatches(t *testing.T) {
	e := newFakeEtcd()
	seed(t, e, "secrets", "file:k/1", 20)
	a := newFakeAPIServer(t, e, "file:k/2")
	var throttled atomic.Int64
	a.onPatch = func(string) (int, string) {
		if throttled.Add(1) <= 3 {
			return http.StatusTooManyRequests, "0"
		}
		return 0, ""
	}
	w := newTestRewriter(t, a)
	st, err := w.RewriteListed(context.Background(), mustResource(t, "secrets"))
	if err != nil {
		t.Fatal(err)
	}
	if got, want := st.Rewritten, int64(20); got != want {
		t.Errorf("rewritten: got %d, want %d (429s are retried)", got, want)
	}
	if got := w.Limiter.Stats().Throttled; got == 0 {
		t.Errorf("limiter saw %d throttles, want the 429s counted", got)
	}
}

func TestRewriteStalePatchesOnlyStale(t *testing.T) {
	e := newFakeEtcd()
	seed(t, e, "secrets", "file:k/2", 50)
	e.put("/registry/secrets/ns1/old-a", kmsValue(t, "file:k/1"))
	e.put("/registry/secrets/ns2/old-b", kmsValue(t, "file:k/1"))
	a := newFakeAPIServer(t, e, "file:k/2")
	st, err := newTestRewriter(t, a).RewriteStale(context.Background(), mustResource(t, "secrets"), e.etcd(), etcdlayout.KMSv2Writer("test", "file:k/2"))
	if err != nil {
		t.Fatal(err)
	}
	if got, want := a.patches, 2; got != want {
		t.Errorf("patches: got %d, want %d (only the stale objects)", got, want)
	}
	if got, want := st.Rewritten, int64(2); got != want {
		t.Errorf("rewritten: got %d, want %d", got, want)
	}
	if got, want := a.lists, 0; got != want {
		t.Errorf("lists: got %d, want %d (the etcd scan drives the pass)", got, want)
	}
}

func TestRewriteBoundsConcurrency(t *testing.T) {
	e := newFakeEtcd()
	seed(t, e, "secrets", "file:k/1", 60)
	a := newFakeAPIServer(t, e, "file:k/2")
	var inFlight, peak atomic.Int64
	a.onPatch = func(string) (int, string) {
		n := inFlight.Add(1)
		for {
			p := peak.Load()
			if n <= p || peak.CompareAndSwap(p, n) {
				break
			}
		}
		time.Sleep(5 * time.Millisecond)
		inFlight.Add(-1)
		return 0, ""
	}
	w := newTestRewriter(t, a)
	w.Limiter = NewLimiter(LimiterConfig{Max: 3})
	w.Workers = 16
	if _, err := w.RewriteListed(context.Background(), mustResource(t, "secrets")); err != nil {
		t.Fatal(err)
	}
	if got, want := peak.Load(), int64(3); got > want {
		t.Errorf("peak patches in flight: got %d, want at most %d", got, want)
	}
}

func TestRewriteProbes(t *testing.T) {
	tests := []struct {
		name      string
		tolerance float64
		// probe answers the n-th probe (from 1); the first 21 make the
		// idle baseline.
		probe        func(n int64) error
		wantBaseline bool
		wantPeak     int64 // most patches in flight, at most
		wantLimit    int   // limit at the end, at least
	}{
		{
			name: "probes slower than before the rewrite hold the limit at its start", tolerance: 2,
			probe: func(n int64) error {
				if n > probeBaselineSamples {
					time.Sleep(20 * time.Millisecond)
				}
				return nil
			},
			wantBaseline: true, wantPeak: 1, wantLimit: 1,
		},
		{
			name: "probes as fast as before the rewrite let the limit grow", tolerance: 10,
			probe: func(int64) error {
				time.Sleep(time.Millisecond)
				return nil
			},
			wantBaseline: true, wantPeak: 8, wantLimit: 2,
		},
		{
			name: "an answered error still times the request path", tolerance: 2,
			probe: func(n int64) error {
				if n > probeBaselineSamples {
					time.Sleep(20 * time.Millisecond)
				}
				return apierrors.NewNotFound(schema.GroupResource{Resource: "leases"}, "x")
			},
			wantBaseline: true, wantPeak: 1, wantLimit: 1,
		},
		{
			name: "unanswered probes leave the patches' latency in charge", tolerance: 2,
			probe:        func(int64) error { return errors.New("connection refused") },
			wantBaseline: false, wantPeak: 8, wantLimit: 1,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newFakeEtcd()
			seed(t, e, "secrets", "file:k/1", 100)
			a := newFakeAPIServer(t, e, "file:k/2")
			var inFlight, peak atomic.Int64
			a.onPatch = func(string) (int, string) {
				n := inFlight.Add(1)
				for {
					p := peak.Load()
					if n <= p || peak.CompareAndSwap(p, n) {
						break
					}
				}
				time.Sleep(3 * time.Millisecond)
				inFlight.Add(-1)
				return 0, ""
			}
			w := newTestRewriter(t, a)
			w.Limiter = NewLimiter(LimiterConfig{Max: 8, Initial: 1, Tolerance: tt.tolerance})
			var probes atomic.Int64
			w.Probe = func(context.Context) error { return tt.probe(probes.Add(1)) }
			w.ProbeInterval = 2 * time.Millisecond
			st, err := w.RewriteListed(context.Background(), mustResource(t, "secrets"))
			if err != nil {
				t.Fatal(err)
			}
			if got, want := st.Rewritten, int64(100); got != want {
				t.Errorf("rewritten: got %d, want %d", got, want)
			}
			if got := w.Limiter.HasProbeBaseline(); got != tt.wantBaseline {
				t.Errorf("probe baseline set: got %v, want %v", got, tt.wantBaseline)
			}
			if got := probes.Load(); got <= probeBaselineSamples {
				t.Errorf("probes: got %d, want more than the %d of the baseline (probing during the pass)", got, probeBaselineSamples)
			}
			if got := peak.Load(); got > tt.wantPeak {
				t.Errorf("peak patches in flight: got %d, want at most %d", got, tt.wantPeak)
			}
			if got := w.Limiter.Stats().Limit; got < tt.wantLimit {
				t.Errorf("limit at the end: got %d, want at least %d", got, tt.wantLimit)
			}
		})
	}
}
