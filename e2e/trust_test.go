//go:build e2e

package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/sync/errgroup"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/kms-v2/kms-plugin/e2e/harness"
	"github.com/kms-v2/kms-plugin/rotation"
	"github.com/kms-v2/kms-plugin/rotation/etcdlayout"
)

// TestRotationTrust runs the ways a rotation could give a wrong proof, or
// fail to finish, against one real control plane (one apiserver, one
// plugin, one etcd), in order. Each subtest that changes the
// EncryptionConfiguration puts the default one back, and each ends with
// every secret and configmap stored as the apiserver writes, so the next
// starts clean.
func TestRotationTrust(t *testing.T) {
	c := harness.Start(t, harness.Options{})
	ctx := t.Context()

	t.Run("WrongEtcd", func(t *testing.T) { testWrongEtcd(ctx, t, c) })
	t.Run("DeadEtcd", func(t *testing.T) { testDeadEtcd(ctx, t, c) })
	t.Run("EtcdTLS", func(t *testing.T) { testEtcdTLS(ctx, t, c) })
	t.Run("ProviderRename", func(t *testing.T) { testProviderRename(ctx, t, c) })
	t.Run("AdoptPlaintext", func(t *testing.T) {
		testAdopt(ctx, t, c, "plain", []harness.EncryptionProvider{harness.Identity(), harness.KMS(c.ProviderName)},
			[]harness.EncryptionProvider{harness.KMS(c.ProviderName), harness.Identity()})
	})
	t.Run("AdoptAESCBC", func(t *testing.T) {
		testAdopt(ctx, t, c, "aescbc", []harness.EncryptionProvider{harness.AESCBC("key1"), harness.KMS(c.ProviderName), harness.Identity()},
			[]harness.EncryptionProvider{harness.KMS(c.ProviderName), harness.AESCBC("key1"), harness.Identity()})
	})
	t.Run("ResumeAfterSIGKILL", func(t *testing.T) { testResumeAfterSIGKILL(ctx, t, c) })
}

