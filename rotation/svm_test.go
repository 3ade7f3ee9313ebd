package rotation

import (
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	svmv1 "k8s.io/api/storagemigration/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/kms-v2/kms-plugin/rotation/etcdlayout"
)

var svmGVR = schema.GroupVersionResource{Group: "storagemigration.k8s.io", Version: "v1", Resource: "storageversionmigrations"}

// fakeMigrator plays kube-controller-manager: before the engine's n-th read
// of a migration (n from 1), step may change it in the store; returning
// nil leaves it as it is, and deleteAt deletes it.
type fakeMigrator struct {
	cs       *fake.Clientset
	gets     atomic.Int64
	step     func(n int64, svm *svmv1.StorageVersionMigration) *svmv1.StorageVersionMigration
	deleteAt int64
}

func newFakeMigrator(t *testing.T, existing ...runtime.Object) *fakeMigrator {
	t.Helper()
	f := &fakeMigrator{cs: fake.NewClientset(existing...)}
	f.cs.PrependReactor("get", "storageversionmigrations", func(a k8stesting.Action) (bool, runtime.Object, error) {
		n := f.gets.Add(1)
		name := a.(k8stesting.GetAction).GetName()
		obj, err := f.cs.Tracker().Get(svmGVR, "", name)
		if err != nil {
			return true, nil, err // NotFound, as the tracker would answer
		}
		if f.deleteAt > 0 && n == f.deleteAt {
			if err := f.cs.Tracker().Delete(svmGVR, "", name); err != nil {
				t.Errorf("delete: %v", err)
			}
			return false, nil, nil
		}
		if f.step != nil {
			if next := f.step(n, obj.(*svmv1.StorageVersionMigration).DeepCopy()); next != nil {
				next.ResourceVersion = next.ResourceVersion + "1" // the apiserver's new resourceVersion
				if err := f.cs.Tracker().Update(svmGVR, next, ""); err != nil {
					t.Errorf("update: %v", err)
				}
			}
		}
		return false, nil, nil
	})
	return f
}

func (f *fakeMigrator) engine(stall time.Duration) *MigrationEngine {
	return &MigrationEngine{Client: f.cs.StoragemigrationV1(), StallTimeout: stall, PollInterval: 5 * time.Millisecond, CallTimeout: time.Second}
}

// withCondition sets a true condition.
func withCondition(svm *svmv1.StorageVersionMigration, typ svmv1.MigrationConditionType, reason, msg string) *svmv1.StorageVersionMigration {
	meta.SetStatusCondition(&svm.Status.Conditions, metav1.Condition{Type: string(typ), Status: metav1.ConditionTrue, Reason: reason, Message: msg})
	return svm
}

// migrates runs a migration of 10 objects over a few reads, ending with
// the given final condition.
func migrates(final svmv1.MigrationConditionType, reason, msg string) func(int64, *svmv1.StorageVersionMigration) *svmv1.StorageVersionMigration {
	return func(n int64, svm *svmv1.StorageVersionMigration) *svmv1.StorageVersionMigration {
		switch n {
		case 2:
			svm.Status.ResourceVersion = "100"
			return withCondition(svm, svmv1.MigrationRunning, "StorageVersionMigrationInProgress", "The migration is running, 7/10 objects not yet migrated")
		case 4:
			if final == svmv1.MigrationSucceeded {
				withCondition(svm, svmv1.MigrationRunning, "StorageVersionMigrationInProgress", "The migration is running, 10 objects verified migrated")
			}
			return withCondition(svm, final, reason, msg)
		}
		return nil
	}
}

var secretsReq = RewriteRequest{
	Resource: Resource{Name: "secrets", GVR: schema.GroupVersionResource{Version: "v1", Resource: "secrets"}, Path: "secrets"},
	Writer:   etcdlayout.Writer{Encoding: etcdlayout.EncodingKMSv2, Provider: "kms-plugin", KeyID: "file:keyset/2"},
}

func TestMigrationName(t *testing.T) {
	a := MigrationName(secretsReq.Resource, secretsReq.Writer)
	if !strings.HasPrefix(a, "kmsctl-rotate-secrets-") || len(a) != len("kmsctl-rotate-secrets-")+10 {
		t.Errorf("name %q: want kmsctl-rotate-secrets-<10 hex>", a)
	}
	if b := MigrationName(secretsReq.Resource, secretsReq.Writer); b != a {
		t.Errorf("not deterministic: %q then %q", a, b)
	}
	other := secretsReq.Writer
	other.KeyID = "file:keyset/3"
	if b := MigrationName(secretsReq.Resource, other); b == a {
		t.Errorf("another key gives the same name %q", a)
	}
	cr, _ := ParseResource("widgets.v1.Example.COM")
	if got := MigrationName(cr, other); !strings.HasPrefix(got, "kmsctl-rotate-widgets.v1.example.com-") {
		t.Errorf("custom resource: got %q", got)
	}
}

