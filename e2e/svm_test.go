//go:build e2e

package e2e

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	svmv1 "k8s.io/api/storagemigration/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/kms-v2/kms-plugin/e2e/harness"
)

// svmArgs make kmsctl hand the rewrite to StorageVersionMigrations.
var svmArgs = []string{"--rewrite-with", "storageversionmigration", "--resources", "secrets,configmaps"}

// TestStorageVersionMigration runs `kmsctl rotate --rewrite-with
// storageversionmigration` against two apiservers and a
// kube-controller-manager running the storage version migrator. Subtests
// share the cluster and run in order.
func TestStorageVersionMigration(t *testing.T) {
	c := harness.Start(t, harness.Options{APIServers: 2, ControllerManager: true})
	ctx := t.Context()

	t.Run("RotateUnderLoad", func(t *testing.T) { testSVMUnderLoad(ctx, t, c) })
	t.Run("FailedAndStalledThenRerun", func(t *testing.T) { testSVMFailedStalledRerun(ctx, t, c) })
}

// testSVMUnderLoad: with writers on both apiservers, the platform's
// migrations rewrite everything, the census is clean and no acknowledged
// write is lost.
func testSVMUnderLoad(ctx context.Context, t *testing.T, c *harness.Cluster) {
	const secrets, configmaps = 500, 100
	ns := populate(ctx, t, c, "svm-load", secrets, configmaps)
	a := mustPrimary(t, c)
	requireAllUnder(ctx, t, c, a, "secrets", "configmaps")

	w := startWriters(ctx, c, ns, 4, secrets)
	time.Sleep(2 * time.Second) // writers at steady state before the rotation
	rep := rotate(ctx, t, c, 0, append([]string{"--force"}, svmArgs...)...)
	time.Sleep(time.Second) // and some writes after it
	w.stop()

	b := mustPrimary(t, c)
	if b == a || rep.NewKeyID != b || rep.OldKeyID != a {
		t.Fatalf("keys: report %s -> %s, primary now %s, was %s", rep.OldKeyID, rep.NewKeyID, b, a)
	}
	requireAllUnder(ctx, t, c, b, "secrets", "configmaps")
	if rep.CensusAfter == nil || rep.CensusAfter.Stale() != 0 || rep.Remaining != 0 {
		t.Errorf("report census after: %+v, remaining %d", rep.CensusAfter, rep.Remaining)
	}
	// The platform did the rewrite: a Succeeded migration per resource.
	for _, res := range []string{"secrets", "configmaps"} {
		m := migrationFor(ctx, t, c, res, nil)
		if m == nil || !meta.IsStatusConditionTrue(m.Status.Conditions, string(svmv1.MigrationSucceeded)) {
			t.Errorf("%s: want a Succeeded StorageVersionMigration, got %+v", res, m)
		}
	}
	requireWritesKept(ctx, t, c, ns, secrets, w)
}

// requireWritesKept fails unless the writers saw no error but 409s, made
// writes, and every apiserver reads back each acknowledged value.
func requireWritesKept(ctx context.Context, t *testing.T, c *harness.Cluster, ns string, secrets int, w *writers) {
	t.Helper()
	if len(w.errs) > 0 {
		t.Errorf("writers saw %d errors other than 409, first: %v", len(w.errs), w.errs[0])
	}
	t.Logf("writers: %d acknowledged writes, %d conflicts", w.writes, w.conflicts)
	if w.writes == 0 {
		t.Fatal("writers made no write")
	}
	for i, api := range c.APIServers {
		list, err := api.Client.CoreV1().Secrets(ns).List(ctx, metav1.ListOptions{})
		if err != nil {
			t.Fatal(err)
		}
		got := map[string]string{}
		for _, s := range list.Items {
			got[s.Name] = string(s.Data["v"])
		}
		if len(got) != secrets {
			t.Errorf("apiserver %d lists %d secrets, want %d", i, len(got), secrets)
		}
		for name, want := range w.acked {
			if got[name] != want && got[name] != w.inFlight[name] {
				t.Errorf("apiserver %d: secret %s reads %q, want the acknowledged %q", i, name, got[name], want)
			}
		}
	}
}

