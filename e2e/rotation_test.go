//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/kms-v2/kms-plugin/e2e/harness"
	"github.com/kms-v2/kms-plugin/rotation"
)

// TestRotation runs `kmsctl rotate` and `kmsctl census` against one real HA
// control plane (two apiservers, two plugins, one etcd). Subtests run in
// order on the same cluster; each starts from "every object under the
// primary" and ends there, so they do not depend on each other's objects.
func TestRotation(t *testing.T) {
	c := harness.Start(t, harness.Options{APIServers: 2})
	ctx := t.Context()

	t.Run("YoungKeyAndDryRunChangeNothing", func(t *testing.T) { testRotateChangesNothing(ctx, t, c) })
	t.Run("ForcedUnderLoad", func(t *testing.T) { testRotateUnderLoad(ctx, t, c) })
	t.Run("RetireRefusesWhileOneObjectRemains", func(t *testing.T) { testRetireRefuses(ctx, t, c) })
	t.Run("ResumesAfterKill", func(t *testing.T) { testResumeAfterKill(ctx, t, c) })
	t.Run("SurvivesRestartsMidRewrite", func(t *testing.T) { testRestartsMidRewrite(ctx, t, c) })
}

// testRotateChangesNothing: --if-older-than on a young key and --dry-run
// (even with --force) leave the keys and every stored object as they were.
func testRotateChangesNothing(ctx context.Context, t *testing.T, c *harness.Cluster) {
	populate(ctx, t, c, "rot-noop", 50, 20)
	primary := mustPrimary(t, c)
	before := storedRevisions(ctx, t, c)
	keysBefore, err := c.Keys()
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name       string
		args       []string
		wantAction rotation.Action
	}{
		{name: "young key", args: []string{"--if-older-than", "720h", "--retire", "--resources", "secrets,configmaps"}, wantAction: "skipped"},
		{name: "dry run forced", args: []string{"--force", "--dry-run", "--resources", "secrets,configmaps"}, wantAction: "dry run"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rep := rotate(ctx, t, c, 0, tc.args...)
			if got, want := rep.Action, tc.wantAction; got != want {
				t.Errorf("action: got %q, want %q", got, want)
			}
			if got, want := rep.NewKeyID, primary; got != want {
				t.Errorf("new key: got %s, want %s", got, want)
			}
		})
	}
	if got, want := mustPrimary(t, c), primary; got != want {
		t.Errorf("primary: got %s, want %s", got, want)
	}
	keysAfter, err := c.Keys()
	if err != nil {
		t.Fatal(err)
	}
	if got, want := fmt.Sprint(keysAfter), fmt.Sprint(keysBefore); got != want {
		t.Errorf("keys: got %s, want %s", got, want)
	}
	after := storedRevisions(ctx, t, c)
	for k, rev := range before {
		if after[k] != rev {
			t.Errorf("%s: mod revision %d -> %d, want unchanged", k, rev, after[k])
		}
	}
	requireAllUnder(ctx, t, c, primary, "secrets", "configmaps")
}

// storedRevisions maps every secret and configmap etcd key (outside
// kube-system, where controllers write) to its mod revision.
func storedRevisions(ctx context.Context, t *testing.T, c *harness.Cluster) map[string]int64 {
	t.Helper()
	out := map[string]int64{}
	for _, r := range []string{"secrets", "configmaps"} {
		objs, err := c.StoredObjects(ctx, r)
		if err != nil {
			t.Fatal(err)
		}
		for _, o := range objs {
			if !strings.Contains(o.Key, "/kube-system/") {
				out[o.Key] = o.ModRevision
			}
		}
	}
	return out
}