// testWrongEtcd: pointed at a second, empty etcd, `rotate --force --retire`
// must stop before any change (the old code found 0 objects there, called
// the rotation done and disabled the key every real object was under), and
// say which etcd it read.
func testWrongEtcd(ctx context.Context, t *testing.T, c *harness.Cluster) {
	populate(ctx, t, c, "trust-wrong", 150, 30)
	primary := mustPrimary(t, c)
	keysBefore, err := c.Keys()
	if err != nil {
		t.Fatal(err)
	}
	before := storedRevisions(ctx, t, c)
	spare, err := c.StartSpareEtcd(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer spare.Stop()

	args := withFlag(rotateArgs(c, "--force", "--retire", "--resources", "secrets,configmaps"), "--etcd-endpoints", spare.Endpoint)
	r := runKmsctl(ctx, t, c, args...)
	if r.code != 1 || r.killed {
		t.Errorf("rotate against the spare etcd: exit %d (killed %v), want 1\nstderr:\n%s", r.code, r.killed, r.stderr)
	}
	host := strings.TrimPrefix(spare.Endpoint, "https://")
	t.Logf("rotate against the spare etcd: %s", lastLine(r.stderr))
	if !strings.Contains(lastLine(r.stderr), host) {
		t.Errorf("rotate's error line does not name the etcd it read (%s):\n%s", host, r.stderr)
	}
	if rep := decodeReport(t, r.stdout); !strings.Contains(rep.Error, host) || rep.ExitCode != 1 {
		t.Errorf("report: error %q, exit code %d; want the spare etcd %s named and 1", rep.Error, rep.ExitCode, host)
	}

	keysAfter, err := c.Keys()
	if err != nil {
		t.Fatal(err)
	}
	if got, want := fmt.Sprint(keysAfter), fmt.Sprint(keysBefore); got != want {
		t.Errorf("key versions changed by a refused run:\ngot  %s\nwant %s", got, want)
	}
	if got := keyState(t, c, primary); got != "primary" {
		t.Errorf("key %s: got %s, want still primary", primary, got)
	}
	after := storedRevisions(ctx, t, c)
	for k, rev := range before {
		if after[k] != rev {
			t.Errorf("%s: mod revision %d -> %d, want unchanged", k, rev, after[k])
		}
	}
	// kmsctl only reads etcd: the spare stays empty.
	resp, err := spare.Client.Get(ctx, "", clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil {
		t.Fatal(err)
	}
	if resp.Count != 0 {
		t.Errorf("the spare etcd holds %d keys after the run, want 0", resp.Count)
	}
	requireAllUnder(ctx, t, c, primary, "secrets", "configmaps")
}

// testDeadEtcd: an etcd endpoint that refuses connections, and one that
// accepts them and never answers, make both `census` and
// `rotate --dry-run` fail within 15 s with a line naming the endpoint (the
// old census waited up to 30 minutes, and a dry run had no deadline).
func testDeadEtcd(ctx context.Context, t *testing.T, c *harness.Cluster) {
	silent := silentListener(t)
	endpoints := []struct{ name, addr string }{
		{"refused", freeAddr(t)},
		{"silent", silent},
	}
	for _, ep := range endpoints {
		t.Run(ep.name, func(t *testing.T) {
			url := "https://" + ep.addr
			for _, cmd := range []struct {
				name string
				args []string
			}{
				{"census", withFlag(censusArgs(c, "--resources", "secrets"), "--etcd-endpoints", url)},
				{"rotate --dry-run", withFlag(rotateArgs(c, "--dry-run", "--resources", "secrets"), "--etcd-endpoints", url)},
			} {
				// A hang must fail the test, not stall it.
				runCtx, cancel := context.WithTimeout(ctx, 90*time.Second)
				start := time.Now()
				r := runKmsctl(runCtx, t, c, cmd.args...)
				took := time.Since(start)
				cancel()
				if r.code == 0 || r.killed {
					t.Errorf("%s against %s etcd %s: exit %d (killed %v) after %s, want a non-zero exit\nstderr:\n%s", cmd.name, ep.name, url, r.code, r.killed, took.Round(time.Millisecond), r.stderr)
					continue
				}
				if took >= 15*time.Second {
					t.Errorf("%s against %s etcd %s: took %s, want under 15s", cmd.name, ep.name, url, took.Round(time.Millisecond))
				}
				if line := lastLine(r.stderr); !strings.Contains(line, ep.addr) {
					t.Errorf("%s against %s etcd: last stderr line %q does not name %s\nstderr:\n%s", cmd.name, ep.name, line, ep.addr, r.stderr)
				}
				t.Logf("%s against %s etcd: exit %d in %s: %s", cmd.name, ep.name, r.code, took.Round(time.Millisecond), lastLine(r.stderr))
			}
		})
	}
}

// testProviderRename: objects written under KMS provider name "a", then the
// EncryptionConfiguration puts the cluster's provider (call it b, same
// plugin socket, same key) first and a second. The old census compared
// key_ids only, called them current, and an operator who then dropped a
// made them unreadable.
func testProviderRename(ctx context.Context, t *testing.T, c *harness.Cluster) {
	const old = "a"
	const secrets, configmaps = 200, 50
	api := c.APIServers[0]
	key := mustPrimary(t, c)
	defer restoreEncryption(ctx, t, c, harness.KMS(c.ProviderName), harness.KMS(old), harness.Identity())
	if err := api.Reconfigure(ctx, harness.KMS(old), harness.KMS(c.ProviderName), harness.Identity()); err != nil {
		t.Fatal(err)
	}
	ns := populate(ctx, t, c, "trust-rename", secrets, configmaps)
	ours := storedIn(ctx, t, c, ns)
	for _, o := range ours {
		if o.Stored.Encoding != etcdlayout.EncodingKMSv2 || o.Stored.Provider != old || o.Stored.KeyID != key {
			t.Fatalf("%s stored as %s provider %q key %q, want kms v2 provider %q key %s", o.Key, o.Stored.Encoding, o.Stored.Provider, o.Stored.KeyID, old, key)
		}
	}

	if err := api.Reconfigure(ctx, harness.KMS(c.ProviderName), harness.KMS(old), harness.Identity()); err != nil {
		t.Fatal(err)
	}
	cs := kmsctlCensus(ctx, t, c, 2, "--encryption-config", api.EncryptionConfig)
	for _, want := range []struct {
		resource string
		n        int
	}{{"secrets", secrets}, {"configmaps", configmaps}} {
		rc := cs.Resource(want.resource)
		if rc == nil {
			t.Fatalf("census has no %s: %+v", want.resource, cs)
		}
		if got := rc.Objects(old, key); got < want.n || rc.Stale < want.n {
			t.Errorf("census %s: %d under provider %q (stale %d, by provider %+v), want at least %d", want.resource, got, old, rc.Stale, rc.ByProvider, want.n)
		}
	}

	rep := rotate(ctx, t, c, 0, "--encryption-config", api.EncryptionConfig)
	t.Logf("rotate: action %s, %d passes, rewrite %s", rep.Action, rep.Passes, rewriteLine(rep))
	for _, want := range []struct {
		resource string
		n        int
	}{{"secrets", secrets}, {"configmaps", configmaps}} {
		if st := rep.Rewrite[want.resource]; st == nil || st.Rewritten < int64(want.n) {
			t.Errorf("rewrite of %s: %+v, want at least %d rewritten", want.resource, st, want.n)
		}
	}
	if rep.CensusAfter == nil {
		t.Fatal("report has no census after")
	}
	for _, rc := range rep.CensusAfter.Resources {
		for _, pc := range rc.ByProvider {
			if pc.Provider == old && pc.Objects > 0 {
				t.Errorf("report census after: %s has %d objects under provider %q", rc.Resource, pc.Objects, old)
			}
		}
	}
	requireAllUnder(ctx, t, c, key, "secrets", "configmaps")
	kmsctlCensus(ctx, t, c, 0, "--encryption-config", api.EncryptionConfig)

	// Drop a: every object must still read.
	if err := api.Reconfigure(ctx, c.DefaultEncryptionProviders()...); err != nil {
		t.Fatal(err)
	}
	checkPopulated(ctx, t, c, ns, secrets, configmaps)
}

// testAdopt: secrets written while `from` was the EncryptionConfiguration
// (identity or aescbc first), then `to` puts the plugin first. The census
// must call them not current (the old one counted plaintext and aescbc as
// "unencrypted"/"other" and exited 0), and a plain `kmsctl rotate`, with
// writers running, must move every one under the plugin.
func testAdopt(ctx context.Context, t *testing.T, c *harness.Cluster, name string, from, to []harness.EncryptionProvider) {
	const secrets, configmaps = 200, 20
	api := c.APIServers[0]
	key := mustPrimary(t, c)
	defer restoreEncryption(ctx, t, c, to...)
	if err := api.Reconfigure(ctx, from...); err != nil {
		t.Fatal(err)
	}
	ns := populate(ctx, t, c, "trust-"+name, secrets, configmaps)
	wantEncoding := etcdlayout.EncodingPlain
	if name != "plain" {
		wantEncoding = etcdlayout.EncodingOther
	}
	for _, o := range storedIn(ctx, t, c, ns) {
		if o.Stored.Encoding != wantEncoding {
			t.Fatalf("%s stored as %s %s, want %s", o.Key, o.Stored.Encoding, o.Stored.Kind, wantEncoding)
		}
	}

	if err := api.Reconfigure(ctx, to...); err != nil {
		t.Fatal(err)
	}
	cs := kmsctlCensus(ctx, t, c, 2, "--encryption-config", api.EncryptionConfig)
	for _, want := range []struct {
		resource string
		n        int
	}{{"secrets", secrets}, {"configmaps", configmaps}} {
		rc := cs.Resource(want.resource)
		if rc == nil {
			t.Fatalf("census has no %s: %+v", want.resource, cs)
		}
		got := rc.Plaintext
		if wantEncoding == etcdlayout.EncodingOther {
			got = rc.Other
		}
		if got < want.n || rc.Stale < want.n {
			t.Errorf("census %s: %d %s (stale %d), want at least %d", want.resource, got, wantEncoding, rc.Stale, want.n)
		}
	}

	// The writers update only the first secrets: what they write is
	// encrypted anyway, so the rest must be adopted by the rewrite itself.
	const written = 50
	w := startWriters(ctx, c, ns, 2, written)
	time.Sleep(time.Second)
	rep := rotate(ctx, t, c, 0, "--encryption-config", api.EncryptionConfig)
	time.Sleep(500 * time.Millisecond)
	w.stop()
	t.Logf("rotate: action %s, %d passes, rewrite %s; writers: %d writes, %d conflicts", rep.Action, rep.Passes, rewriteLine(rep), w.writes, w.conflicts)
	for _, want := range []struct {
		resource string
		n        int
	}{{"secrets", secrets - written}, {"configmaps", configmaps}} {
		if st := rep.Rewrite[want.resource]; st == nil || st.Rewritten < int64(want.n) {
			t.Errorf("rewrite of %s: %+v, want at least %d rewritten", want.resource, st, want.n)
		}
	}
	if len(w.errs) > 0 {
		t.Errorf("writers saw %d errors other than 409, first: %v", len(w.errs), w.errs[0])
	}
	if w.writes == 0 {
		t.Error("writers made no write during the rotation")
	}
	if got := mustPrimary(t, c); got != key {
		t.Errorf("primary: got %s, want %s (no --force: adoption creates no key)", got, key)
	}
	cs = kmsctlCensus(ctx, t, c, 0, "--encryption-config", api.EncryptionConfig)
	for _, rc := range cs.Resources {
		if rc.Plaintext != 0 || rc.Other != 0 || rc.Stale != 0 {
			t.Errorf("census after: %s has %d plaintext, %d other, %d stale; want 0", rc.Resource, rc.Plaintext, rc.Other, rc.Stale)
		}
	}
	requireAllUnder(ctx, t, c, key, "secrets", "configmaps")
	checkWrites(ctx, t, c, ns, w, secrets)

	if err := api.Reconfigure(ctx, c.DefaultEncryptionProviders()...); err != nil {
		t.Fatal(err)
	}
	checkWrites(ctx, t, c, ns, w, secrets)
}

// testResumeAfterSIGKILL: a rotation SIGKILLed mid-rewrite with a 10-minute
// lease is rerun at once with the same flags. The rerun must see the holder
// is dead, take the lease over and be rewriting within 10 s (the old code
// exited 5 until the lease expired), and finish with a clean census.
func testResumeAfterSIGKILL(ctx context.Context, t *testing.T, c *harness.Cluster) {
	populate(ctx, t, c, "trust-kill", 3000, 0)
	old := mustPrimary(t, c)
	addr := freeAddr(t)
	args := withFlag(rotateArgs(c, "--force", "--resources", "secrets,configmaps", "--metrics-addr", addr, "--concurrency", "4"), "--lease-duration", "10m")

	first := startKmsctl(ctx, t, c, args...)
	err := harness.Poll(ctx, 50*time.Millisecond, func() error {
		if first.exited() {
			return harness.StopPolling(fmt.Errorf("rotate exited before the rewrite got going"))
		}
		n, err := rewrittenSoFar(addr)
		if err != nil {
			return err
		}
		if n <= 100 {
			return fmt.Errorf("%v objects rewritten so far", n)
		}
		return nil
	})
	if err != nil {
		r := first.wait()
		t.Fatalf("first run: %v (exit %d)\nstderr:\n%s", err, r.code, r.stderr)
	}
	n, _ := rewrittenSoFar(addr)
	if err := first.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	r := first.wait()
	if !r.killed {
		t.Fatalf("first run ended on its own (exit %d) before the SIGKILL; the test proves nothing\nstderr:\n%s", r.code, r.stderr)
	}
	t.Logf("first run SIGKILLed after about %v objects", n)

	start := time.Now()
	rerun := startKmsctl(ctx, t, c, args...)
	var rewriting time.Duration
	err = harness.Poll(ctx, 50*time.Millisecond, func() error {
		if rerun.exited() {
			return harness.StopPolling(fmt.Errorf("rerun exited before rewriting anything"))
		}
		if time.Since(start) > 30*time.Second {
			return harness.StopPolling(fmt.Errorf("no object rewritten after %s", time.Since(start).Round(time.Millisecond)))
		}
		n, err := rewrittenSoFar(addr)
		if err != nil {
			return err
		}
		if n == 0 {
			return fmt.Errorf("nothing rewritten yet")
		}
		rewriting = time.Since(start)
		return nil
	})
	rr := rerun.wait()
	if err != nil {
		t.Fatalf("rerun: %v; exit %d after %s\nstderr:\n%s", err, rr.code, time.Since(start).Round(time.Millisecond), rr.stderr)
	}
	t.Logf("rerun: rewriting %s after its start (first rewrite line on stderr after %s); exit %d after %s",
		rewriting.Round(time.Millisecond), rerun.firstLine("rewrite").Round(time.Millisecond), rr.code, time.Since(start).Round(time.Millisecond))
	if rewriting > 10*time.Second {
		t.Errorf("rerun: first object rewritten %s after its start, want within 10s", rewriting.Round(time.Millisecond))
	}
	if rr.code != 0 || rr.killed {
		t.Fatalf("rerun: exit %d (killed %v), want 0\nstderr:\n%s", rr.code, rr.killed, rr.stderr)
	}
	if !strings.Contains(rr.stderr, "is dead") {
		t.Errorf("rerun's stderr does not say the holder is dead:\n%s", rr.stderr)
	}
	rep := decodeReport(t, rr.stdout)
	if rep.LeaseTakenOver == "" {
		t.Errorf("report: leaseTakenOver empty, want the killed run's identity")
	}
	if rep.Action != rotation.ActionResumed {
		t.Errorf("rerun action: got %q, want %q", rep.Action, rotation.ActionResumed)
	}
	now := mustPrimary(t, c)
	if now == old || rep.NewKeyID != now {
		t.Errorf("keys: primary %s (was %s), report new key %s", now, old, rep.NewKeyID)
	}
	requireAllUnder(ctx, t, c, now, "secrets", "configmaps")
}

// TestRotationCustomPrefix: an apiserver started with --etcd-prefix=/custom.
// Without --etcd-prefix, rotate reads /registry, where nothing of this
// cluster is, and must refuse before any change (the old code found nothing
// to do and called it proven); with --etcd-prefix /custom it rotates.
func TestRotationCustomPrefix(t *testing.T) {
	c := harness.Start(t, harness.Options{EtcdPrefix: "/custom"})
	ctx := t.Context()
	populate(ctx, t, c, "prefix", 150, 20)
	defaultLayout := etcdlayout.Default()
	if resp, err := c.Etcd.Client.Get(ctx, defaultLayout.All(), clientv3.WithPrefix(), clientv3.WithCountOnly()); err != nil || resp.Count != 0 {
		t.Fatalf("keys under %s: %v (err %v), want none: the apiserver should store under /custom", defaultLayout.All(), resp, err)
	}
	old := mustPrimary(t, c)
	keysBefore, err := c.Keys()
	if err != nil {
		t.Fatal(err)
	}

	r := runKmsctl(ctx, t, c, rotateArgs(c, "--force", "--resources", "secrets")...)
	if r.code != 1 || r.killed {
		t.Errorf("rotate without --etcd-prefix: exit %d (killed %v), want 1\nstderr:\n%s", r.code, r.killed, r.stderr)
	}
	t.Logf("rotate without --etcd-prefix: %s", lastLine(r.stderr))
	if line := lastLine(r.stderr); !strings.Contains(line, defaultLayout.Prefix()) {
		t.Errorf("rotate's error line %q does not name the prefix it read (%s)\nstderr:\n%s", line, defaultLayout.Prefix(), r.stderr)
	}
	keysAfter, err := c.Keys()
	if err != nil {
		t.Fatal(err)
	}
	if got, want := fmt.Sprint(keysAfter), fmt.Sprint(keysBefore); got != want {
		t.Fatalf("key versions changed by a refused run:\ngot  %s\nwant %s", got, want)
	}

	rep := rotate(ctx, t, c, 0, "--force", "--resources", "secrets", "--etcd-prefix", c.Layout.Prefix())
	now := mustPrimary(t, c)
	if now == old || rep.NewKeyID != now {
		t.Errorf("keys: primary %s (was %s), report new key %s", now, old, rep.NewKeyID)
	}
	if rep.CensusAfter == nil || rep.CensusAfter.Prefix != c.Layout.Prefix() && rep.CensusAfter.Prefix != c.Layout.All() {
		t.Errorf("report census after: %+v, want one under %s", rep.CensusAfter, c.Layout)
	}
	cs := requireAllUnder(ctx, t, c, now, "secrets")
	if got := cs.Resource("secrets"); got == nil || got.Total < 150 {
		t.Errorf("census under %s: %+v, want at least the 150 secrets", c.Layout, got)
	}
	kmsctlCensus(ctx, t, c, 0, "--resources", "secrets", "--encryption-config", c.APIServers[0].EncryptionConfig)
}

// restoreEncryption puts apiserver 0 back on the default
// EncryptionConfiguration unless the subtest already did. A subtest that
// stopped half way may have left objects that only readers can read (under
// another provider name, plaintext, aescbc): those are first rewritten
// under readers, whose first entry must be the cluster's KMS provider, so
// that the next subtests start from a readable, current cluster whatever
// went wrong here.
func restoreEncryption(ctx context.Context, t *testing.T, c *harness.Cluster, readers ...harness.EncryptionProvider) {
	t.Helper()
	api := c.APIServers[0]
	want, err := api.RenderEncryptionConfig(c.DefaultEncryptionProviders()...)
	if err != nil {
		t.Fatal(err)
	}
	if have, err := os.ReadFile(api.EncryptionConfig); err == nil && bytes.Equal(have, want) {
		return
	}
	t.Logf("restoring the default EncryptionConfiguration after a failure, through %v", readers)
	if err := api.Reconfigure(ctx, readers...); err != nil {
		t.Errorf("restore: %v", err)
		return
	}
	if err := rewriteNotCurrent(ctx, c); err != nil {
		t.Errorf("restore: %v", err)
		return
	}
	if err := api.Reconfigure(ctx, c.DefaultEncryptionProviders()...); err != nil {
		t.Errorf("restore: %v", err)
	}
}

// rewriteNotCurrent rewrites, through apiserver 0, every secret and
// configmap etcd does not hold as KMS v2 under the cluster's provider name,
// with the resourceVersion-only patch kmsctl uses (the apiserver rewrites a
// value its first provider did not write). It does not use kmsctl, so it
// works while kmsctl is what is broken.
func rewriteNotCurrent(ctx context.Context, c *harness.Cluster) error {
	core := c.APIServers[0].Client.CoreV1()
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(16)
	for _, r := range []string{"secrets", "configmaps"} {
		objs, err := c.StoredObjects(ctx, r)
		if err != nil {
			return err
		}
		for _, o := range objs {
			if o.Stored.Encoding == etcdlayout.EncodingKMSv2 && o.Stored.Provider == c.ProviderName {
				continue
			}
			k, err := c.Layout.ParseKey(o.Key, r)
			if err != nil {
				return err
			}
			patch := []byte(fmt.Sprintf(`{"metadata":{"resourceVersion":"%d"}}`, o.ModRevision))
			g.Go(func() error {
				var err error
				if r == "secrets" {
					_, err = core.Secrets(k.Namespace).Patch(gctx, k.Name, types.MergePatchType, patch, metav1.PatchOptions{})
				} else {
					_, err = core.ConfigMaps(k.Namespace).Patch(gctx, k.Name, types.MergePatchType, patch, metav1.PatchOptions{})
				}
				if err != nil && !apierrors.IsConflict(err) && !apierrors.IsNotFound(err) {
					return fmt.Errorf("rewrite %s: %w", o.Key, err)
				}
				return nil
			})
		}
	}
	return g.Wait()
}

// censusArgs are the flags `kmsctl census` needs here: apiserver 0's
// kubeconfig (the etcd proof), the etcd and prefix, the plugin config (the
// current key_id), the EncryptionConfiguration (which provider writes), JSON.
func censusArgs(c *harness.Cluster, extra ...string) []string {
	args := append([]string{"census", "--config", c.KmsctlConfig(), "--kubeconfig", c.APIServers[0].Kubeconfig}, c.EtcdFlags()...)
	args = append(args, "--etcd-prefix", c.Layout.Prefix(), "--encryption-config", c.APIServers[0].EncryptionConfig, "-o", "json")
	for i := 0; i < len(extra); i++ {
		if i+1 < len(extra) && strings.HasPrefix(extra[i], "--") && hasFlagArg(args, extra[i]) {
			args = withFlag(args, extra[i], extra[i+1])
			i++
			continue
		}
		args = append(args, extra[i])
	}
	return args
}

// kmsctlCensus runs `kmsctl census -o json`, fails the test unless it
// exits wantCode, and decodes the census.
func kmsctlCensus(ctx context.Context, t *testing.T, c *harness.Cluster, wantCode int, extra ...string) *rotation.Census {
	t.Helper()
	r := runKmsctl(ctx, t, c, censusArgs(c, extra...)...)
	if r.code != wantCode || r.killed {
		t.Fatalf("kmsctl census %v: exit %d (killed %v), want %d\nstderr:\n%s\nstdout:\n%s", extra, r.code, r.killed, wantCode, r.stderr, r.stdout)
	}
	var cs rotation.Census
	if err := json.Unmarshal([]byte(r.stdout), &cs); err != nil {
		t.Fatalf("kmsctl census -o json: %v\n%s", err, r.stdout)
	}
	return &cs
}

// withFlag sets flag to value in args: every existing "--flag value" or
// "--flag=value" is replaced, else the pair is appended.
func withFlag(args []string, flag, value string) []string {
	out := make([]string, 0, len(args)+2)
	set := false
	for i := 0; i < len(args); i++ {
		switch {
		case args[i] == flag && i+1 < len(args):
			out = append(out, flag, value)
			set = true
			i++
		case strings.HasPrefix(args[i], flag+"="):
			out = append(out, flag+"="+value)
			set = true
		default:
			out = append(out, args[i])
		}
	}
	if !set {
		out = append(out, flag, value)
	}
	return out
}

func hasFlagArg(args []string, flag string) bool {
	for _, a := range args {
		if a == flag || strings.HasPrefix(a, flag+"=") {
			return true
		}
	}
	return false
}

// lastLine is the last non-empty line of s: where kmsctl prints its error.
func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return strings.TrimSpace(lines[len(lines)-1])
}

// silentListener accepts TCP connections and never answers on them: an
// endpoint that hangs every client without a deadline. It lives until the
// test ends.
func silentListener(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var conns []net.Conn
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, conn) // held open, never read or written
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	})
	return ln.Addr().String()
}