// testSVMFailedStalledRerun: with kube-controller-manager stopped, a
// migration deleted mid-way ends the run with exit 2 naming it; a rerun
// whose migration never moves stops after --migration-timeout with exit 1
// naming it; with kube-controller-manager back, a rerun adopts the
// migration and finishes with a clean census.
func testSVMFailedStalledRerun(ctx context.Context, t *testing.T, c *harness.Cluster) {
	populate(ctx, t, c, "svm-fail", 200, 50)
	a := mustPrimary(t, c)
	if err := c.ControllerManager.Stop(); err != nil {
		t.Fatalf("stop kube-controller-manager: %v", err)
	}

	// Deleted mid-way: exit 2, the error names the migration. Only the
	// run's own migration is deleted, not the Succeeded one of the test
	// before.
	earlier := map[types.UID]bool{}
	if m := migrationFor(ctx, t, c, "secrets", nil); m != nil {
		earlier[m.UID] = true
	}
	run := startKmsctl(ctx, t, c, rotateArgs(c, append([]string{"--force", "--migration-timeout", "5m"}, svmArgs...)...)...)
	var name string
	err := harness.Poll(ctx, 200*time.Millisecond, func() error {
		m := migrationFor(ctx, t, c, "secrets", earlier)
		if m == nil {
			return errors.New("no migration for secrets yet")
		}
		name = m.Name
		return c.APIServers[0].Client.StoragemigrationV1().StorageVersionMigrations().Delete(ctx, name, metav1.DeleteOptions{})
	})
	if err != nil {
		t.Fatalf("delete the migration: %v", err)
	}
	r := run.wait()
	rep := decodeReport(t, r.stdout)
	t.Logf("after deleting %s: exit %d, error %q", name, r.code, rep.Error)
	if r.code != 2 || !strings.Contains(rep.Error, name) || !strings.Contains(rep.Error, "deleted before it ended") {
		t.Fatalf("exit %d, error %q: want exit 2 and an error naming %s as deleted\nstderr:\n%s", r.code, rep.Error, name, r.stderr)
	}
	b := mustPrimary(t, c)
	if b == a {
		t.Fatalf("primary still %s after the failed run's promote", a)
	}

	// Stalled: nobody runs the migration; exit 1 after the timeout.
	r = runKmsctl(ctx, t, c, rotateArgs(c, append([]string{"--migration-timeout", "10s"}, svmArgs...)...)...)
	rep = decodeReport(t, r.stdout)
	t.Logf("stalled rerun: exit %d, error %q", r.code, rep.Error)
	if r.code != 1 || !strings.Contains(rep.Error, name) || !strings.Contains(rep.Error, "unchanged for") {
		t.Fatalf("exit %d, error %q: want exit 1 and an error naming %s as unchanged\nstderr:\n%s", r.code, rep.Error, name, r.stderr)
	}

	// kube-controller-manager back: the rerun finishes.
	if err := c.ControllerManager.Start(ctx); err != nil {
		t.Fatal(err)
	}
	rep = rotate(ctx, t, c, 0, append([]string{"--migration-timeout", "5m"}, svmArgs...)...)
	if rep.NewKeyID != b || rep.Remaining != 0 {
		t.Errorf("rerun: new key %s (want %s), remaining %d", rep.NewKeyID, b, rep.Remaining)
	}
	requireAllUnder(ctx, t, c, b, "secrets", "configmaps")
}

// migrationFor returns kmsctl's newest StorageVersionMigration for
// resource, leaving out those in skip, or nil.
func migrationFor(ctx context.Context, t *testing.T, c *harness.Cluster, resource string, skip map[types.UID]bool) *svmv1.StorageVersionMigration {
	t.Helper()
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	list, err := c.APIServers[0].Client.StoragemigrationV1().StorageVersionMigrations().List(cctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/managed-by=kmsctl"})
	if err != nil {
		t.Errorf("list StorageVersionMigrations: %v", err)
		return nil
	}
	var found *svmv1.StorageVersionMigration
	for i := range list.Items {
		m := &list.Items[i]
		if m.Spec.Resource.Resource == resource && !skip[m.UID] && (found == nil || m.CreationTimestamp.After(found.CreationTimestamp.Time)) {
			found = m
		}
	}
	return found
}
