package rotation

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/dynamic/fake"
	k8stesting "k8s.io/client-go/testing"
)

// Holders of the lease tests: this process, and others on the same or
// another machine; fakeLeaseProc knows which of them run.
var (
	leaseSelf    = Holder{Host: "node-a", BootID: "boot-1", PID: 100, Start: 5000, PIDNS: 4026531836}
	leaseDead    = Holder{Host: "node-a", BootID: "boot-1", PID: 200, Start: 7000, PIDNS: 4026531836}
	leaseRunning = Holder{Host: "node-a", BootID: "boot-1", PID: 300, Start: 7000, PIDNS: 4026531836}
	leaseReused  = Holder{Host: "node-a", BootID: "boot-1", PID: 300, Start: 6000, PIDNS: 4026531836}
	leaseRemote  = Holder{Host: "node-b", BootID: "boot-9", PID: 200, Start: 7000, PIDNS: 4026531836}
)

func fakeLeaseProc(t *testing.T) {
	newFakeProc(t, map[int]uint64{100: 5000, 300: 7000}).use(t)
}

func leaseClient() *fake.FakeDynamicClient {
	return fake.NewSimpleDynamicClient(runtime.NewScheme())
}

// putLease stores the rotation lease held by holder, renewed at renewed.
func putLease(t *testing.T, kube *fake.FakeDynamicClient, holder string, renewed time.Time, d time.Duration) {
	t.Helper()
	if err := storeLease(kube, holder, renewed, d); err != nil {
		t.Fatal(err)
	}
}

// storeLease is putLease for other goroutines than the test's.
func storeLease(kube *fake.FakeDynamicClient, holder string, renewed time.Time, d time.Duration) error {
	lease := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "coordination.k8s.io/v1",
		"kind":       "Lease",
		"metadata": map[string]any{
			"name": DefaultLeaseName, "namespace": DefaultLeaseNamespace,
			"annotations": map[string]any{TargetAnnotation: "file:k/2"},
		},
	}}
	setHolder(lease, holder, d, renewed)
	leases := kube.Resource(LeaseGVR).Namespace(DefaultLeaseNamespace)
	_, err := leases.Create(context.Background(), lease, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		_, err = leases.Update(context.Background(), lease, metav1.UpdateOptions{})
	}
	return err
}

