package rotation

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
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

// ErrLocked means another rotation holds the lease.
var ErrLocked = errors.New("another rotation holds the lease")

// Lock is a held coordination.k8s.io/v1 Lease that keeps two rotations from
// running at once. Safe for concurrent use.
type Lock struct {
	client   kubernetes.Interface
	ns, name string
	identity string
	duration time.Duration

	mu    sync.Mutex
	lease *coordinationv1.Lease
}

// AcquireLock takes the lease ns/name for identity, creating it if needed,
// or taking it over when its holder stopped renewing it. It fails with
// ErrLocked while another holder's lease is live.
func AcquireLock(ctx context.Context, client kubernetes.Interface, ns, name, identity string, d time.Duration) (*Lock, error) {
	if d <= 0 {
		d = DefaultLeaseDuration
	}
	l := &Lock{client: client, ns: ns, name: name, identity: identity, duration: d}
	leases := client.CoordinationV1().Leases(ns)
	now := metav1.NewMicroTime(time.Now())
	secs := int32(d / time.Second)
	cur, err := leases.Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		lease := &coordinationv1.Lease{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
			Spec: coordinationv1.LeaseSpec{
				HolderIdentity: &identity, LeaseDurationSeconds: &secs, AcquireTime: &now, RenewTime: &now,
			},
		}
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
	if h := cur.Spec.HolderIdentity; h != nil && *h != "" && *h != identity && cur.Spec.RenewTime != nil {
		dur := time.Duration(ptrOr(cur.Spec.LeaseDurationSeconds, 30)) * time.Second
		if expires := cur.Spec.RenewTime.Add(dur); time.Now().Before(expires) {
			return nil, fmt.Errorf("lease %s/%s held by %q until %s: %w", ns, name, *h, expires.UTC().Format(time.RFC3339), ErrLocked)
		}
	}
	cur = cur.DeepCopy()
	cur.Spec.HolderIdentity, cur.Spec.LeaseDurationSeconds, cur.Spec.AcquireTime, cur.Spec.RenewTime = &identity, &secs, &now, &now
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

func ptrOr[T any](p *T, def T) T {
	if p == nil {
		return def
	}
	return *p
}

// update applies change to the lease we hold; a conflict or a new holder
// means we lost it.
func (l *Lock) update(ctx context.Context, change func(*coordinationv1.Lease)) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	next := l.lease.DeepCopy()
	now := metav1.NewMicroTime(time.Now())
	next.Spec.RenewTime = &now
	change(next)
	updated, err := l.client.CoordinationV1().Leases(l.ns).Update(ctx, next, metav1.UpdateOptions{})
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
	return l.lease.Annotations[TargetAnnotation]
}

// SetTarget records (or, with "", clears) the rotation's target key_id.
func (l *Lock) SetTarget(ctx context.Context, keyID string) error {
	return l.update(ctx, func(le *coordinationv1.Lease) {
		if keyID == "" {
			delete(le.Annotations, TargetAnnotation)
			return
		}
		if le.Annotations == nil {
			le.Annotations = map[string]string{}
		}
		le.Annotations[TargetAnnotation] = keyID
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
			err := l.update(rctx, func(*coordinationv1.Lease) {})
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
	return l.update(ctx, func(le *coordinationv1.Lease) {
		empty := ""
		le.Spec.HolderIdentity = &empty
	})
}