// storedIn reads every secret and configmap of namespace ns from etcd.
func storedIn(ctx context.Context, t *testing.T, c *harness.Cluster, ns string) []harness.StoredObject {
	t.Helper()
	var out []harness.StoredObject
	for _, r := range []string{"secrets", "configmaps"} {
		objs, err := c.StoredObjects(ctx, r+"/"+ns)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, objs...)
	}
	if len(out) == 0 {
		t.Fatalf("nothing stored in namespace %s", ns)
	}
	return out
}

// checkPopulated GETs, one by one through apiserver 0, every object
// populate created in ns and compares its data.
func checkPopulated(ctx context.Context, t *testing.T, c *harness.Cluster, ns string, secrets, configmaps int) {
	t.Helper()
	core := c.APIServers[0].Client.CoreV1()
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(16)
	for i := range secrets + configmaps {
		g.Go(func() error {
			want := fmt.Sprintf("initial-%d", i)
			if i < secrets {
				name := fmt.Sprintf("s-%05d", i)
				s, err := core.Secrets(ns).Get(gctx, name, metav1.GetOptions{})
				if err != nil {
					return fmt.Errorf("get secret %s/%s: %w", ns, name, err)
				}
				if got := string(s.Data["v"]); got != want {
					return fmt.Errorf("secret %s/%s reads %q, want %q", ns, name, got, want)
				}
				return nil
			}
			name := fmt.Sprintf("cm-%05d", i)
			cm, err := core.ConfigMaps(ns).Get(gctx, name, metav1.GetOptions{})
			if err != nil {
				return fmt.Errorf("get configmap %s/%s: %w", ns, name, err)
			}
			if got := cm.Data["v"]; got != want {
				return fmt.Errorf("configmap %s/%s reads %q, want %q", ns, name, got, want)
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		t.Error(err)
	}
}

// checkWrites lists the secrets of ns through apiserver 0 and checks each
// reads its last acknowledged write, or its initial value if none.
func checkWrites(ctx context.Context, t *testing.T, c *harness.Cluster, ns string, w *writers, secrets int) {
	t.Helper()
	list, err := c.APIServers[0].Client.CoreV1().Secrets(ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatalf("list secrets of %s: %v", ns, err)
	}
	got := map[string]string{}
	for _, s := range list.Items {
		got[s.Name] = string(s.Data["v"])
	}
	if len(got) != secrets {
		t.Errorf("%s lists %d secrets, want %d", ns, len(got), secrets)
	}
	wrong := 0
	for i := range secrets {
		name := fmt.Sprintf("s-%05d", i)
		want, ok := w.acked[name]
		if !ok {
			want = fmt.Sprintf("initial-%d", i)
		}
		if got[name] != want && got[name] != w.inFlight[name] {
			if wrong++; wrong <= 5 {
				t.Errorf("secret %s/%s reads %q, want %q", ns, name, got[name], want)
			}
		}
	}
}

// rewriteLine summarizes a report's rewrite for the log.
func rewriteLine(rep *rotation.Report) string {
	var parts []string
	for name, st := range rep.Rewrite {
		parts = append(parts, fmt.Sprintf("%s %d rewritten/%d unchanged/%d conflicts", name, st.Rewritten, st.Unchanged, st.Conflicts))
	}
	return strings.Join(parts, ", ")
}

// rewrittenSoFar reads kmsctl_rotate_objects_total from a running kmsctl.
func rewrittenSoFar(addr string) (float64, error) {
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, err
	}
	m, err := harness.ParseMetrics(string(body))
	if err != nil {
		return 0, err
	}
	return m.Sum("kmsctl_rotate_objects_total", nil), nil
}

// runningKmsctl is a kmsctl process started in the background, with its
// stderr lines timestamped.
type runningKmsctl struct {
	cmd     *exec.Cmd
	start   time.Time
	stdout  bytes.Buffer
	stderr  lineLog
	done    chan struct{}
	waitErr error
}

func startKmsctl(ctx context.Context, t *testing.T, c *harness.Cluster, args ...string) *runningKmsctl {
	t.Helper()
	k := &runningKmsctl{cmd: exec.CommandContext(ctx, c.KmsctlPath(), args...), done: make(chan struct{})}
	k.cmd.Stdout, k.cmd.Stderr = &k.stdout, &k.stderr
	k.start = time.Now()
	k.stderr.start = k.start
	if err := k.cmd.Start(); err != nil {
		t.Fatalf("kmsctl %s: %v", strings.Join(args, " "), err)
	}
	go func() {
		k.waitErr = k.cmd.Wait()
		close(k.done)
	}()
	return k
}

func (k *runningKmsctl) exited() bool {
	select {
	case <-k.done:
		return true
	default:
		return false
	}
}

// wait waits for the process and reports how it ended.
func (k *runningKmsctl) wait() kmsctlRun {
	<-k.done
	r := kmsctlRun{stdout: k.stdout.String(), stderr: k.stderr.String()}
	if k.waitErr != nil {
		r.code = -1
		if ee, ok := k.waitErr.(*exec.ExitError); ok {
			r.code = ee.ExitCode()
			if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() && ws.Signal() == syscall.SIGKILL {
				r.killed = true
			}
		}
	}
	return r
}

// firstLine is when the first stderr line containing s was written,
// measured from the start; -1 if none was.
func (k *runningKmsctl) firstLine(s string) time.Duration {
	return k.stderr.first(s)
}

// lineLog is an io.Writer that keeps the text and when each line arrived.
type lineLog struct {
	mu    sync.Mutex
	start time.Time
	buf   bytes.Buffer
	lines []timedLine
	part  []byte
}

type timedLine struct {
	at   time.Duration
	text string
}

func (l *lineLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.buf.Write(p)
	l.part = append(l.part, p...)
	for {
		i := bytes.IndexByte(l.part, '\n')
		if i < 0 {
			break
		}
		l.lines = append(l.lines, timedLine{at: time.Since(l.start), text: string(l.part[:i])})
		l.part = l.part[i+1:]
	}
	return len(p), nil
}

func (l *lineLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

func (l *lineLog) first(s string) time.Duration {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, ln := range l.lines {
		if strings.Contains(ln.text, s) {
			return ln.at
		}
	}
	return -1
}