// testRotateUnderLoad: 2,000 secrets and 500 configmaps under key A;
// writers keep updating secrets through both apiservers while
// `kmsctl rotate --force --retire` runs. Afterwards every object is under
// B, A is disabled, the writers saw no error but their own 409s, and every
// acknowledged write reads back.
func testRotateUnderLoad(ctx context.Context, t *testing.T, c *harness.Cluster) {
	const secrets, configmaps = 2000, 500
	ns := populate(ctx, t, c, "rot-load", secrets, configmaps)
	a := mustPrimary(t, c)
	requireAllUnder(ctx, t, c, a, "secrets", "configmaps")

	w := startWriters(ctx, c, ns, 4, secrets)
	time.Sleep(2 * time.Second) // writers at steady state before the rotation
	rep := rotate(ctx, t, c, 0, "--force", "--retire", "--resources", "secrets,configmaps")
	time.Sleep(time.Second) // and some writes after it
	w.stop()

	b := mustPrimary(t, c)
	if b == a || rep.NewKeyID != b || rep.OldKeyID != a {
		t.Fatalf("keys: report %s -> %s, primary now %s, was %s", rep.OldKeyID, rep.NewKeyID, b, a)
	}
	requireAllUnder(ctx, t, c, b, "secrets", "configmaps")
	if got, want := keyState(t, c, a), "disabled"; got != want {
		t.Errorf("old key %s: got %s, want %s", a, got, want)
	}
	for _, s := range rep.APIServers {
		if !s.Switched || !strings.Contains(strings.Join(s.By, ","), "canary") {
			t.Errorf("apiserver %s: switched %v by %v, want proven by canary", s.URL, s.Switched, s.By)
		}
	}
	if rep.CensusAfter == nil || rep.CensusAfter.Stale() != 0 || rep.Remaining != 0 {
		t.Errorf("report census after: %+v, remaining %d", rep.CensusAfter, rep.Remaining)
	}
	st := rep.Rewrite["secrets"]
	// Writers re-encrypt some secrets before the rewrite reaches them (those
	// patches are no-ops), so only the sum is known.
	if st == nil || st.Rewritten+st.Conflicts+st.Unchanged < secrets {
		t.Errorf("secrets rewrite: %+v, want at least %d objects visited", st, secrets)
	}
	t.Logf("secrets rewrite: %d rewritten, %d unchanged, %d conflicts in %s", st.Rewritten, st.Unchanged, st.Conflicts, st.Duration)
	requireWritesKept(ctx, t, c, ns, secrets, w)
}

// testRetireRefuses: --retire disables nothing while even one object is
// under the old key (here in a resource left out of --resources, which the
// retire check scans anyway), says how many, and retires once it is gone.
func testRetireRefuses(ctx context.Context, t *testing.T, c *harness.Cluster) {
	ns := populate(ctx, t, c, "rot-refuse", 100, 20)
	a := mustPrimary(t, c)
	cmUnderA := census(ctx, t, c, a, "configmaps").Resources[0].KeyIDObjects(a)
	rep := rotate(ctx, t, c, 3, "--force", "--retire", "--resources", "secrets")
	b := rep.NewKeyID
	requireAllUnder(ctx, t, c, b, "secrets")
	if got, want := keyState(t, c, a), "enabled"; got != want {
		t.Errorf("old key %s: got %s, want %s", a, got, want)
	}
	if got, want := rep.References[a], cmUnderA; got != want {
		t.Errorf("references to %s reported: got %d, want %d", a, got, want)
	}

	// Rewrite every configmap under A but one, with the same no-op patch
	// the rewrite uses.
	objs, err := c.StoredObjects(ctx, "configmaps")
	if err != nil {
		t.Fatal(err)
	}
	kept := ""
	for _, o := range objs {
		if o.Stored.KeyID != a {
			continue
		}
		parts := strings.Split(o.Key, "/")
		if kept == "" && parts[3] == ns {
			kept = o.Key
			continue
		}
		body := fmt.Sprintf(`{"metadata":{"resourceVersion":"%d"}}`, o.ModRevision)
		if _, err := c.APIServers[0].Client.CoreV1().ConfigMaps(parts[3]).Patch(ctx, parts[4], types.MergePatchType, []byte(body), metav1.PatchOptions{}); err != nil && !isConflict(err) {
			t.Fatalf("patch %s: %v", o.Key, err)
		}
	}
	if got, want := census(ctx, t, c, b, "configmaps").Resources[0].KeyIDObjects(a), 1; got != want {
		t.Fatalf("configmaps under %s: got %d, want %d", a, got, want)
	}
	rep = rotate(ctx, t, c, 3, "--retire", "--resources", "secrets")
	if got, want := rep.References[a], 1; got != want {
		t.Errorf("references to %s: got %d, want %d", a, got, want)
	}
	if !strings.Contains(rep.RetireRefused, "1 objects") {
		t.Errorf("refusal %q does not give the count 1", rep.RetireRefused)
	}
	if got, want := keyState(t, c, a), "enabled"; got != want {
		t.Errorf("old key %s with one object left: got %s, want %s", a, got, want)
	}

	// Finishing configmaps too lets it retire A.
	rep = rotate(ctx, t, c, 0, "--retire", "--resources", "secrets,configmaps")
	requireAllUnder(ctx, t, c, b, "secrets", "configmaps")
	if got, want := keyState(t, c, a), "disabled"; got != want {
		t.Errorf("old key %s after the finishing run: got %s, want %s", a, got, want)
	}
	if got, want := rep.Action, rotation.ActionFinished; got != want {
		t.Errorf("action: got %q, want %q", got, want)
	}
}

