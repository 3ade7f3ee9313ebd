package rotation

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/metadata"

	"github.com/kms-v2/kms-plugin/rotation/etcdlayout"
)

// DefaultPageSize is the LIST page size of the rewrite and the etcd page
// size of the census: large enough to be cheap, small enough that memory
// does not depend on the cluster's size.
const DefaultPageSize = 500

// RewriteStats counts what one rewrite pass did to one resource.
type RewriteStats struct {
	Resource string `json:"resource"`
	// Visited is every object the pass sent a patch for.
	Visited int64 `json:"visited"`
	// Rewritten objects got a new resourceVersion: they were stale and the
	// apiserver re-encrypted them with its current key.
	Rewritten int64 `json:"rewritten"`
	// Unchanged objects were already under the current key (no-op patch).
	Unchanged int64 `json:"unchanged"`
	// Conflicts were written by someone else since they were listed (409);
	// that write used the current key, and the census checks it.
	Conflicts int64 `json:"conflicts"`
	// Skipped objects were deleted meanwhile (404).
	Skipped int64 `json:"skipped"`
	// Errors failed after every retry; the next census finds them.
	Errors int64 `json:"errors"`
	// FirstErrors holds a few of the error messages.
	FirstErrors []string `json:"firstErrors,omitempty"`
	Duration    Duration `json:"duration"`
	// DurationSeconds is Duration in seconds.
	DurationSeconds float64 `json:"durationSeconds"`
}

func (s *RewriteStats) add(o RewriteStats) {
	s.Visited += o.Visited
	s.Rewritten += o.Rewritten
	s.Unchanged += o.Unchanged
	s.Conflicts += o.Conflicts
	s.Skipped += o.Skipped
	s.Errors += o.Errors
	s.Duration += o.Duration
	s.DurationSeconds = s.Duration.Seconds()
	for _, e := range o.FirstErrors {
		if len(s.FirstErrors) < maxErrorSamples {
			s.FirstErrors = append(s.FirstErrors, e)
		}
	}
}

const maxErrorSamples = 10

// Rewriter re-encrypts objects by sending each the JSON merge patch that
// carries only its resourceVersion: it reads no data, is a no-op for an
// object already under the current key, rewrites a stale one, and fails with
// 409 if the object changed since it was listed. Safe for concurrent use by
// one pass at a time per resource.
type Rewriter struct {
	// Client talks to the apiserver with metadata-only requests.
	Client metadata.Interface
	// Limiter bounds and adapts the number of patches in flight.
	Limiter *Limiter
	// Workers is the number of goroutines (at least the Limiter's max).
	Workers int
	// PageSize is the LIST page size (default DefaultPageSize).
	PageSize int64
	// Attempts is how often a patch or a LIST page is tried before it
	// counts as an error (default 8, about 30 s of back-off, enough to ride
	// out an apiserver restart).
	Attempts int
	// Logger receives per-error details.
	Logger hclog.Logger
	// Progress, when set, is told about every object done.
	Progress *Progress
	// Metrics, when set, counts outcomes.
	Metrics *Metrics
	// Probe, when set, is a cheap request of the kind other clients send
	// (LeaseProbe: a GET of the rotation lease). Before the first pass the
	// Rewriter times probeBaselineSamples of them on the still idle
	// apiserver and gives the median to the Limiter as its baseline; during
	// every pass it times one each ProbeInterval and feeds the Limiter, so
	// the pace follows what other clients feel rather than the patches'
	// own latency. An error answered by the apiserver (a 404, a 403) still
	// times the request path; only a request without answer is not used.
	Probe func(context.Context) error
	// ProbeInterval is the time between probes (default
	// DefaultProbeInterval).
	ProbeInterval time.Duration
}

// DefaultProbeInterval is often enough for the limit to follow the
// apiserver within a few hundred milliseconds, at a cost (20 GETs of one
// small object per second) far below the rewrite's own.
const DefaultProbeInterval = 50 * time.Millisecond

// probeBaselineSamples are taken, one after the other, for the idle
// baseline; their median ignores an unlucky few.
const probeBaselineSamples = 21

// LeaseProbe returns a Rewriter.Probe that GETs the rotation lease: a small
// object that exists for the whole rewrite, read through the same
// authentication, priority and fairness, and storage path as other
// clients' requests (unlike /readyz, which skips most of them).
func LeaseProbe(kube dynamic.Interface) func(context.Context) error {
	return func(ctx context.Context) error {
		_, err := kube.Resource(LeaseGVR).Namespace(DefaultLeaseNamespace).Get(ctx, DefaultLeaseName, metav1.GetOptions{})
		return err
	}
}

// target is one object to patch.
type target struct {
	namespace, name string
	rv              string
}

