package rotation

import (
	"context"
	"errors"
	"fmt"
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

	mu    sync.Mutex
	lease *unstructured.Unstructured
}

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

// liveHolder returns the holder of l and when its lease expires, if some
// holder has renewed it.
func liveHolder(l *unstructured.Unstructured) (string, time.Time, bool) {
	holder, _, _ := unstructured.NestedString(l.Object, "spec", "holderIdentity")
	renew, _, _ := unstructured.NestedString(l.Object, "spec", "renewTime")
	if holder == "" || renew == "" {
		return "", time.Time{}, false
	}
	// RFC 3339 parsing takes the microseconds of MicroTime as well as none.
	renewed, err := time.Parse(time.RFC3339, renew)
	if err != nil {
		return "", time.Time{}, false
	}
	secs, ok, _ := unstructured.NestedInt64(l.Object, "spec", "leaseDurationSeconds")
	if !ok {
		secs = 30
	}
	return holder, renewed.Add(time.Duration(secs) * time.Second), true
}

// AcquireLock takes the lease ns/name for identity, creating it if needed,
// or taking it over when its holder stopped renewing it. It fails with
// ErrLocked while another holder's lease is live.
func AcquireLock(ctx context.Context, client dynamic.Interface, ns, name, identity string, d time.Duration) (*Lock, error) {
	if d <= 0 {
		d = DefaultLeaseDuration
	}
	l := &Lock{client: client, ns: ns, name: name, identity: identity, duration: d}
	leases := client.Resource(LeaseGVR).Namespace(ns)
	now := time.Now()
	cur, err := leases.Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		lease := &unstructured.Unstructured{Object: map[string]any{
			"apiVersion": "coordination.k8s.io/v1",
			"kind":       "Lease",
			"metadata":   map[string]any{"name": name, "namespace": ns},
		}}
		setHolder(lease, identity, d, now)
		created, err := leases.Create(ctx, lease, metav1.CreateOptions{})
		if apierrors.IsAlreadyExists(err) {
			return nil, fmt.Errorf("lease %s/%s: created concurrently: %w", ns, name, ErrLocked)
		}
		if err != nil {
			return nil, fmt.Errorf("lease %s/%s: %w", ns, name, err)
		}
		l.lease = created
		return l, nil
	}
	if err != nil {
		return nil, fmt.Errorf("lease %s/%s: %w", ns, name, err)
	}
	if h, expires, ok := liveHolder(cur); ok && h != identity && now.Before(expires) {
		return nil, fmt.Errorf("lease %s/%s held by %q until %s: %w", ns, name, h, expires.UTC().Format(time.RFC3339), ErrLocked)
	}
	cur = cur.DeepCopy()
	setHolder(cur, identity, d, now)
	updated, err := leases.Update(ctx, cur, metav1.UpdateOptions{})
	if apierrors.IsConflict(err) {
		return nil, fmt.Errorf("lease %s/%s: taken concurrently: %w", ns, name, ErrLocked)
	}
	if err != nil {
		return nil, fmt.Errorf("lease %s/%s: %w", ns, name, err)
	}
	l.lease = updated
	return l, nil
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