// testResumeAfterKill: `kill -9` of rotate after creating the version,
// after promoting it, and in the middle of the rewrite; each time a plain
// rerun finishes the job without creating another version, census 100%.
func testResumeAfterKill(ctx context.Context, t *testing.T, c *harness.Cluster) {
	populate(ctx, t, c, "rot-kill", 600, 100)
	for _, phase := range []string{"create", "promote", "rewrite:150"} {
		t.Run(strings.ReplaceAll(phase, ":", "-"), func(t *testing.T) {
			before := mustPrimary(t, c)
			keysBefore, err := c.Keys()
			if err != nil {
				t.Fatal(err)
			}
			r := runKmsctl(ctx, t, c, rotateArgs(c, "--force", "--resources", "secrets,configmaps", "--crash-after", phase)...)
			if !r.killed {
				t.Fatalf("rotate --crash-after %s: exit %d, want killed\n%s", phase, r.code, r.stderr)
			}
			// The killed run's lease (4 s here) must expire before a rerun.
			rep := resumeAfterLease(ctx, t, c, "--retire", "--resources", "secrets,configmaps")
			after := mustPrimary(t, c)
			if after == before {
				t.Errorf("primary still %s after the rerun", before)
			}
			keysAfter, err := c.Keys()
			if err != nil {
				t.Fatal(err)
			}
			if got, want := len(keysAfter), len(keysBefore)+1; got != want {
				t.Errorf("key versions: got %d, want %d (exactly one created across the crash)", got, want)
			}
			if rep.Action != "resumed" {
				t.Errorf("rerun action: got %q, want resumed", rep.Action)
			}
			requireAllUnder(ctx, t, c, after, "secrets", "configmaps")
			if got, want := keyState(t, c, before), "disabled"; got != want {
				t.Errorf("old key %s: got %s, want %s", before, got, want)
			}
		})
	}
}

// resumeAfterLease reruns rotate until the killed run's lease has expired
// (exit 5 until then) and returns the finishing run's report.
func resumeAfterLease(ctx context.Context, t *testing.T, c *harness.Cluster, extra ...string) *rotation.Report {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		r := runKmsctl(ctx, t, c, rotateArgs(c, extra...)...)
		if r.code == 5 && time.Now().Before(deadline) {
			time.Sleep(time.Second)
			continue
		}
		if r.code != 0 {
			t.Fatalf("rerun: exit %d\n%s", r.code, r.stderr)
		}
		return decodeReport(t, r.stdout)
	}
}

// testRestartsMidRewrite: the plugin and then the apiserver the rewrite
// goes through are restarted while it runs; rotate still finishes with every
// object under the new key.
func testRestartsMidRewrite(ctx context.Context, t *testing.T, c *harness.Cluster) {
	populate(ctx, t, c, "rot-restart", 2000, 0)
	old := mustPrimary(t, c)
	addr := freeAddr(t)
	done := make(chan kmsctlRun, 1)
	go func() {
		// The lease is renewed through the apiserver restarted below; the
		// default duration outlasts that restart, as it does on a node (the
		// 4 s of the other cases may not, and a lost lease rightly stops the run).
		done <- runKmsctl(ctx, t, c, rotateArgs(c, "--force", "--retire", "--resources", "secrets,configmaps", "--concurrency", "1", "--metrics-addr", addr,
			"--lease-duration", rotation.DefaultLeaseDuration.String())...)
	}()
	// Wait until the rewrite has made progress, from kmsctl's own metrics;
	// a kmsctl that already ended will never serve them.
	pollCtx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	err := harness.Poll(pollCtx, 100*time.Millisecond, func() error {
		select {
		case r := <-done:
			return harness.StopPolling(fmt.Errorf("kmsctl rotate ended (exit %d) before rewriting 100 objects\n%s", r.code, r.stderr))
		default:
		}
		resp, err := http.Get("http://" + addr + "/metrics")
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		if err != nil {
			return err
		}
		m, err := harness.ParseMetrics(string(body))
		if err != nil {
			return err
		}
		if n := m.Sum("kmsctl_rotate_objects_total", nil); n < 100 {
			return fmt.Errorf("%v objects rewritten so far", n)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("rewrite never got going: %v", err)
	}
	if err := c.Plugins[0].Restart(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case r := <-done:
		t.Fatalf("rotate ended (exit %d) before the apiserver restart; the test proves nothing\n%s", r.code, r.stderr)
	default:
	}
	if err := c.APIServers[0].Restart(ctx); err != nil {
		t.Fatal(err)
	}
	t.Log("plugin 0 and kube-apiserver 0 restarted during the rewrite")
	r := <-done
	if r.code != 0 {
		t.Fatalf("rotate: exit %d\n%s", r.code, r.stderr)
	}
	rep := decodeReport(t, r.stdout)
	t.Logf("passes %d, rewrite %+v", rep.Passes, rep.Rewrite["secrets"])
	requireAllUnder(ctx, t, c, rep.NewKeyID, "secrets", "configmaps")
	if got, want := keyState(t, c, old), "disabled"; got != want {
		t.Errorf("old key: got %s, want %s", got, want)
	}
	for _, a := range c.APIServers {
		if !a.Running() {
			t.Errorf("%s is not running after the restart", a.URL)
		}
	}
}
