package rotation

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
)

// Lease defaults: short, so the lease of a killed run expires quickly and a
// rerun can take over.
const (
	DefaultLeaseNamespace = "kube-system"
	DefaultLeaseName      = "kmsctl-rotate"
	DefaultLeaseDuration  = 30 * time.Second
)

// TargetAnnotation on the lease records the key version a rotation is moving
// to until the rotation finishes, so a rerun after a crash adopts it instead
// of creating yet another version. It lives in the cluster, not in a local
// file, and holds only a public key_id.
const TargetAnnotation = "kms-plugin.kms-v2.io/rotation-target"

// LeaseGVR addresses coordination.k8s.io/v1 Leases through the dynamic
// client. The lease is handled as unstructured data rather than through the
// typed clientset: importing that clientset registers every API group of
// Kubernetes and makes kmsctl's binary, and so its resident memory, far
// larger, for three fields of one object.
var LeaseGVR = schema.GroupVersionResource{Group: "coordination.k8s.io", Version: "v1", Resource: "leases"}

// ErrLocked means another rotation holds the lease.
var ErrLocked = errors.New("another rotation holds the lease")

// Lock is a held coordination.k8s.io/v1 Lease that keeps two rotations from
// running at once. Safe for concurrent use.
type Lock struct {
	client   dynamic.Interface
	ns, name string
	identity string
	duration time.Duration

	// takenOver is the identity of a provably dead holder whose live lease
	// Acquire took over.
	takenOver string

	mu    sync.Mutex
	lease *unstructured.Unstructured
}

// TakenOver returns the identity of the previous holder whose lease was
// taken over before it expired because that holder was provably dead, or
// "" when the lease was free, expired or ours. The report names it, so an
// operator sees that a crashed run was resumed.
func (l *Lock) TakenOver() string { return l.takenOver }

// microTime is the wire format of metav1.MicroTime.
const microTime = metav1.RFC3339Micro

// setHolder writes the spec fields of a lease held by identity since now.
// Fields it does not know (leaseTransitions, strategy, ...) are kept as
// they are, since the whole object is sent back on update.
func setHolder(l *unstructured.Unstructured, identity string, d time.Duration, now time.Time) {
	ts := now.UTC().Format(microTime)
	_ = unstructured.SetNestedField(l.Object, identity, "spec", "holderIdentity")
	_ = unstructured.SetNestedField(l.Object, int64(d/time.Second), "spec", "leaseDurationSeconds")
	_ = unstructured.SetNestedField(l.Object, ts, "spec", "acquireTime")
	_ = unstructured.SetNestedField(l.Object, ts, "spec", "renewTime")
}

// update applies change to the lease we hold; a conflict or a new holder
// means we lost it.
func (l *Lock) update(ctx context.Context, change func(*unstructured.Unstructured)) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	next := l.lease.DeepCopy()
	_ = unstructured.SetNestedField(next.Object, time.Now().UTC().Format(microTime), "spec", "renewTime")
	change(next)
	updated, err := l.client.Resource(LeaseGVR).Namespace(l.ns).Update(ctx, next, metav1.UpdateOptions{})
	if err != nil {
		if apierrors.IsConflict(err) {
			return fmt.Errorf("lease %s/%s changed under us: %w", l.ns, l.name, ErrLocked)
		}
		return fmt.Errorf("lease %s/%s: %w", l.ns, l.name, err)
	}
	l.lease = updated
	return nil
}

// Target returns the key_id a previous, unfinished rotation was moving to.
func (l *Lock) Target() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.lease.GetAnnotations()[TargetAnnotation]
}

// SetTarget records (or, with "", clears) the rotation's target key_id.
func (l *Lock) SetTarget(ctx context.Context, keyID string) error {
	return l.update(ctx, func(le *unstructured.Unstructured) {
		a := le.GetAnnotations()
		if keyID == "" {
			if _, ok := a[TargetAnnotation]; ok {
				delete(a, TargetAnnotation)
				le.SetAnnotations(a)
			}
			return
		}
		if a == nil {
			a = map[string]string{}
		}
		a[TargetAnnotation] = keyID
		le.SetAnnotations(a)
	})
}

