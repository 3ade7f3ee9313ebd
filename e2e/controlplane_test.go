//go:build e2e

package e2e

import (
	"bytes"
	"context"
	"encoding/base64"
	"fmt"
	"net/http"
	"os"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kms-v2/kms-plugin/e2e/harness"
	"github.com/kms-v2/kms-plugin/rotation/etcdlayout"
)

// TestControlPlane runs every scenario on one HA control plane (two
// apiservers, two plugin instances, one etcd): starting one costs more than
// most scenarios. Subtests run in order and leave the cluster running with
// every plugin up; later ones rely only on that, not on earlier objects.
func TestControlPlane(t *testing.T) {
	c := harness.Start(t, harness.Options{APIServers: 2})
	ctx := t.Context()

	t.Run("StoredEncryptedUnderPrimaryKey", func(t *testing.T) { testStoredEncrypted(ctx, t, c) })
	t.Run("ReadyzFollowsPluginHealth", func(t *testing.T) { testReadyzFollowsPlugin(ctx, t, c) })
	t.Run("PromoteSwitchesEveryAPIServer", func(t *testing.T) { testPromote(ctx, t, c) })
	t.Run("HAReadsAcrossAPIServers", func(t *testing.T) { testHA(ctx, t, c) })
	t.Run("RestartDecryptsOncePerSeed", func(t *testing.T) { testRestartDecryptsOncePerSeed(ctx, t, c) })
}