// RewriteListed lists r as metadata only, page by page, and patches every
// object. The first pass after a promote uses it: nearly everything is
// stale then, and the list is cheaper than decoding every value from etcd.
func (w *Rewriter) RewriteListed(ctx context.Context, r Resource) (RewriteStats, error) {
	return w.run(ctx, r, func(ctx context.Context, out chan<- target) error {
		cont := ""
		for {
			var list *metav1.PartialObjectMetadataList
			err := w.retry(ctx, func() error {
				var err error
				list, err = w.Client.Resource(r.GVR).List(ctx, metav1.ListOptions{Limit: w.pageSize(), Continue: cont})
				if apierrors.IsResourceExpired(err) {
					// The continue token outlived etcd compaction: go on
					// from where the apiserver says, consistency is not
					// needed since the census checks afterwards.
					if st, ok := err.(apierrors.APIStatus); ok && st.Status().ListMeta.Continue != "" {
						cont = st.Status().ListMeta.Continue
					}
				}
				return err
			})
			if err != nil {
				return fmt.Errorf("list %s: %w", r.Name, err)
			}
			for i := range list.Items {
				m := &list.Items[i].ObjectMeta
				select {
				case out <- target{namespace: m.Namespace, name: m.Name, rv: m.ResourceVersion}:
				case <-ctx.Done():
					return ctx.Err()
				}
			}
			cont = list.Continue
			if cont == "" {
				return nil
			}
		}
	})
}

// RewriteStale patches only the objects a scan of etcd finds not stored as
// writer writes (another key_id or provider name, plaintext, another
// provider kind), using the mod revision from etcd as the resourceVersion.
// Later passes use it: they touch only what is left.
func (w *Rewriter) RewriteStale(ctx context.Context, r Resource, e Etcd, writer etcdlayout.Writer) (RewriteStats, error) {
	return w.run(ctx, r, func(ctx context.Context, out chan<- target) error {
		return ScanStale(ctx, e, r, writer, w.pageSize(), func(o StaleObject) error {
			select {
			case out <- target{namespace: o.Namespace, name: o.Name, rv: strconv.FormatInt(o.ResourceVersion, 10)}:
				return nil
			case <-ctx.Done():
				return ctx.Err()
			}
		})
	})
}

func (w *Rewriter) pageSize() int64 {
	if w.PageSize > 0 {
		return w.PageSize
	}
	return DefaultPageSize
}

// run streams targets from produce through a bounded worker pool; only
// counters accumulate, so memory does not grow with the object count.
func (w *Rewriter) run(ctx context.Context, r Resource, produce func(context.Context, chan<- target) error) (RewriteStats, error) {
	start := time.Now()
	workers := w.Workers
	if workers <= 0 {
		workers = 32
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	if w.Probe != nil {
		if !w.Limiter.HasProbeBaseline() {
			w.Limiter.SetProbeBaseline(w.probeBaseline(ctx))
		}
		probing := make(chan struct{})
		go func() {
			defer close(probing)
			w.probeLoop(ctx)
		}()
		defer func() { cancel(); <-probing }()
	}
	targets := make(chan target, workers)
	var (
		tally tally
		wg    sync.WaitGroup
	)
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			w.work(ctx, r, targets, &tally)
		}()
	}
	perr := produce(ctx, targets)
	close(targets)
	wg.Wait()
	stats := tally.stats(r.Name, time.Since(start))
	if perr == nil {
		perr = ctx.Err()
	}
	return stats, perr
}

// tally counts the outcomes of one pass across its workers.
type tally struct {
	visited, rewritten, unchanged, conflicts, skipped, errs atomic.Int64
	mu                                                      sync.Mutex
	samples                                                 []string
}

func (t *tally) count(o outcome) {
	switch o {
	case outcomeRewritten:
		t.rewritten.Add(1)
	case outcomeUnchanged:
		t.unchanged.Add(1)
	case outcomeConflict:
		t.conflicts.Add(1)
	case outcomeSkipped:
		t.skipped.Add(1)
	case outcomeError:
		t.errs.Add(1)
	}
}

func (t *tally) sample(msg string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(t.samples) < maxErrorSamples {
		t.samples = append(t.samples, msg)
	}
}

func (t *tally) stats(resource string, took time.Duration) RewriteStats {
	t.mu.Lock()
	defer t.mu.Unlock()
	return RewriteStats{
		Resource: resource, Visited: t.visited.Load(), Rewritten: t.rewritten.Load(), Unchanged: t.unchanged.Load(),
		Conflicts: t.conflicts.Load(), Skipped: t.skipped.Load(), Errors: t.errs.Load(), FirstErrors: t.samples,
		Duration: Duration(took), DurationSeconds: Duration(took).Seconds(),
	}
}

// work is one worker: it patches targets until the channel closes. An
// error after the run was cancelled is not the object's fault and is not
// counted.
func (w *Rewriter) work(ctx context.Context, r Resource, targets <-chan target, t *tally) {
	for tg := range targets {
		t.visited.Add(1)
		outcome, err := w.patch(ctx, r, tg)
		if outcome == outcomeError && ctx.Err() != nil {
			continue
		}
		t.count(outcome)
		if outcome == outcomeError {
			w.logger().Warn("rewrite failed", "resource", r.Name, "namespace", tg.namespace, "name", tg.name, "error", err)
			t.sample(fmt.Sprintf("%s/%s: %v", tg.namespace, tg.name, err))
		}
		if w.Metrics != nil {
			w.Metrics.objects.WithLabelValues(r.Name, string(outcome)).Inc()
		}
		if w.Progress != nil {
			w.Progress.Done(1)
		}
	}
}