// Hold renews the lease every third of its duration until ctx ends; the
// returned context is cancelled when a renewal fails for longer than the
// lease lasts (someone else may hold it now), so the run stops writing.
func (l *Lock) Hold(ctx context.Context) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancelCause(ctx)
	go func() {
		t := time.NewTicker(l.duration / 3)
		defer t.Stop()
		lastOK := time.Now()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			rctx, rcancel := context.WithTimeout(ctx, l.duration/3)
			err := l.update(rctx, func(*unstructured.Unstructured) {})
			rcancel()
			switch {
			case err == nil:
				lastOK = time.Now()
			case errors.Is(err, ErrLocked) || time.Since(lastOK) > l.duration:
				cancel(fmt.Errorf("lost the rotation lease: %w", err))
				return
			}
		}
	}()
	return ctx, func() { cancel(context.Canceled) }
}

// Release gives the lease up so the next run need not wait for it to
// expire; the target annotation stays as it is.
func (l *Lock) Release(ctx context.Context) error {
	return l.update(ctx, func(le *unstructured.Unstructured) {
		_ = unstructured.SetNestedField(le.Object, "", "spec", "holderIdentity")
	})
}

// LockOptions says which lease Acquire takes, for whom, and how long it
// waits for another holder to go away.
type LockOptions struct {
	// Namespace and Name of the lease; default DefaultLeaseNamespace and
	// DefaultLeaseName.
	Namespace, Name string
	// Holder is this process (CurrentHolder); its String is the identity
	// written into the lease.
	Holder Holder
	// Duration is how long the lease outlives a run that stops renewing
	// it; default DefaultLeaseDuration.
	Duration time.Duration
	// Wait is how long to wait for another holder's lease to expire; 0
	// fails with ErrLocked at once.
	Wait time.Duration
	// Out, when set, gets a line when a dead holder's lease is taken over
	// and progress lines while waiting, so a waiting run does not look hung.
	Out io.Writer
	// Poll is the time between reads of the lease while waiting; default
	// DefaultLeasePoll.
	Poll time.Duration
}

// DefaultLeasePoll is how often a waiting Acquire reads the lease.
const DefaultLeasePoll = time.Second

// leaseCallTimeout bounds each apiserver call of Acquire, so an apiserver
// that accepts connections but never answers cannot stall it.
const leaseCallTimeout = 10 * time.Second

// waitReportEvery is how often a waiting Acquire says so.
var waitReportEvery = 5 * time.Second

func (o LockOptions) withDefaults() LockOptions {
	if o.Namespace == "" {
		o.Namespace = DefaultLeaseNamespace
	}
	if o.Name == "" {
		o.Name = DefaultLeaseName
	}
	if o.Duration <= 0 {
		o.Duration = DefaultLeaseDuration
	}
	if o.Poll <= 0 {
		o.Poll = DefaultLeasePoll
	}
	return o
}

// Acquire takes the rotation lease for o.Holder. A missing lease is
// created; a free, expired or already ours one is taken. A lease whose
// holder is provably dead (ProvablyDead: same host, boot and pid namespace,
// and that process is gone) is taken over at once, so a rerun after a
// SIGKILL resumes right away; TakenOver then names the dead holder.
// Any other holder may be alive: Acquire fails with ErrLocked at once when
// o.Wait is 0, or else polls until the lease expires and takes it, and
// fails with ErrLocked when the holder renews the lease meanwhile (it is
// alive), another holder takes it, or o.Wait elapses.
func Acquire(ctx context.Context, client dynamic.Interface, o LockOptions) (*Lock, error) {
	o = o.withDefaults()
	a := &acquirer{o: o, client: client, leases: client.Resource(LeaseGVR).Namespace(o.Namespace), identity: o.Holder.String()}
	for {
		cur, found, err := a.get(ctx)
		if err != nil {
			return nil, err
		}
		if !found {
			return a.create(ctx)
		}
		h, now := holdingOf(cur), time.Now()
		if h.identity == "" || h.identity == a.identity || !now.Before(h.expires) {
			return a.take(ctx, cur, "")
		}
		dead, why := a.judge(h.identity)
		if dead {
			return a.takeOver(ctx, cur, h.identity, why)
		}
		if err := a.keepWaiting(h, why, now); err != nil {
			return nil, err
		}
		if err := a.sleep(ctx, now); err != nil {
			return nil, err
		}
	}
}