// testStoredEncrypted: what the apiserver writes to etcd carries the
// provider prefix and the plugin's primary key_id, and no secret value
// appears anywhere in etcd.
func testStoredEncrypted(ctx context.Context, t *testing.T, c *harness.Cluster) {
	ns := cpNamespace(ctx, t, c)
	primary := cpPrimary(t, c)
	for i := range c.Plugins {
		m, err := c.PluginMetrics(ctx, i)
		if err != nil {
			t.Fatal(err)
		}
		if got, want := m.LabelValues("kms_plugin_primary_key_info", "key_id_hash"), []string{harness.KeyIDHash(primary)}; !cpSameSet(got, want) {
			t.Errorf("plugin %d kms_plugin_primary_key_info key_id_hash: got %v, want %v (kmsctl primary %q)", i, got, want, primary)
		}
	}

	// Values no encoding of the object could contain by chance.
	secretValue := "s3cret-" + cpRandom(t)
	cmValue := "c0nfig-" + cpRandom(t)
	var objects []cpObject
	for i, a := range c.APIServers {
		s := fmt.Sprintf("secret-%d", i)
		if _, err := a.Client.CoreV1().Secrets(ns).Create(ctx, &corev1.Secret{
			ObjectMeta: metav1.ObjectMeta{Name: s},
			Data:       map[string][]byte{"password": []byte(secretValue)},
			StringData: map[string]string{"token": secretValue},
		}, metav1.CreateOptions{}); err != nil {
			t.Fatalf("create secret through kube-apiserver-%d: %v", i, err)
		}
		cm := fmt.Sprintf("configmap-%d", i)
		if _, err := a.Client.CoreV1().ConfigMaps(ns).Create(ctx, &corev1.ConfigMap{
			ObjectMeta: metav1.ObjectMeta{Name: cm},
			Data:       map[string]string{"setting": cmValue},
		}, metav1.CreateOptions{}); err != nil {
			t.Fatalf("create configmap through kube-apiserver-%d: %v", i, err)
		}
		objects = append(objects, cpObject{"secrets", ns, s}, cpObject{"configmaps", ns, cm})
	}

	wantPrefix := etcdlayout.KMSv2Prefix + c.ProviderName + ":"
	for _, o := range objects {
		got, err := c.StoredObject(ctx, o.etcdKey(c))
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.HasPrefix(got.Raw, []byte(wantPrefix)) {
			t.Errorf("%s: stored value starts %q, want prefix %q", o, cpPrintable(got.Raw, len(wantPrefix)), wantPrefix)
		}
		if got.Stored.Encoding != etcdlayout.EncodingKMSv2 || got.Stored.KeyID != primary {
			t.Errorf("%s: stored as %s under key_id %q (err %v), want kmsv2 under the primary %q", o, got.Stored.Encoding, got.Stored.KeyID, got.Stored.Err, primary)
		}
	}

	// The scan must be able to fail: a namespace is not encrypted, so a
	// marker in its annotation must show up in etcd in the clear.
	marker := "visible-" + cpRandom(t)
	if _, err := c.APIServers[0].Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{
		ObjectMeta: metav1.ObjectMeta{Name: ns + "-plain", Annotations: map[string]string{"e2e.kms.example/marker": marker}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	all, err := c.StoredObjects(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	needles := map[string][]byte{"marker": []byte(marker)}
	for name, v := range map[string]string{"secret value": secretValue, "configmap value": cmValue} {
		needles[name] = []byte(v)
		needles[name+" (base64)"] = []byte(base64.StdEncoding.EncodeToString([]byte(v)))
	}
	found := map[string][]string{}
	for _, o := range all {
		for name, n := range needles {
			if bytes.Contains(o.Raw, n) {
				found[name] = append(found[name], o.Key)
			}
		}
	}
	if len(found["marker"]) == 0 {
		t.Errorf("the plaintext scan of %d etcd values did not find the unencrypted namespace marker; the scan cannot be trusted", len(all))
	}
	for name := range needles {
		if name != "marker" && len(found[name]) > 0 {
			t.Errorf("%s found in plaintext in etcd under %v", name, found[name])
		}
	}

	// And the apiserver still gives the values back.
	for i, a := range c.APIServers {
		s, err := a.Client.CoreV1().Secrets(ns).Get(ctx, "secret-0", metav1.GetOptions{})
		if err != nil {
			t.Fatalf("read secret through kube-apiserver-%d: %v", i, err)
		}
		if got := string(s.Data["password"]); got != secretValue {
			t.Errorf("kube-apiserver-%d secret password: got %q, want %q", i, got, secretValue)
		}
	}
}

// testReadyzFollowsPlugin: /readyz/kms-providers reports the plugin's
// outage while /livez does not, and the apiserver recovers by itself once
// the plugin is back.
func testReadyzFollowsPlugin(ctx context.Context, t *testing.T, c *harness.Cluster) {
	a, p := c.APIServers[0], c.Plugins[0]
	ns := cpNamespace(ctx, t, c)
	cpWriteSecret(ctx, t, a, ns, "before", "v1")

	if err := cpWaitHealth(ctx, a, "/readyz/kms-providers", http.StatusOK, 30*time.Second); err != nil {
		t.Fatalf("kube-apiserver-0 with the plugin up: %v", err)
	}
	if err := p.Stop(); err != nil {
		t.Fatalf("stop plugin: %v", err)
	}
	// Whatever happens below, leave the plugin running for later subtests.
	t.Cleanup(func() {
		if !p.Running() {
			if err := p.Start(context.Background()); err != nil {
				t.Errorf("restart plugin after the subtest: %v", err)
			}
		}
	})
	if _, err := os.Stat(p.Socket); !os.IsNotExist(err) {
		t.Errorf("socket %s after SIGTERM: got stat error %v, want it removed", p.Socket, err)
	}

	// A healthy result is cached 20 s, so the outage shows within ~20 s.
	start := time.Now()
	if err := cpWaitHealth(ctx, a, "/readyz/kms-providers", http.StatusInternalServerError, 60*time.Second); err != nil {
		t.Fatalf("kube-apiserver-0 with the plugin stopped: %v", err)
	}
	t.Logf("/readyz/kms-providers failed %s after the plugin stopped", time.Since(start).Round(time.Second))
	if code, body, err := a.Get(ctx, "/livez"); err != nil || code != http.StatusOK {
		t.Errorf("/livez with the plugin stopped: got %d %q (err %v), want 200: liveness must not depend on the plugin", code, body, err)
	}
	if code, _, err := a.Get(ctx, "/readyz"); err != nil || code == http.StatusOK {
		t.Errorf("/readyz with the plugin stopped: got %d (err %v), want a failure", code, err)
	}
	if code, body, err := c.APIServers[1].Get(ctx, "/readyz/kms-providers"); err != nil || code != http.StatusOK {
		t.Errorf("kube-apiserver-1, whose plugin still runs: /readyz/kms-providers got %d %q (err %v), want 200", code, body, err)
	}

	if err := p.Start(ctx); err != nil {
		t.Fatalf("restart plugin: %v", err)
	}
	start = time.Now()
	// An unhealthy result is cached 3 s.
	if err := cpWaitHealth(ctx, a, "/readyz/kms-providers", http.StatusOK, 30*time.Second); err != nil {
		t.Fatalf("kube-apiserver-0 after the plugin restarted: %v", err)
	}
	t.Logf("/readyz/kms-providers ok %s after the plugin restarted", time.Since(start).Round(time.Second))

	cpWriteSecret(ctx, t, a, ns, "after", "v2")
	for name, want := range map[string]string{"before": "v1", "after": "v2"} {
		if got := cpReadSecret(ctx, t, a, ns, name); got != want {
			t.Errorf("secret %s after plugin restart: got %q, want %q", name, got, want)
		}
	}
	got, err := c.StoredObject(ctx, cpObject{"secrets", ns, "after"}.etcdKey(c))
	if err != nil {
		t.Fatal(err)
	}
	if want := cpPrimary(t, c); got.Stored.KeyID != want {
		t.Errorf("secret written after plugin restart: key_id got %q, want %q", got.Stored.KeyID, want)
	}
}

// testPromote: after kmsctl keys create + promote every apiserver reports
// the new key_id, new writes carry it, and objects under the old key still
// read.
func testPromote(ctx context.Context, t *testing.T, c *harness.Cluster) {
	ns := cpNamespace(ctx, t, c)
	old := cpPrimary(t, c)
	for i, a := range c.APIServers {
		cpWriteSecret(ctx, t, a, ns, fmt.Sprintf("old-%d", i), "old")
	}

	id, err := c.CreateKey()
	if err != nil {
		t.Fatal(err)
	}
	if got := cpKeyState(t, c, id); got != "enabled" {
		t.Errorf("new key %s state: got %q, want enabled (not primary until promoted)", id, got)
	}
	if id == old {
		t.Fatalf("kmsctl keys create returned the current primary %q", id)
	}
	if err := c.Promote(id); err != nil {
		t.Fatal(err)
	}
	if got := cpPrimary(t, c); got != id {
		t.Fatalf("primary after promote: got %q, want %q", got, id)
	}
	start := time.Now()
	for i := range c.APIServers {
		if err := c.WaitForWriteKey(ctx, i, id); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("every apiserver switched %s after the promote", time.Since(start).Round(time.Second))

	for i, a := range c.APIServers {
		m, err := a.Metrics(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if !m.Has(harness.StatusKeyIDMetric, map[string]string{"key_id_hash": harness.KeyIDHash(id), "provider_name": c.ProviderName}) {
			t.Errorf("kube-apiserver-%d %s: no series for the new key_id hash; got %v", i, harness.StatusKeyIDMetric, m.LabelValues(harness.StatusKeyIDMetric, "key_id_hash"))
		}
		pm, err := c.PluginMetrics(ctx, i)
		if err != nil {
			t.Fatal(err)
		}
		if got, want := pm.LabelValues("kms_plugin_primary_key_info", "key_id_hash"), []string{harness.KeyIDHash(id)}; !cpSameSet(got, want) {
			t.Errorf("plugin %d kms_plugin_primary_key_info: got %v, want %v", i, got, want)
		}
		cpWriteSecret(ctx, t, a, ns, fmt.Sprintf("new-%d", i), "new")
	}

	for i, a := range c.APIServers {
		for j := range c.APIServers {
			for prefix, key := range map[string]string{"old": old, "new": id} {
				name := fmt.Sprintf("%s-%d", prefix, j)
				if got := cpReadSecret(ctx, t, a, ns, name); got != prefix {
					t.Errorf("kube-apiserver-%d reading %s: got %q, want %q", i, name, got, prefix)
				}
				stored, err := c.StoredObject(ctx, cpObject{"secrets", ns, name}.etcdKey(c))
				if err != nil {
					t.Fatal(err)
				}
				if stored.Stored.KeyID != key {
					t.Errorf("%s in etcd: key_id got %q, want %q", name, stored.Stored.KeyID, key)
				}
			}
		}
	}
}

// testHA: objects written through either apiserver read through the other,
// before and after a promote.
func testHA(ctx context.Context, t *testing.T, c *harness.Cluster) {
	ns := cpNamespace(ctx, t, c)
	const perServer = 5
	round := func(phase, keyID string) {
		for i, a := range c.APIServers {
			for k := range perServer {
				cpWriteSecret(ctx, t, a, ns, fmt.Sprintf("%s-via-%d-%d", phase, i, k), phase)
			}
		}
		for i, a := range c.APIServers {
			for j := range c.APIServers {
				for k := range perServer {
					name := fmt.Sprintf("%s-via-%d-%d", phase, j, k)
					if got := cpReadSecret(ctx, t, a, ns, name); got != phase {
						t.Errorf("kube-apiserver-%d reading %s (written through kube-apiserver-%d): got %q, want %q", i, name, j, got, phase)
					}
				}
			}
		}
		objs, err := c.StoredObjects(ctx, "secrets/"+ns)
		if err != nil {
			t.Fatal(err)
		}
		n := 0
		for _, o := range objs {
			if strings.HasPrefix(o.Key, c.Layout.Key("secrets", ns, phase+"-")) {
				n++
				if o.Stored.KeyID != keyID {
					t.Errorf("%s: key_id got %q, want %q", o.Key, o.Stored.KeyID, keyID)
				}
			}
		}
		if want := perServer * len(c.APIServers); n != want {
			t.Errorf("%s objects in etcd: got %d, want %d", phase, n, want)
		}
	}

	before := cpPrimary(t, c)
	round("before", before)
	after, err := c.RotateKey(ctx)
	if err != nil {
		t.Fatal(err)
	}
	round("after", after)
	// And the first round still reads everywhere.
	for i, a := range c.APIServers {
		if got := cpReadSecret(ctx, t, a, ns, fmt.Sprintf("before-via-%d-0", 1-i)); got != "before" {
			t.Errorf("kube-apiserver-%d reading a pre-promote object after the promote: got %q, want %q", i, got, "before")
		}
	}
}

// testRestartDecryptsOncePerSeed: an apiserver that restarts with hundreds
// of objects under several seeds reads them all, asking its plugin for
// about one Decrypt per distinct (key_id, seed), not one per object.
func testRestartDecryptsOncePerSeed(ctx context.Context, t *testing.T, c *harness.Cluster) {
	ns := cpNamespace(ctx, t, c)
	want := map[cpObject]string{}
	var mu sync.Mutex
	// write spreads n objects over both resources through apiserver a.
	write := func(a *harness.APIServer, phase string, n int) {
		t.Helper()
		err := cpParallel(ctx, 8, n, func(k int) error {
			name := fmt.Sprintf("%s-%d", phase, k)
			value := phase + "-" + name
			var err error
			var ref cpObject
			if k%2 == 0 {
				ref = cpObject{"secrets", ns, name}
				_, err = a.Client.CoreV1().Secrets(ns).Create(ctx, &corev1.Secret{
					ObjectMeta: metav1.ObjectMeta{Name: name}, Data: map[string][]byte{"v": []byte(value)},
				}, metav1.CreateOptions{})
			} else {
				ref = cpObject{"configmaps", ns, name}
				_, err = a.Client.CoreV1().ConfigMaps(ns).Create(ctx, &corev1.ConfigMap{
					ObjectMeta: metav1.ObjectMeta{Name: name}, Data: map[string]string{"v": value},
				}, metav1.CreateOptions{})
			}
			mu.Lock()
			want[ref] = value
			mu.Unlock()
			return err
		})
		if err != nil {
			t.Fatalf("write %s: %v", phase, err)
		}
	}
	a0, a1 := c.APIServers[0], c.APIServers[1]
	// Seeds change with the key_id and at each apiserver start.
	write(a0, "a0-key1", 100)
	write(a1, "a1-key1", 100)
	if _, err := c.RotateKey(ctx); err != nil {
		t.Fatal(err)
	}
	write(a0, "a0-key2", 100)
	write(a1, "a1-key2", 100)
	if err := a1.Restart(ctx); err != nil {
		t.Fatalf("restart kube-apiserver-1: %v", err)
	}
	write(a1, "a1-restarted", 100)

	seeds := func() (all, ours map[string]int) {
		all, ours = map[string]int{}, map[string]int{}
		for _, r := range c.Resources {
			objs, err := c.StoredObjects(ctx, r)
			if err != nil {
				t.Fatal(err)
			}
			for _, o := range objs {
				if id := o.SeedID(); id != "" {
					all[id]++
					if strings.HasPrefix(o.Key, c.Layout.ResourcePrefix(r+"/"+ns)) {
						ours[id]++
					}
				}
			}
		}
		return all, ours
	}
	allSeeds, ourSeeds := seeds()
	if len(ourSeeds) < 5 {
		t.Fatalf("distinct seeds among this test's objects: got %d, want at least 5 (two apiservers x two keys + a restart)", len(ourSeeds))
	}

	decrypts := func() float64 {
		m, err := c.PluginMetrics(ctx, 0)
		if err != nil {
			t.Fatal(err)
		}
		return m.Sum("kms_plugin_requests_total", map[string]string{"method": "Decrypt"})
	}
	// restartAndCount restarts kube-apiserver-0 (so its seed cache is
	// empty), checks every object reads through it, and returns how many
	// Decrypt calls that cost its plugin.
	restartAndCount := func(extraArgs ...string) int {
		t.Helper()
		before := decrypts()
		a0.ExtraArgs = extraArgs
		start := time.Now()
		if err := a0.Restart(ctx); err != nil {
			t.Fatalf("restart kube-apiserver-0 with %v: %v", extraArgs, err)
		}
		t.Logf("kube-apiserver-0 restarted (extra flags %q) in %s", extraArgs, time.Since(start).Round(100*time.Millisecond))
		cpCheckAllRead(ctx, t, a0, ns, want)
		return int(decrypts() - before)
	}
	// Without the seed cache a restart would cost one Decrypt per object.
	if n := len(want); n < 400 {
		t.Fatalf("objects written: got %d, want at least 400", n)
	}

	// By default (v1.37: ConcurrentWatchObjectDecode on) the watch cache
	// fills each resource with 10 objects decoded in parallel, and the
	// apiserver has no single-flight on its seed cache: a cold seed can be
	// unwrapped by every one of those workers at once. So: at least one
	// Decrypt per seed, at most 10 per seed and resource, far fewer than
	// one per object.
	got := restartAndCount()
	lo, hi := len(ourSeeds), 10*len(c.Resources)*len(allSeeds)+2
	t.Logf("default decoding: %d Decrypt calls for %d objects under %d distinct seeds (%d among this test's objects)", got, len(want), len(allSeeds), len(ourSeeds))
	if got < lo || got > hi {
		t.Errorf("Decrypt calls across a restart with default decoding: got %d, want between %d and %d", got, lo, hi)
	}

	// With serial decoding the cache makes it about one Decrypt per seed:
	// the secrets and configmaps watches still fill concurrently, so a seed
	// that protects both may be unwrapped twice.
	allSeeds, ourSeeds = seeds()
	got = restartAndCount("--feature-gates=ConcurrentWatchObjectDecode=false")
	lo, hi = len(ourSeeds), len(c.Resources)*len(allSeeds)
	t.Logf("serial decoding: %d Decrypt calls for %d objects under %d distinct seeds (%d among this test's objects)", got, len(want), len(allSeeds), len(ourSeeds))
	if got < lo || got > hi {
		t.Errorf("Decrypt calls across a restart with serial decoding: got %d, want between %d and %d (about one per distinct seed)", got, lo, hi)
	}
	a0.ExtraArgs = nil
	if err := a0.Restart(ctx); err != nil {
		t.Fatalf("restart kube-apiserver-0 with default flags: %v", err)
	}
}

// checkAllRead lists secrets and configmaps in ns through a and compares
// each object's "v" with want.
func cpCheckAllRead(ctx context.Context, t *testing.T, a *harness.APIServer, ns string, want map[cpObject]string) {
	t.Helper()
	got := map[cpObject]string{}
	secrets, err := a.Client.CoreV1().Secrets(ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatalf("list secrets through kube-apiserver-%d: %v", a.Index, err)
	}
	for _, s := range secrets.Items {
		got[cpObject{"secrets", ns, s.Name}] = string(s.Data["v"])
	}
	cms, err := a.Client.CoreV1().ConfigMaps(ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatalf("list configmaps through kube-apiserver-%d: %v", a.Index, err)
	}
	for _, cm := range cms.Items {
		if v, ok := cm.Data["v"]; ok {
			got[cpObject{"configmaps", ns, cm.Name}] = v
		}
	}
	wrong := 0
	for ref, v := range want {
		if got[ref] != v {
			wrong++
			if wrong <= 5 {
				t.Errorf("%s through kube-apiserver-%d: got %q, want %q", ref, a.Index, got[ref], v)
			}
		}
	}
	if len(got) != len(want) || wrong > 0 {
		t.Errorf("objects read through kube-apiserver-%d: got %d (%d wrong), want %d", a.Index, len(got), wrong, len(want))
	}
}

// cpObject names one namespaced object.
type cpObject struct{ resource, namespace, name string }

func (o cpObject) etcdKey(c *harness.Cluster) string {
	return c.Layout.Key(o.resource, o.namespace, o.name)
}

func (o cpObject) String() string { return o.resource + "/" + o.namespace + "/" + o.name }

// newNamespace creates a namespace named after the test.
func cpNamespace(ctx context.Context, t *testing.T, c *harness.Cluster) string {
	t.Helper()
	name := strings.ToLower(strings.NewReplacer("/", "-", "_", "-").Replace(t.Name()))
	if len(name) > 50 {
		name = name[len(name)-50:]
	}
	name = strings.Trim(name, "-")
	if err := c.CreateNamespace(ctx, name); err != nil {
		t.Fatal(err)
	}
	return name
}

func cpWriteSecret(ctx context.Context, t *testing.T, a *harness.APIServer, ns, name, value string) {
	t.Helper()
	if _, err := a.Client.CoreV1().Secrets(ns).Create(ctx, &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Data:       map[string][]byte{"v": []byte(value)},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create secret %s/%s through kube-apiserver-%d: %v", ns, name, a.Index, err)
	}
}

func cpReadSecret(ctx context.Context, t *testing.T, a *harness.APIServer, ns, name string) string {
	t.Helper()
	s, err := a.Client.CoreV1().Secrets(ns).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("read secret %s/%s through kube-apiserver-%d: %v", ns, name, a.Index, err)
	}
	return string(s.Data["v"])
}

func cpPrimary(t *testing.T, c *harness.Cluster) string {
	t.Helper()
	id, err := c.PrimaryKeyID()
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func cpKeyState(t *testing.T, c *harness.Cluster, id string) string {
	t.Helper()
	keys, err := c.Keys()
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range keys {
		if k.KeyID == id {
			return k.State
		}
	}
	return "absent"
}

// waitHealth polls an apiserver health path until it answers code.
func cpWaitHealth(ctx context.Context, a *harness.APIServer, path string, code int, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	return harness.Poll(ctx, 500*time.Millisecond, func() error {
		got, body, err := a.Get(ctx, path)
		if err != nil {
			return err
		}
		if got != code {
			return fmt.Errorf("%s: got %d %q, want %d", path, got, strings.TrimSpace(body), code)
		}
		return nil
	})
}

// parallel runs f(0..n-1) on workers goroutines and returns the first error.
func cpParallel(ctx context.Context, workers, n int, f func(int) error) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	jobs := make(chan int)
	errs := make(chan error, workers)
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for k := range jobs {
				if err := f(k); err != nil {
					errs <- err
					cancel()
					return
				}
			}
		}()
	}
	for k := 0; k < n && ctx.Err() == nil; k++ {
		select {
		case jobs <- k:
		case <-ctx.Done():
		}
	}
	close(jobs)
	wg.Wait()
	close(errs)
	return <-errs
}

func cpRandom(t *testing.T) string {
	t.Helper()
	return fmt.Sprintf("%x", time.Now().UnixNano()) + strings.ReplaceAll(t.Name(), "/", "")[:4]
}

// printable shows the first n bytes of b with non-printing bytes escaped.
func cpPrintable(b []byte, n int) string {
	if len(b) > n {
		b = b[:n]
	}
	return fmt.Sprintf("%q", b)
}

func cpSameSet(a, b []string) bool {
	a, b = append([]string(nil), a...), append([]string(nil), b...)
	sort.Strings(a)
	sort.Strings(b)
	return strings.Join(a, "\x00") == strings.Join(b, "\x00")
}