// probeBaseline returns the median latency of probes sent one after the
// other, or 0 when none was answered (the limiter then falls back to the
// patches' latency).
func (w *Rewriter) probeBaseline(ctx context.Context) time.Duration {
	var lats []time.Duration
	for range probeBaselineSamples {
		if lat, ok := w.probeOnce(ctx); ok {
			lats = append(lats, lat)
		}
		if ctx.Err() != nil {
			break
		}
	}
	if len(lats) == 0 {
		return 0
	}
	slices.Sort(lats)
	return lats[len(lats)/2]
}

// probeLoop feeds a probe's latency to the limiter every ProbeInterval
// until ctx ends. Probes go one at a time: a slow one delays the next
// rather than piling up on a busy apiserver.
func (w *Rewriter) probeLoop(ctx context.Context) {
	interval := w.ProbeInterval
	if interval <= 0 {
		interval = DefaultProbeInterval
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if lat, ok := w.probeOnce(ctx); ok {
			w.Limiter.ObserveProbe(lat)
		}
	}
}

// probeOnce times one probe; ok is false when it got no answer from the
// apiserver (a transport error, or ctx ended).
func (w *Rewriter) probeOnce(ctx context.Context) (time.Duration, bool) {
	start := time.Now()
	err := w.Probe(ctx)
	lat := time.Since(start)
	if ctx.Err() != nil {
		return 0, false
	}
	var st apierrors.APIStatus
	if err != nil && !errors.As(err, &st) {
		return 0, false
	}
	return lat, true
}

type outcome string

const (
	outcomeRewritten outcome = "rewritten"
	outcomeUnchanged outcome = "unchanged"
	outcomeConflict  outcome = "conflict"
	outcomeSkipped   outcome = "skipped"
	outcomeError     outcome = "error"
)

// patch sends the resourceVersion-only merge patch for one object.
func (w *Rewriter) patch(ctx context.Context, r Resource, t target) (outcome, error) {
	body := []byte(`{"metadata":{"resourceVersion":"` + t.rv + `"}}`)
	var got *metav1.PartialObjectMetadata
	err := w.retry(ctx, func() error {
		if err := w.Limiter.Acquire(ctx); err != nil {
			return err
		}
		start := time.Now()
		var err error
		got, err = w.Client.Resource(r.GVR).Namespace(t.namespace).Patch(ctx, t.name, types.MergePatchType, body, metav1.PatchOptions{})
		lat := time.Since(start)
		w.Limiter.Release(lat, err == nil || apierrors.IsConflict(err) || apierrors.IsNotFound(err))
		if w.Metrics != nil {
			w.Metrics.patchLatency.Observe(lat.Seconds())
		}
		return err
	})
	switch {
	case err == nil:
		if got.ResourceVersion == t.rv {
			return outcomeUnchanged, nil
		}
		return outcomeRewritten, nil
	case apierrors.IsConflict(err):
		return outcomeConflict, nil
	case apierrors.IsNotFound(err):
		return outcomeSkipped, nil
	}
	return outcomeError, err
}

// retry runs op until it succeeds, fails permanently, ctx is done, or
// Attempts tries have run, and returns op's last error (never the back-off's
// own), so callers can still tell a 409 or a 404 apart. Between tries it
// backs off exponentially, 200 ms doubling to 5 s, each pause lengthened at
// random by up to 20%: after an apiserver restart every worker fails at
// once, and the jitter spreads their retries instead of sending them back in
// one burst each time.
//
// The pauses come from the Backoff's DelayFunc, not from
// wait.ExponentialBackoffWithContext: that one ends the tries as soon as a
// pause reaches Cap (it sets Steps to 0 there), after 5 tries instead of 8.
func (w *Rewriter) retry(ctx context.Context, op func() error) error {
	attempts := w.Attempts
	if attempts <= 0 {
		attempts = 8
	}
	backoff := wait.Backoff{Duration: 200 * time.Millisecond, Factor: 2, Jitter: 0.2, Steps: attempts, Cap: 5 * time.Second}
	var err error
	tries := 0
	// Until runs op at once, then after each pause, and stops as soon as
	// ctx is done (during op or a pause) with ctx's error; op's last error
	// is the answer.
	_ = backoff.DelayFunc().Until(ctx, true, true, func(ctx context.Context) (bool, error) {
		err = op()
		tries++
		return err == nil || permanent(err) || tries >= attempts, nil
	})
	return err
}

// permanent errors are answers, not failures: retrying cannot change them.
func permanent(err error) bool {
	return apierrors.IsConflict(err) || apierrors.IsNotFound(err) || apierrors.IsForbidden(err) ||
		apierrors.IsUnauthorized(err) || apierrors.IsBadRequest(err) || apierrors.IsInvalid(err) ||
		apierrors.IsMethodNotSupported(err) || errors.Is(err, context.Canceled)
}

func (w *Rewriter) logger() hclog.Logger {
	if w.Logger == nil {
		return hclog.NewNullLogger()
	}
	return w.Logger
}