// holding is what a lease says about its holder; identity is "" when
// nobody holds it.
type holding struct {
	identity         string
	renewed, expires time.Time
}

// holdingOf reads holder, renewal and expiry of l. A lease without a
// readable renewTime counts as free, as it always has.
func holdingOf(l *unstructured.Unstructured) holding {
	id, _, _ := unstructured.NestedString(l.Object, "spec", "holderIdentity")
	renew, _, _ := unstructured.NestedString(l.Object, "spec", "renewTime")
	// RFC 3339 parsing takes the microseconds of MicroTime as well as none.
	renewed, err := time.Parse(time.RFC3339, renew)
	if id == "" || err != nil {
		return holding{}
	}
	secs, ok, _ := unstructured.NestedInt64(l.Object, "spec", "leaseDurationSeconds")
	if !ok {
		secs = int64(DefaultLeaseDuration / time.Second)
	}
	return holding{identity: id, renewed: renewed, expires: renewed.Add(time.Duration(secs) * time.Second)}
}

// acquirer is one Acquire call: its options and what it has seen of
// another holder while waiting.
type acquirer struct {
	o        LockOptions
	client   dynamic.Interface
	leases   dynamic.ResourceInterface
	identity string

	// seen is the other holder as first found; waitUntil ends the wait.
	seen      holding
	waitUntil time.Time
	reported  time.Time
}

func (a *acquirer) lease() string { return a.o.Namespace + "/" + a.o.Name }

func (a *acquirer) say(format string, args ...any) {
	if a.o.Out != nil {
		fmt.Fprintf(a.o.Out, format+"\n", args...)
	}
}

// get reads the lease; found is false when it does not exist yet.
func (a *acquirer) get(ctx context.Context) (lease *unstructured.Unstructured, found bool, err error) {
	ctx, cancel := context.WithTimeout(ctx, leaseCallTimeout)
	defer cancel()
	cur, err := a.leases.Get(ctx, a.o.Name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("lease %s: %w", a.lease(), err)
	}
	return cur, true, nil
}

func (a *acquirer) create(ctx context.Context) (*Lock, error) {
	lease := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "coordination.k8s.io/v1",
		"kind":       "Lease",
		"metadata":   map[string]any{"name": a.o.Name, "namespace": a.o.Namespace},
	}}
	setHolder(lease, a.identity, a.o.Duration, time.Now())
	ctx, cancel := context.WithTimeout(ctx, leaseCallTimeout)
	defer cancel()
	created, err := a.leases.Create(ctx, lease, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		return nil, fmt.Errorf("lease %s: created concurrently: %w", a.lease(), ErrLocked)
	}
	if err != nil {
		return nil, fmt.Errorf("lease %s: create: %w", a.lease(), err)
	}
	return a.lock(created, ""), nil
}