func TestMigrationSucceeded(t *testing.T) {
	f := newFakeMigrator(t)
	f.step = migrates(svmv1.MigrationSucceeded, "StorageVersionMigrationSucceeded", "Migration completed")
	var out strings.Builder
	e := f.engine(time.Minute)
	e.Out = &out
	st, err := e.Rewrite(context.Background(), secretsReq)
	if err != nil {
		t.Fatalf("Rewrite: %v", err)
	}
	if st.Visited != 10 || st.Resource != "secrets" {
		t.Errorf("stats: got %+v, want 10 visited for secrets", st)
	}
	name := MigrationName(secretsReq.Resource, secretsReq.Writer)
	got, err := f.cs.StoragemigrationV1().StorageVersionMigrations().Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("the migration: %v", err)
	}
	if got.Spec.Resource != (metav1.GroupResource{Resource: "secrets"}) {
		t.Errorf("spec.resource: got %+v", got.Spec.Resource)
	}
	for _, want := range []string{"created StorageVersionMigration " + name, "7/10 objects not yet migrated", "Succeeded (StorageVersionMigrationSucceeded: Migration completed)"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("progress output lacks %q:\n%s", want, out.String())
		}
	}
}

func TestMigrationFailed(t *testing.T) {
	f := newFakeMigrator(t)
	f.step = migrates(svmv1.MigrationFailed, "StorageVersionMigrationFailed", "migration encountered unhandled error: boom")
	_, err := f.engine(time.Minute).Rewrite(context.Background(), secretsReq)
	if !errors.Is(err, ErrMigrationFailed) {
		t.Fatalf("err: got %v, want ErrMigrationFailed", err)
	}
	name := MigrationName(secretsReq.Resource, secretsReq.Writer)
	for _, want := range []string{name, "Failed (StorageVersionMigrationFailed: migration encountered unhandled error: boom)"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("err %q lacks %q", err, want)
		}
	}
	if strings.Contains(err.Error(), "\n") {
		t.Errorf("err is not one line: %q", err)
	}
}

func TestMigrationDeletedMidway(t *testing.T) {
	f := newFakeMigrator(t)
	f.step = migrates(svmv1.MigrationSucceeded, "", "")
	f.deleteAt = 3
	_, err := f.engine(time.Minute).Rewrite(context.Background(), secretsReq)
	if !errors.Is(err, ErrMigrationFailed) || !strings.Contains(err.Error(), "deleted before it ended") {
		t.Fatalf("err: got %v, want ErrMigrationFailed saying it was deleted", err)
	}
}

func TestMigrationStalled(t *testing.T) {
	f := newFakeMigrator(t) // nobody runs the migration
	start := time.Now()
	_, err := f.engine(100*time.Millisecond).Rewrite(context.Background(), secretsReq)
	if !errors.Is(err, ErrMigrationStalled) {
		t.Fatalf("err: got %v, want ErrMigrationStalled", err)
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("took %s to notice a stall of 100ms", took)
	}
	name := MigrationName(secretsReq.Resource, secretsReq.Writer)
	if !strings.Contains(err.Error(), name) || !strings.Contains(err.Error(), "kube-controller-manager") {
		t.Errorf("err %q: want the migration's name and a hint", err)
	}
}

// A rerun after a Failed migration deletes it and runs a new one of the
// same name; a running one is adopted as it is.
func TestMigrationRerun(t *testing.T) {
	name := MigrationName(secretsReq.Resource, secretsReq.Writer)
	old := &svmv1.StorageVersionMigration{ObjectMeta: metav1.ObjectMeta{Name: name, UID: types.UID("old")}}
	withCondition(old, svmv1.MigrationFailed, "StorageVersionMigrationFailed", "boom")

	f := newFakeMigrator(t, old)
	f.step = func(_ int64, svm *svmv1.StorageVersionMigration) *svmv1.StorageVersionMigration {
		if svm.UID == "old" || stateOf(svm) != migrationPending {
			return nil // the controller leaves ended migrations alone
		}
		return withCondition(svm, svmv1.MigrationSucceeded, "StorageVersionMigrationSucceeded", "Migration completed")
	}
	if _, err := f.engine(time.Minute).Rewrite(context.Background(), secretsReq); err != nil {
		t.Fatalf("rerun after Failed: %v", err)
	}
	var deletes, creates int
	for _, a := range f.cs.Actions() {
		switch a.GetVerb() {
		case "delete":
			deletes++
		case "create":
			creates++
		}
	}
	if deletes != 1 || creates != 1 {
		t.Errorf("got %d deletes and %d creates, want 1 and 1", deletes, creates)
	}

	// A pending migration from an interrupted run is adopted, not replaced.
	pending := &svmv1.StorageVersionMigration{ObjectMeta: metav1.ObjectMeta{Name: name, UID: types.UID("pending")}}
	f = newFakeMigrator(t, pending)
	f.step = migrates(svmv1.MigrationSucceeded, "StorageVersionMigrationSucceeded", "Migration completed")
	if _, err := f.engine(time.Minute).Rewrite(context.Background(), secretsReq); err != nil {
		t.Fatalf("adopt: %v", err)
	}
	for _, a := range f.cs.Actions() {
		if v := a.GetVerb(); v == "delete" || v == "create" {
			t.Errorf("adopting a running migration sent a %s", v)
		}
	}
}