// leaseHolder reads the holder identity stored in the rotation lease.
func leaseHolder(t *testing.T, kube *fake.FakeDynamicClient) string {
	t.Helper()
	l, err := kube.Resource(LeaseGVR).Namespace(DefaultLeaseNamespace).Get(context.Background(), DefaultLeaseName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return holdingOf(l).identity
}

func TestAcquire(t *testing.T) {
	now := time.Now()
	cases := []struct {
		name    string
		holder  string // "" with renewed zero: no lease
		renewed time.Time
		// reactor, when set, fails this verb on leases with a conflict.
		conflict      string
		wantErr       error
		wantInErr     string
		wantTakenOver string
		wantOut       string
	}{
		{name: "creates a missing lease"},
		{name: "takes an expired lease", holder: leaseRemote.String(), renewed: now.Add(-time.Hour)},
		{name: "takes a released lease", holder: "", renewed: now},
		{name: "takes its own live lease", holder: leaseSelf.String(), renewed: now},
		{name: "takes over a provably dead holder at once", holder: leaseDead.String(), renewed: now,
			wantTakenOver: leaseDead.String(), wantOut: "holder " + leaseDead.String() + " is dead (no process 200 on this host); taking it over"},
		{name: "takes over a holder whose pid was reused", holder: leaseReused.String(), renewed: now,
			wantTakenOver: leaseReused.String(), wantOut: "another process"},
		{name: "refuses a live other-host holder at once", holder: leaseRemote.String(), renewed: now,
			wantErr: ErrLocked, wantInErr: leaseRemote.String() + "\" until " + now.Add(10*time.Minute).UTC().Format(time.RFC3339)},
		{name: "refuses a running same-host holder at once", holder: leaseRunning.String(), renewed: now,
			wantErr: ErrLocked, wantInErr: "still running"},
		{name: "refuses an old-format holder at once", holder: "kmsctl@node-a/200", renewed: now,
			wantErr: ErrLocked, wantInErr: "kmsctl@node-a/200"},
		{name: "a concurrent create is a held lease", conflict: "create", wantErr: ErrLocked, wantInErr: "created concurrently"},
		{name: "a concurrent takeover is a held lease", holder: leaseDead.String(), renewed: now, conflict: "update",
			wantErr: ErrLocked, wantInErr: "taken concurrently"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			fakeLeaseProc(t)
			kube := leaseClient()
			if !c.renewed.IsZero() {
				putLease(t, kube, c.holder, c.renewed, 10*time.Minute)
			}
			if c.conflict != "" {
				kube.PrependReactor(c.conflict, "leases", func(k8stesting.Action) (bool, runtime.Object, error) {
					return true, nil, apierrors.NewConflict(LeaseGVR.GroupResource(), DefaultLeaseName, errors.New("raced"))
				})
				if c.conflict == "create" {
					kube.PrependReactor("create", "leases", func(k8stesting.Action) (bool, runtime.Object, error) {
						return true, nil, apierrors.NewAlreadyExists(LeaseGVR.GroupResource(), DefaultLeaseName)
					})
				}
			}
			var out bytes.Buffer
			start := time.Now()
			lock, err := Acquire(context.Background(), kube, LockOptions{Holder: leaseSelf, Out: &out})
			if elapsed := time.Since(start); elapsed > time.Second {
				t.Errorf("Acquire took %s with no wait, want at once", elapsed)
			}
			if c.wantErr != nil {
				if !errors.Is(err, c.wantErr) || !strings.Contains(err.Error(), c.wantInErr) {
					t.Fatalf("Acquire: got %v, want %v containing %q", err, c.wantErr, c.wantInErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("Acquire: %v", err)
			}
			if got := leaseHolder(t, kube); got != leaseSelf.String() {
				t.Errorf("lease holder: got %q, want %q", got, leaseSelf.String())
			}
			if got := lock.TakenOver(); got != c.wantTakenOver {
				t.Errorf("TakenOver: got %q, want %q", got, c.wantTakenOver)
			}
			if !strings.Contains(out.String(), c.wantOut) || (c.wantOut == "" && out.Len() > 0) {
				t.Errorf("output: got %q, want %q", out.String(), c.wantOut)
			}
			if !c.renewed.IsZero() && lock.Target() != "file:k/2" {
				t.Errorf("target of the lease taken: got %q, want the previous run's file:k/2", lock.Target())
			}
		})
	}
}

// waitOptions waits up to wait for a lease, polling fast.
func waitOptions(wait time.Duration, out *bytes.Buffer) LockOptions {
	return LockOptions{Holder: leaseSelf, Wait: wait, Poll: 20 * time.Millisecond, Out: out, Duration: time.Second}
}

func TestAcquireWaitsForExpiry(t *testing.T) {
	fakeLeaseProc(t)
	saved := waitReportEvery
	waitReportEvery = 100 * time.Millisecond
	t.Cleanup(func() { waitReportEvery = saved })
	kube := leaseClient()
	putLease(t, kube, leaseRemote.String(), time.Now(), time.Second)
	var out bytes.Buffer
	start := time.Now()
	lock, err := Acquire(context.Background(), kube, waitOptions(5*time.Second, &out))
	if err != nil {
		t.Fatalf("Acquire: %v\n%s", err, out.String())
	}
	if elapsed := time.Since(start); elapsed < 500*time.Millisecond || elapsed > 3*time.Second {
		t.Errorf("Acquire took %s, want about the 1s until the lease expired", elapsed)
	}
	if lock.TakenOver() != "" || leaseHolder(t, kube) != leaseSelf.String() {
		t.Errorf("after expiry: TakenOver %q, holder %q; want none and us", lock.TakenOver(), leaseHolder(t, kube))
	}
	for _, want := range []string{"it ran on host \"node-b\"", "waiting up to 5s (--lease-wait)", "to expire in ", "(--lease-wait 5s)"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output: got %q, want it to contain %q", out.String(), want)
		}
	}
}

func TestAcquireWhileWaiting(t *testing.T) {
	cases := []struct {
		name string
		// change, when set, is applied to the lease 200ms into the wait.
		change    func(kube *fake.FakeDynamicClient) error
		wantErr   bool
		wantInErr string
	}{
		{name: "holder renews: it is alive", wantErr: true, wantInErr: "is alive: it renewed its lease",
			change: func(kube *fake.FakeDynamicClient) error {
				return storeLease(kube, leaseRemote.String(), time.Now(), time.Minute)
			}},
		{name: "another live holder takes it", wantErr: true, wantInErr: "by another rotation while waiting",
			change: func(kube *fake.FakeDynamicClient) error {
				return storeLease(kube, leaseRunning.String(), time.Now().Add(-time.Second), time.Minute)
			}},
		{name: "holder releases it", change: func(kube *fake.FakeDynamicClient) error {
			return storeLease(kube, "", time.Now(), time.Minute)
		}},
		{name: "wait elapses first", wantErr: true, wantInErr: "still held after waiting 1s (--lease-wait)"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			fakeLeaseProc(t)
			kube := leaseClient()
			putLease(t, kube, leaseRemote.String(), time.Now().Add(-time.Second), time.Minute)
			if c.change != nil {
				timer := time.AfterFunc(200*time.Millisecond, func() {
					if err := c.change(kube); err != nil {
						t.Error(err)
					}
				})
				t.Cleanup(func() { timer.Stop() })
			}
			var out bytes.Buffer
			start := time.Now()
			_, err := Acquire(context.Background(), kube, waitOptions(time.Second, &out))
			if elapsed := time.Since(start); elapsed > 2*time.Second {
				t.Errorf("Acquire took %s, want at most the 1s wait", elapsed)
			}
			if !c.wantErr {
				if err != nil || leaseHolder(t, kube) != leaseSelf.String() {
					t.Fatalf("Acquire: got %v, holder %q; want the lease", err, leaseHolder(t, kube))
				}
				return
			}
			if !errors.Is(err, ErrLocked) || !strings.Contains(err.Error(), c.wantInErr) {
				t.Fatalf("Acquire: got %v, want ErrLocked containing %q", err, c.wantInErr)
			}
			if c.change != nil && time.Since(start) > 900*time.Millisecond {
				t.Errorf("Acquire noticed the change after %s, want at the next poll", time.Since(start))
			}
		})
	}
}

func TestAcquireWaitEndsWithContext(t *testing.T) {
	fakeLeaseProc(t)
	kube := leaseClient()
	putLease(t, kube, leaseRemote.String(), time.Now(), time.Minute)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	_, err := Acquire(ctx, kube, waitOptions(time.Hour, &bytes.Buffer{}))
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Acquire: got %v, want the context's deadline", err)
	}
}

func TestShortDuration(t *testing.T) {
	for d, want := range map[time.Duration]string{
		15 * time.Minute: "15m", time.Hour: "1h", 90 * time.Minute: "1h30m",
		200 * time.Second: "3m20s", 5 * time.Second: "5s", 0: "0s",
	} {
		if got := shortDuration(d); got != want {
			t.Errorf("shortDuration(%v): got %q, want %q", d, got, want)
		}
	}
}