// take writes us as the holder of cur. The update carries cur's
// resourceVersion, so a concurrent taker makes one of the two conflict.
func (a *acquirer) take(ctx context.Context, cur *unstructured.Unstructured, takenOver string) (*Lock, error) {
	next := cur.DeepCopy()
	setHolder(next, a.identity, a.o.Duration, time.Now())
	ctx, cancel := context.WithTimeout(ctx, leaseCallTimeout)
	defer cancel()
	updated, err := a.leases.Update(ctx, next, metav1.UpdateOptions{})
	if apierrors.IsConflict(err) {
		return nil, fmt.Errorf("lease %s: taken concurrently: %w", a.lease(), ErrLocked)
	}
	if err != nil {
		return nil, fmt.Errorf("lease %s: take: %w", a.lease(), err)
	}
	return a.lock(updated, takenOver), nil
}

func (a *acquirer) takeOver(ctx context.Context, cur *unstructured.Unstructured, holder, why string) (*Lock, error) {
	l, err := a.take(ctx, cur, holder)
	if err != nil {
		return nil, err
	}
	a.say("lease %s: holder %s is dead (%s); taking it over", a.lease(), holder, why)
	return l, nil
}

func (a *acquirer) lock(lease *unstructured.Unstructured, takenOver string) *Lock {
	return &Lock{client: a.client, ns: a.o.Namespace, name: a.o.Name, identity: a.identity,
		duration: a.o.Duration, lease: lease, takenOver: takenOver}
}

// judge says whether the holder identity is provably dead, and why (not).
func (a *acquirer) judge(identity string) (bool, string) {
	h, ok := ParseHolder(identity)
	if !ok {
		return false, "its identity does not say which process on which boot it is"
	}
	return h.ProvablyDead(a.o.Holder)
}

// keepWaiting returns ErrLocked when waiting for h is pointless or over:
// no wait allowed, the holder renewed (it is alive), another holder took
// the lease, or the wait elapsed. Otherwise it reports progress.
func (a *acquirer) keepWaiting(h holding, why string, now time.Time) error {
	held := fmt.Sprintf("lease %s held by %q until %s", a.lease(), h.identity, h.expires.UTC().Format(time.RFC3339))
	switch {
	case a.o.Wait <= 0:
		return fmt.Errorf("%s; cannot prove it dead (%s): %w", held, why, ErrLocked)
	case a.seen.identity == "":
		a.seen, a.waitUntil, a.reported = h, now.Add(a.o.Wait), now
		a.say("%s; cannot prove it dead (%s); waiting up to %s (--lease-wait) for it to expire",
			held, why, shortDuration(a.o.Wait))
		return nil
	case h.identity != a.seen.identity:
		return fmt.Errorf("%s: taken from %q by another rotation while waiting: %w", held, a.seen.identity, ErrLocked)
	case h.renewed.After(a.seen.renewed):
		return fmt.Errorf("lease %s: holder %q is alive: it renewed its lease: %w", a.lease(), h.identity, ErrLocked)
	case !now.Before(a.waitUntil):
		return fmt.Errorf("%s: still held after waiting %s (--lease-wait): %w", held, shortDuration(a.o.Wait), ErrLocked)
	}
	if now.Sub(a.reported) >= waitReportEvery {
		a.reported = now
		a.say("waiting for lease %s held by %s to expire in %s (--lease-wait %s)",
			a.lease(), h.identity, shortDuration(h.expires.Sub(now).Round(time.Second)), shortDuration(a.o.Wait))
	}
	return nil
}

// sleep waits one poll interval, but not past the end of the wait, so the
// last look at the lease happens when the wait ends.
func (a *acquirer) sleep(ctx context.Context, now time.Time) error {
	d := max(min(a.o.Poll, a.waitUntil.Sub(now)), 0)
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return fmt.Errorf("lease %s: waiting for its holder: %w", a.lease(), context.Cause(ctx))
	case <-t.C:
		return nil
	}
}

// shortDuration spells d as an operator types it: 15m, not 15m0s.
func shortDuration(d time.Duration) string {
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = strings.TrimSuffix(s, "0s")
	}
	if strings.HasSuffix(s, "h0m") {
		s = strings.TrimSuffix(s, "0m")
	}
	return s
}
