//go:build e2e

package e2e

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kmsapi "k8s.io/kms/apis/v2"
	"sigs.k8s.io/yaml"

	"github.com/kms-v2/kms-plugin/config"
	"github.com/kms-v2/kms-plugin/e2e/harness"
	"github.com/kms-v2/kms-plugin/e2e/keyvault-emulator/emulator"
	"github.com/kms-v2/kms-plugin/rotation/etcdlayout"
)

// Bounds every fault must meet, with the shipped plugin config (see
// shippedHealthSettings) and kube-apiserver's KMS v2 health caching: the
// plugin's /readyz reflects a fault within 10 s, and the apiserver's
// /readyz/kms-providers, which caches a healthy Status for 20 s, within
// 30 s. Recovery after the fault ends has the same bounds.
const (
	pluginBound    = 10 * time.Second
	apiserverBound = 30 * time.Second
	// faultOutage is longer than the apiserver's 3-minute write grace.
	faultOutage = 4 * time.Minute
	// faultLatency is just under the apiserver's 3 s KMS timeout.
	faultLatency = 2900 * time.Millisecond
	// faultThrottleRetryAfter is longer than the plugin waits out (1 s),
	// so every call during the storm fails.
	faultThrottleRetryAfter = 2 * time.Second
	// faultConfirmTimeout bounds kmsctl rotate's wait for the apiserver to
	// switch when a fault keeps it from switching.
	// 20 s: a SIGKILLed plugin stays down until the run gives up, and
	// the apiserver's gRPC reconnect back-off (1 s x1.6, up to 120 s)
	// grows with that downtime.
	faultConfirmTimeout = "20s"
	// Objects the faults run over: small, the faults are about time.
	faultSecrets, faultConfigMaps = 100, 20
)

// TestFaults injects faults into the real control plane with the plugin on
// Azure Key Vault (the emulator, through the real SDK over TLS), one after
// the other on one cluster: a slow vault, a 429 storm, revoked access, a
// plugin SIGKILL, the socket deleted, a 4-minute vault outage, each time
// with writers running. For each it measures when the plugin's /readyz and
// the apiserver's /readyz/kms-providers turn unhealthy and when they
// recover, and reads every object back afterwards. The outage, a SIGKILL and
// a 429 storm are also injected in the middle of `kmsctl rotate`, which
// must stop with a clear report and a non-zero exit, and a rerun must
// finish with a clean census. Each subtest logs one "fault-table" line;
// docs/faults.md collects them.
func TestFaults(t *testing.T) {
	kv := startKeyVault(t, "k8s-kek")
	c := harness.Start(t, harness.Options{
		ProviderYAML:   kv.yaml,
		PluginSettings: shippedHealthSettings(t),
		Setup: func(ctx context.Context, c *harness.Cluster) error {
			_, err := c.KmsctlContext(ctx, "keys", "init")
			return err
		},
	})
	ctx := t.Context()
	f := &faultEnv{c: c, kv: kv, a: c.APIServers[0], p: c.Plugins[0], want: map[string]string{}}
	f.ns = populate(ctx, t, c, "faults", faultSecrets, faultConfigMaps)
	for i := range faultSecrets + faultConfigMaps {
		f.want[faultObjectName(i)] = fmt.Sprintf("initial-%d", i)
	}
	t.Cleanup(func() { f.logTable(t) })

	t.Run("Latency2900ms", func(t *testing.T) { f.testLatency(ctx, t) })
	t.Run("ThrottleStorm429", func(t *testing.T) {
		f.run(ctx, t, fault{
			name:   "429 storm (every vault request, Retry-After 2 s)",
			inject: func() error { kv.e.Throttle(-1, faultThrottleRetryAfter); return nil },
			heal:   func() error { kv.e.Throttle(0, 0); return nil },
		})
	})
	t.Run("AccessRevokedThenRestored", func(t *testing.T) {
		f.run(ctx, t, fault{
			name:   "vault access revoked (403), then restored",
			inject: func() error { kv.e.SetAccessRevoked(true); return nil },
			heal:   func() error { kv.e.SetAccessRevoked(false); return nil },
		})
	})
	t.Run("PluginSIGKILL", func(t *testing.T) {
		f.run(ctx, t, fault{
			name:   "plugin SIGKILL, restarted once the apiserver noticed",
			inject: f.p.Kill,
			heal:   func() error { return f.p.Start(ctx) },
		})
	})
	t.Run("SocketDeleted", func(t *testing.T) { f.testSocketDeleted(ctx, t) })
	t.Run("Outage4mDuringRotate", func(t *testing.T) {
		f.runDuringRotate(ctx, t, fault{
			name:   "vault outage 4 min (503), from mid-rotate",
			inject: func() error { kv.e.SetOutage(emulator.OutageUnavailable); return nil },
			heal:   func() error { kv.e.SetOutage(emulator.OutageNone); return nil },
			hold:   faultOutage,
		})
	})
	t.Run("PluginSIGKILLDuringRotate", func(t *testing.T) {
		f.runDuringRotate(ctx, t, fault{
			name:   "plugin SIGKILL mid-rotate, down until rotate gave up",
			inject: f.p.Kill,
			heal:   func() error { return f.p.Start(ctx) },
		})
	})
	t.Run("ThrottleStormDuringRotate", func(t *testing.T) {
		f.runDuringRotate(ctx, t, fault{
			name:   "429 storm mid-rotate",
			inject: func() error { kv.e.Throttle(-1, faultThrottleRetryAfter); return nil },
			heal:   func() error { kv.e.Throttle(0, 0); return nil },
		})
	})
}

// shippedHealthSettings are the health timings of the shipped plugin
// config (manifests/plugin-config.yaml, defaults for what it leaves out),
// in place of the harness's fast test timings.
func shippedHealthSettings(t *testing.T) map[string]any {
	t.Helper()
	root, err := harness.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(root, "manifests", "plugin-config.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	shipped := map[string]any{}
	if err := yaml.Unmarshal(b, &shipped); err != nil {
		t.Fatalf("manifests/plugin-config.yaml: %v", err)
	}
	out := map[string]any{}
	for k, def := range map[string]time.Duration{
		"checkInterval":   config.DefaultCheckInterval,
		"refreshInterval": config.DefaultRefreshInterval,
		"maxStaleness":    config.DefaultMaxStaleness,
	} {
		out[k] = def.String()
		if v, ok := shipped[k]; ok {
			out[k] = v
		}
	}
	t.Logf("shipped health settings: %v", out)
	return out
}

// faultEnv is the cluster the faults share and what it holds.
type faultEnv struct {
	c  *harness.Cluster
	kv keyVault
	a  *harness.APIServer
	p  *harness.Plugin
	ns string
	mu sync.Mutex
	// want maps each object (s-NNNNN secret, cm-NNNNN configmap) to the
	// value of its last acknowledged write; alt to a later write cut off
	// by the writers' stop, which may or may not have landed.
	want    map[string]string
	alt     map[string]string
	results []faultRow
}

// faultRow is one line of the fault table. Durations are -1 when the
// transition was not observed.
type faultRow struct {
	name                      string
	pluginDown, apiDown       time.Duration // from the injection
	faultLasted               time.Duration
	pluginUp, apiUp           time.Duration // from the end of the fault
	writes, writeErrs         int
	lost, unreadable, objects int
	// rotate is what kmsctl rotate did during the fault, if it ran.
	rotate string
}

func faultObjectName(i int) string {
	if i < faultSecrets {
		return fmt.Sprintf("s-%05d", i)
	}
	return fmt.Sprintf("cm-%05d", i)
}

// fault is one injected failure.
type fault struct {
	name   string
	inject func() error
	heal   func() error
	// hold is how long the fault lasts from its injection; 0 means until
	// both the plugin and the apiserver have reported it.
	hold time.Duration
}

func fmtDur(d time.Duration) string {
	if d < 0 {
		return "not seen"
	}
	return fmt.Sprintf("%.1f s", d.Seconds())
}

// fmtDown is a time to unhealthy; never unhealthy reads "stayed healthy".
func fmtDown(d time.Duration) string {
	if d < 0 {
		return "stayed healthy"
	}
	return fmtDur(d)
}

// fmtUp is a time to recovery, "-" when there was nothing to recover from.
func fmtUp(down, up time.Duration) string {
	switch {
	case down < 0:
		return "-"
	case up < 0:
		return "not recovered"
	}
	return fmtDur(up)
}

// line is the row as a Markdown table line.
func (r faultRow) line() string {
	rot := r.rotate
	if rot == "" {
		rot = "-"
	}
	return fmt.Sprintf("| %s | %s | %s | %s | %s / %s | %d (%d failed) | %d / %d | %d / %d | %s |",
		r.name, fmtDown(r.pluginDown), fmtDown(r.apiDown), fmtDur(r.faultLasted), fmtUp(r.pluginDown, r.pluginUp), fmtUp(r.apiDown, r.apiUp),
		r.writes, r.writeErrs, r.lost, r.objects, r.unreadable, r.objects, rot)
}

func (f *faultEnv) record(t *testing.T, r faultRow) {
	t.Logf("fault-table %s", r.line())
	f.mu.Lock()
	f.results = append(f.results, r)
	f.mu.Unlock()
}

func (f *faultEnv) logTable(t *testing.T) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var b strings.Builder
	b.WriteString("| fault | plugin /readyz unhealthy after | apiserver kms-providers unhealthy after | fault lasted | recovered after (plugin / apiserver) | writes (failed) | objects lost | objects unreadable | kmsctl rotate |\n")
	b.WriteString("|---|---|---|---|---|---|---|---|---|\n")
	for _, r := range f.results {
		b.WriteString(r.line() + "\n")
	}
	t.Logf("fault table:\n%s", b.String())
}

// pluginHealthy asks the plugin's /readyz once: healthy on 200, unhealthy
// on any other answer or none at all (a dead plugin is unhealthy).
func (f *faultEnv) pluginHealthy(ctx context.Context) (bool, string) {
	code, line, err := f.p.Readyz(ctx)
	if err != nil {
		return false, "no answer: " + firstLine(err.Error())
	}
	return code == http.StatusOK, fmt.Sprintf("%d %s", code, line)
}

// apiserverHealthy asks the apiserver's /readyz/kms-providers once. An
// apiserver that does not answer is an error, not a verdict.
func (f *faultEnv) apiserverHealthy(ctx context.Context) (bool, string, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	code, body, err := f.a.Get(ctx, "/readyz/kms-providers")
	if err != nil {
		return false, "", err
	}
	return code == http.StatusOK, fmt.Sprintf("%d %s", code, firstLine(strings.TrimSpace(body))), nil
}

func firstLine(s string) string {
	s, _, _ = strings.Cut(s, "\n")
	return s
}

// waitPlugin polls the plugin's /readyz every 100 ms until it is healthy
// (want true) or unhealthy (want false), at most timeout, and returns the
// time since from. -1 and the last answer when it did not happen.
func (f *faultEnv) waitPlugin(ctx context.Context, want bool, from time.Time, timeout time.Duration) (time.Duration, string) {
	deadline := time.Now().Add(timeout)
	var last string
	for {
		ok, why := f.pluginHealthy(ctx)
		last = why
		if ok == want {
			return time.Since(from), why
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return -1, last
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// waitAPIServer polls the apiserver's /readyz/kms-providers every 500 ms
// (each ask makes a Status call once the cached result has expired).
func (f *faultEnv) waitAPIServer(ctx context.Context, want bool, from time.Time, timeout time.Duration) (time.Duration, string) {
	deadline := time.Now().Add(timeout)
	var last string
	for {
		ok, why, err := f.apiserverHealthy(ctx)
		if err != nil {
			last = "no answer: " + firstLine(err.Error())
		} else {
			last = why
			if ok == want {
				return time.Since(from), why
			}
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return -1, last
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// requireHealthy waits until the plugin and the apiserver are both healthy
// before a fault, so each measurement starts from a healthy cluster.
func (f *faultEnv) requireHealthy(ctx context.Context, t *testing.T) {
	t.Helper()
	now := time.Now()
	if d, why := f.waitPlugin(ctx, true, now, time.Minute); d < 0 {
		t.Fatalf("plugin not healthy before the fault: %s\n%s", why, f.p.LogTail(30))
	}
	if d, why := f.waitAPIServer(ctx, true, now, time.Minute); d < 0 {
		t.Fatalf("apiserver kms-providers not healthy before the fault: %s", why)
	}
}

// startWriters runs two writers over the fault secrets.
func (f *faultEnv) startWriters(ctx context.Context) *writers {
	return startWriters(ctx, f.c, f.ns, 2, faultSecrets)
}

// stopWriters stops w, folds its acknowledged writes into what every
// object must read back as, and returns its counts.
func (f *faultEnv) stopWriters(t *testing.T, w *writers) (writes, failed int) {
	t.Helper()
	w.stop()
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.alt == nil {
		f.alt = map[string]string{}
	}
	for name, v := range w.acked {
		f.want[name] = v
		delete(f.alt, name)
	}
	for name, v := range w.inFlight {
		f.alt[name] = v
	}
	for i, err := range w.errs {
		if i < 3 {
			t.Errorf("writer error during the fault: %v", err)
		}
	}
	return w.writes, len(w.errs)
}

// checkObjects reads every fault object back, one GET each through the
// apiserver, and from etcd: lost is an object missing or not holding its
// last acknowledged value, unreadable one the apiserver cannot serve or
// etcd holds in a form that is not a decodable KMS v2 value of this
// cluster.
func (f *faultEnv) checkObjects(ctx context.Context, t *testing.T) (lost, unreadable, total int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	f.mu.Lock()
	want := make(map[string][2]string, len(f.want))
	for name, v := range f.want {
		want[name] = [2]string{v, f.alt[name]}
	}
	f.mu.Unlock()
	var mu sync.Mutex
	var problems []string
	names := make([]string, 0, len(want))
	for name := range want {
		names = append(names, name)
	}
	err := cpParallel(ctx, 8, len(names), func(k int) error {
		name := names[k]
		var got string
		var err error
		if strings.HasPrefix(name, "s-") {
			var s *corev1.Secret
			s, err = f.a.Client.CoreV1().Secrets(f.ns).Get(ctx, name, metav1.GetOptions{})
			if err == nil {
				got = string(s.Data["v"])
			}
		} else {
			var cm *corev1.ConfigMap
			cm, err = f.a.Client.CoreV1().ConfigMaps(f.ns).Get(ctx, name, metav1.GetOptions{})
			if err == nil {
				got = cm.Data["v"]
			}
		}
		mu.Lock()
		defer mu.Unlock()
		w := want[name]
		switch {
		case apierrors.IsNotFound(err):
			lost++
			problems = append(problems, name+": not found")
		case err != nil:
			unreadable++
			problems = append(problems, name+": "+firstLine(err.Error()))
		case got != w[0] && (w[1] == "" || got != w[1]):
			lost++
			problems = append(problems, fmt.Sprintf("%s: reads %q, want %q", name, got, w[0]))
		}
		return nil
	})
	if err != nil {
		t.Fatalf("read-back: %v", err)
	}
	// etcd: every object present, a KMS v2 value of this provider name
	// with a key_id, and decodable.
	inEtcd := map[string]bool{}
	for _, r := range []string{"secrets", "configmaps"} {
		objs, err := f.c.StoredObjects(ctx, r+"/"+f.ns)
		if err != nil {
			t.Fatal(err)
		}
		for _, o := range objs {
			name := o.Key[strings.LastIndexByte(o.Key, '/')+1:]
			if _, ok := want[name]; !ok {
				continue // kube-root-ca.crt and the like
			}
			inEtcd[name] = true
			if o.Stored.Encoding != etcdlayout.EncodingKMSv2 || o.Stored.Provider != f.c.ProviderName || o.Stored.KeyID == "" || o.Stored.Err != nil {
				unreadable++
				problems = append(problems, fmt.Sprintf("%s in etcd: %s provider %q key_id %q err %v", o.Key, o.Stored.Encoding, o.Stored.Provider, o.Stored.KeyID, o.Stored.Err))
			}
		}
	}
	for name := range want {
		if !inEtcd[name] {
			lost++
			problems = append(problems, name+": not in etcd")
		}
	}
	for i, p := range problems {
		if i == 10 {
			t.Errorf("... and %d more", len(problems)-10)
			break
		}
		t.Errorf("object %s", p)
	}
	return lost, unreadable, len(want)
}

// run injects one fault with writers running, measures both health views
// going down and coming back, and reads everything back.
func (f *faultEnv) run(ctx context.Context, t *testing.T, ft fault) faultRow {
	t.Helper()
	f.requireHealthy(ctx, t)
	w := f.startWriters(ctx)
	time.Sleep(time.Second) // writers at steady state
	row := f.measure(ctx, t, ft, nil)
	time.Sleep(time.Second) // and writing after the recovery
	row.writes, row.writeErrs = f.stopWriters(t, w)
	row.lost, row.unreadable, row.objects = f.checkObjects(ctx, t)
	f.record(t, row)
	return row
}

// measure injects ft, waits for the plugin and then the apiserver to
// report it, keeps it until ft.hold (and until during, if set, returns),
// ends it and waits for both to recover. Bounds are asserted here.
func (f *faultEnv) measure(ctx context.Context, t *testing.T, ft fault, during func()) faultRow {
	t.Helper()
	row := faultRow{name: ft.name, pluginDown: -1, apiDown: -1, pluginUp: -1, apiUp: -1}
	t0 := time.Now()
	if err := ft.inject(); err != nil {
		t.Fatalf("inject %s: %v", ft.name, err)
	}
	healed := false
	heal := func() {
		if healed {
			return
		}
		healed = true
		if err := ft.heal(); err != nil {
			t.Fatalf("end %s: %v", ft.name, err)
		}
	}
	// Whatever fails below, leave the cluster healthy for the next fault.
	t.Cleanup(func() {
		if !healed {
			heal()
		}
	})
	var why string
	row.pluginDown, why = f.waitPlugin(ctx, false, t0, 3*pluginBound)
	t.Logf("%s: plugin /readyz unhealthy after %s: %s", ft.name, fmtDur(row.pluginDown), why)
	if row.pluginDown < 0 || row.pluginDown > pluginBound {
		t.Errorf("plugin /readyz turned unhealthy after %s, want within %s (last answer %s)", fmtDur(row.pluginDown), pluginBound, why)
	}
	row.apiDown, why = f.waitAPIServer(ctx, false, t0, 2*apiserverBound)
	t.Logf("%s: apiserver /readyz/kms-providers unhealthy after %s: %s", ft.name, fmtDur(row.apiDown), why)
	if row.apiDown < 0 || row.apiDown > apiserverBound {
		t.Errorf("apiserver /readyz/kms-providers turned unhealthy after %s, want within %s (last answer %s)", fmtDur(row.apiDown), apiserverBound, why)
	}
	if during != nil {
		during()
	}
	if rest := ft.hold - time.Since(t0); rest > 0 {
		t.Logf("%s: holding the fault %s more", ft.name, rest.Round(time.Second))
		// Both must stay unhealthy for as long as the fault lasts.
		deadline := time.Now().Add(rest)
		for time.Now().Before(deadline) && ctx.Err() == nil {
			if ok, why := f.pluginHealthy(ctx); ok {
				t.Errorf("plugin healthy %s into the fault: %s", time.Since(t0).Round(time.Second), why)
				break
			}
			time.Sleep(min(5*time.Second, time.Until(deadline)))
		}
	}
	row.faultLasted = time.Since(t0)
	t1 := time.Now()
	heal()
	row.pluginUp, why = f.waitPlugin(ctx, true, t1, 3*pluginBound)
	t.Logf("%s: plugin /readyz healthy again after %s: %s", ft.name, fmtDur(row.pluginUp), why)
	if row.pluginUp < 0 || row.pluginUp > pluginBound {
		t.Errorf("plugin /readyz healthy again after %s, want within %s (last answer %s)\n%s", fmtDur(row.pluginUp), pluginBound, why, f.p.LogTail(20))
	}
	row.apiUp, why = f.waitAPIServer(ctx, true, t1, 2*apiserverBound)
	t.Logf("%s: apiserver /readyz/kms-providers healthy again after %s: %s", ft.name, fmtDur(row.apiUp), why)
	if row.apiUp < 0 || row.apiUp > apiserverBound {
		t.Errorf("apiserver /readyz/kms-providers healthy again after %s, want within %s (last answer %s)", fmtDur(row.apiUp), apiserverBound, why)
	}
	return row
}

// testLatency: a vault answering every request in 2.9 s, just under the
// apiserver's 3 s timeout, keeps the plugin and the apiserver healthy and
// the writers error-free. It watches for 45 s: several plugin checks, and
// two expiries of the apiserver's 20 s health cache.
func (f *faultEnv) testLatency(ctx context.Context, t *testing.T) {
	const watch = 45 * time.Second
	f.requireHealthy(ctx, t)
	w := f.startWriters(ctx)
	f.kv.e.SetLatency(faultLatency)
	defer f.kv.e.SetLatency(0)
	t0 := time.Now()
	checks0, errs0 := f.pluginChecks(ctx, t), f.pluginCheckErrors(ctx, t)
	row := faultRow{name: "vault latency 2.9 s per request", pluginDown: -1, apiDown: -1, pluginUp: 0, apiUp: 0}
	var pluginBad, apiBad []string
	nextAPI := time.Now()
	for time.Since(t0) < watch && ctx.Err() == nil {
		if ok, why := f.pluginHealthy(ctx); !ok {
			if row.pluginDown < 0 {
				row.pluginDown = time.Since(t0)
			}
			pluginBad = append(pluginBad, fmt.Sprintf("%s: %s", time.Since(t0).Round(100*time.Millisecond), why))
		}
		if time.Now().After(nextAPI) {
			ok, why, err := f.apiserverHealthy(ctx)
			if err != nil || !ok {
				if row.apiDown < 0 {
					row.apiDown = time.Since(t0)
				}
				apiBad = append(apiBad, fmt.Sprintf("%s: %s %v", time.Since(t0).Round(100*time.Millisecond), why, err))
			}
			nextAPI = time.Now().Add(time.Second)
		}
		time.Sleep(250 * time.Millisecond)
	}
	row.faultLasted = time.Since(t0)
	checks, checkErrs := f.pluginChecks(ctx, t)-checks0, f.pluginCheckErrors(ctx, t)-errs0
	f.kv.e.SetLatency(0)
	row.writes, row.writeErrs = f.stopWriters(t, w)
	t.Logf("%s: %v plugin checks ran during the %s, %v failed", row.name, checks, watch, checkErrs)
	if checkErrs > 0 {
		t.Errorf("%v of %v plugin checks failed against the slow vault, want 0", checkErrs, checks)
	}
	if checks < 3 {
		t.Errorf("only %v plugin checks ran against the slow vault in %s, want at least 3: the test proved nothing", checks, watch)
	}
	if len(pluginBad) > 0 {
		t.Errorf("plugin /readyz unhealthy %d times under 2.9 s latency, first: %s", len(pluginBad), pluginBad[0])
	}
	if len(apiBad) > 0 {
		t.Errorf("apiserver /readyz/kms-providers unhealthy %d times under 2.9 s latency, first: %s", len(apiBad), apiBad[0])
	}
	if row.writeErrs > 0 || row.writes == 0 {
		t.Errorf("writers under 2.9 s latency: %d writes, %d failed; want some and 0 failed", row.writes, row.writeErrs)
	}
	row.lost, row.unreadable, row.objects = f.checkObjects(ctx, t)
	f.record(t, row)
}

// pluginChecks is how many background checks the plugin has run.
func (f *faultEnv) pluginChecks(ctx context.Context, t *testing.T) float64 {
	t.Helper()
	m, err := f.p.Metrics(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return m.Sum("kms_plugin_provider_operation_duration_seconds", map[string]string{"operation": "check"})
}

// pluginCheckErrors is how many background checks have failed.
func (f *faultEnv) pluginCheckErrors(ctx context.Context, t *testing.T) float64 {
	t.Helper()
	m, err := f.p.Metrics(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return m.Sum("kms_plugin_provider_errors_total", map[string]string{"operation": "check"})
}

// testSocketDeleted: the socket file is removed while the plugin serves.
// Expected of the plugin: its /readyz turns unhealthy within 10 s (or it
// has already bound the path again by then), it binds the socket again,
// and a fresh connection to the path gets a Status answer. The apiserver's
// established connection may not notice at all; its view is recorded.
func (f *faultEnv) testSocketDeleted(ctx context.Context, t *testing.T) {
	f.requireHealthy(ctx, t)
	w := f.startWriters(ctx)
	time.Sleep(time.Second)
	row := faultRow{name: "socket file deleted while serving", pluginDown: -1, apiDown: -1, pluginUp: -1, apiUp: -1}
	before, err := os.Stat(f.p.Socket)
	if err != nil {
		t.Fatal(err)
	}
	// Whatever happens, leave a served socket for the next fault.
	t.Cleanup(func() {
		if _, err := statusOverSocket(ctx, f.p.Socket); err != nil {
			t.Logf("socket not served after the subtest (%v); restarting the plugin", err)
			if err := f.p.Restart(ctx); err != nil {
				t.Errorf("restart plugin: %v", err)
			}
		}
	})
	t0 := time.Now()
	if err := os.Remove(f.p.Socket); err != nil {
		t.Fatal(err)
	}
	// The socket is lost for at most pluginBound: within it the plugin
	// either serves the path again (a fresh connection gets Status, and
	// /readyz is ok) or reports the loss on /readyz; it must serve again
	// within apiserverBound in any case. A plugin that re-binds at once
	// need never look unhealthy.
	rebound := func() bool {
		st, err := os.Stat(f.p.Socket)
		return err == nil && st.Mode()&os.ModeSocket != 0 && !os.SameFile(st, before)
	}
	var why, keyID string
	deadline := t0.Add(apiserverBound)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		ok, ans := f.pluginHealthy(ctx)
		why = ans
		if !ok && row.pluginDown < 0 {
			row.pluginDown = time.Since(t0)
			t.Logf("%s: plugin /readyz unhealthy %s after the deletion: %s", row.name, fmtDur(row.pluginDown), why)
		}
		if ok && rebound() {
			if id, err := statusOverSocket(ctx, f.p.Socket); err == nil {
				row.pluginUp, keyID = time.Since(t0), id
				break
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("%s: socket bound again, Status over a fresh connection (key_id %s) and /readyz ok %s after the deletion; /readyz unhealthy seen: %s",
		row.name, keyID, fmtDur(row.pluginUp), fmtDown(row.pluginDown))
	switch {
	case row.pluginUp < 0:
		t.Errorf("plugin did not serve the socket path again within %s of its deletion (last /readyz %s); needs the plugin's socket watch", apiserverBound, why)
	case row.pluginUp > pluginBound && (row.pluginDown < 0 || row.pluginDown > pluginBound):
		t.Errorf("socket deleted: served again after %s and /readyz unhealthy after %s; want one of them within %s", fmtDur(row.pluginUp), fmtDown(row.pluginDown), pluginBound)
	}
	// Recovery is counted from the deletion here: the fault ends when the
	// plugin has bound the path again.
	row.faultLasted = row.pluginUp
	// The apiserver's view, recorded: its connection predates the
	// deletion. Asked until its 20 s health cache has certainly expired
	// once since the deletion, so the last answer is a fresh Status.
	row.apiDown, why = f.waitAPIServer(ctx, false, t0, time.Until(t0.Add(25*time.Second)))
	if row.apiDown >= 0 {
		row.apiUp, why = f.waitAPIServer(ctx, true, time.Now(), apiserverBound)
		if row.apiUp < 0 {
			t.Errorf("apiserver /readyz/kms-providers not healthy again within %s: %s", apiserverBound, why)
		}
	} else {
		row.apiUp = 0
		t.Logf("%s: apiserver /readyz/kms-providers stayed healthy: %s", row.name, why)
	}
	time.Sleep(time.Second)
	row.writes, row.writeErrs = f.stopWriters(t, w)
	if row.writeErrs > 0 {
		t.Errorf("writers with the socket deleted: %d of %d failed, want 0", row.writeErrs, row.writes)
	}
	row.lost, row.unreadable, row.objects = f.checkObjects(ctx, t)
	f.record(t, row)
}

// statusOverSocket dials socket afresh, as a restarted apiserver would,
// and returns the key_id its Status reports.
func statusOverSocket(ctx context.Context, socket string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return "", err
	}
	defer conn.Close()
	resp, err := kmsapi.NewKeyManagementServiceClient(conn).Status(ctx, &kmsapi.StatusRequest{})
	if err != nil {
		return "", err
	}
	return resp.KeyId, nil
}

// runDuringRotate starts `kmsctl rotate --force --retire` with writers
// running and injects ft as soon as the vault sees the promote's first
// write (the new version tagged primary, the apiserver not yet switched):
// the run must stop with a report that names the problem and a non-zero
// exit. After the fault a rerun must finish the rotation, every object
// under the new primary, and everything reads back.
func (f *faultEnv) runDuringRotate(ctx context.Context, t *testing.T, ft fault) {
	f.requireHealthy(ctx, t)
	old := mustPrimary(t, f.c)
	w := f.startWriters(ctx)
	time.Sleep(time.Second)
	before := f.kv.e.Counts()
	done := make(chan kmsctlRun, 1)
	rctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	go func() {
		done <- runKmsctl(rctx, t, f.c, perNodeRotateArgs(f.c, "--force", "--retire", "--resources", "secrets,configmaps",
			"--confirm-timeout", faultConfirmTimeout)...)
	}()
	// The promote is the first vault write after the new version's
	// create (the create itself may tag the old primary first).
	pollCtx, pcancel := context.WithTimeout(ctx, 2*time.Minute)
	defer pcancel()
	updatesAtCreate := int64(-1)
	err := harness.Poll(pollCtx, 5*time.Millisecond, func() error {
		select {
		case r := <-done:
			return harness.StopPolling(fmt.Errorf("kmsctl rotate ended (exit %d) before the promote\n%s", r.code, r.stderr))
		default:
		}
		now := f.kv.e.Counts()
		switch {
		case now.Create == before.Create:
			return errors.New("no new version yet")
		case updatesAtCreate < 0:
			updatesAtCreate = now.Update
			return errors.New("no promote yet")
		case now.Update == updatesAtCreate:
			return errors.New("no promote yet")
		}
		return nil
	})
	if err != nil {
		t.Fatalf("rotate never reached the promote: %v", err)
	}
	var run kmsctlRun
	gotRun := false
	waitRotate := func() {
		select {
		case run = <-done:
			gotRun = true
		case <-time.After(3 * time.Minute):
			t.Errorf("kmsctl rotate still running 3 minutes into the fault")
		}
	}
	row := f.measure(ctx, t, ft, waitRotate)
	if !gotRun {
		cancel()
		run = <-done
	}
	row.name += " (kmsctl rotate)"
	rep := decodeReport(t, run.stdout)
	lastErr := strings.TrimSpace(run.stderr)
	if i := strings.LastIndexByte(lastErr, '\n'); i >= 0 {
		lastErr = lastErr[i+1:]
	}
	t.Logf("rotate during the fault: exit %d, action %q, error %q; stderr's last line %q", run.code, rep.Action, rep.Error, lastErr)
	if run.code == 0 || run.killed || rep.Error == "" || rep.ExitCode != run.code {
		t.Errorf("kmsctl rotate during %s: exit %d (killed %v), report error %q exit %d; want a non-zero exit with the error in the report", ft.name, run.code, run.killed, rep.Error, rep.ExitCode)
	}
	if !strings.HasPrefix(lastErr, "kmsctl: ") {
		t.Errorf("kmsctl rotate's last stderr line %q, want the one-line \"kmsctl: <error>\"", lastErr)
	}
	// The rerun, the fault over: it finishes what the first run started.
	rerun := resumeAfterLease(ctx, t, f.c, "--retire", "--resources", "secrets,configmaps")
	primary := mustPrimary(t, f.c)
	t.Logf("rerun: action %q, %s -> %s in %s, retired %v", rerun.Action, rerun.OldKeyID, rerun.NewKeyID, rerun.Duration, rerun.Retired)
	if primary == old || rerun.NewKeyID != primary {
		t.Errorf("after the rerun: primary %s (was %s), rerun's new key %s; want one new primary", primary, old, rerun.NewKeyID)
	}
	requireAllUnder(ctx, t, f.c, primary, "secrets", "configmaps")
	if got := keyState(t, f.c, old); got != "disabled" {
		t.Errorf("old key %s after the rerun: %s, want disabled", old, got)
	}
	row.rotate = fmt.Sprintf("exit %d, rerun %s", run.code, rerun.Action)
	time.Sleep(time.Second)
	row.writes, row.writeErrs = f.stopWriters(t, w)
	if row.writeErrs > 0 {
		t.Errorf("writers: %d of %d failed, want 0", row.writeErrs, row.writes)
	}
	row.lost, row.unreadable, row.objects = f.checkObjects(ctx, t)
	f.record(t, row)
}

// TestFaultsDiskFull: the file keyset on a filesystem with no space left.
// `kmsctl keys create` must fail with one clean line and a non-zero exit,
// leave the keyset byte for byte as it was and no temporary file behind,
// while the plugin keeps serving the old keyset; once space is freed the
// same command succeeds. No control plane is needed: the apiserver only
// ever sees the plugin, which this fault does not touch.
func TestFaultsDiskFull(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mounting a small tmpfs needs root")
	}
	ctx := t.Context()
	pluginDir, err := harness.PluginBinDir()
	if err != nil {
		t.Fatal(err)
	}
	// os.MkdirTemp: a short path, the socket lives here.
	dir, err := os.MkdirTemp("", "kdf")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	mnt := filepath.Join(dir, "keys")
	if err := os.Mkdir(mnt, 0o700); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.CommandContext(ctx, "mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", mnt).CombinedOutput(); err != nil {
		t.Fatalf("mount a 64 KiB tmpfs: %v: %s", err, out)
	}
	// Registered before the plugin starts, so it runs after the plugin
	// has stopped.
	t.Cleanup(func() {
		if out, err := exec.Command("umount", mnt).CombinedOutput(); err != nil {
			t.Errorf("umount: %v: %s", err, out)
		}
	})
	keyset := filepath.Join(mnt, "keyset.json")
	socket := filepath.Join(dir, "kms.sock")
	health := freeAddr(t)
	cfg := map[string]any{
		"socket":   socket,
		"health":   health,
		"provider": map[string]any{"file": map[string]any{"path": keyset}},
	}
	for k, v := range shippedHealthSettings(t) {
		cfg[k] = v
	}
	cfgBytes, err := yaml.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	cfgPath := filepath.Join(dir, "kms-plugin.yaml")
	if err := os.WriteFile(cfgPath, cfgBytes, 0o600); err != nil {
		t.Fatal(err)
	}
	kmsctl := func(args ...string) kmsctlRun {
		t.Helper()
		cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		cmd := exec.CommandContext(cctx, filepath.Join(pluginDir, "kmsctl"), append(args, "--config", cfgPath)...)
		var stdout, stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		err := cmd.Run()
		r := kmsctlRun{stdout: stdout.String(), stderr: stderr.String()}
		var ee *exec.ExitError
		switch {
		case err == nil:
		case errors.As(err, &ee):
			r.code = ee.ExitCode()
		default:
			t.Fatalf("kmsctl %v: %v", args, err)
		}
		return r
	}
	if r := kmsctl("keys", "init"); r.code != 0 {
		t.Fatalf("kmsctl keys init: exit %d: %s", r.code, r.stderr)
	}

	logf, err := os.Create(filepath.Join(dir, "kms-plugin.log"))
	if err != nil {
		t.Fatal(err)
	}
	plugin := exec.Command(filepath.Join(pluginDir, "kms-plugin"), "serve", "--config", cfgPath)
	plugin.Stdout, plugin.Stderr = logf, logf
	if err := plugin.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- plugin.Wait(); logf.Close() }()
	t.Cleanup(func() {
		_ = plugin.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(15 * time.Second):
			_ = plugin.Process.Kill()
			<-exited
			t.Errorf("kms-plugin did not stop within 15 s of SIGTERM")
		}
		if t.Failed() {
			b, _ := os.ReadFile(filepath.Join(dir, "kms-plugin.log"))
			t.Logf("kms-plugin log:\n%s", b)
		}
	})
	readyz := func() (int, error) {
		rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		req, _ := http.NewRequestWithContext(rctx, http.MethodGet, "http://"+health+"/readyz", nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return 0, err
		}
		resp.Body.Close()
		return resp.StatusCode, nil
	}
	// served checks the plugin the way the apiserver uses it: /readyz, the
	// Status key_id, and an Encrypt and Decrypt round trip over a fresh
	// connection.
	served := func() (string, error) {
		if code, err := readyz(); err != nil || code != http.StatusOK {
			return "", fmt.Errorf("/readyz: %d %v", code, err)
		}
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			return "", err
		}
		defer conn.Close()
		kc := kmsapi.NewKeyManagementServiceClient(conn)
		st, err := kc.Status(cctx, &kmsapi.StatusRequest{})
		if err != nil {
			return "", err
		}
		seed := make([]byte, 32)
		_, _ = rand.Read(seed)
		enc, err := kc.Encrypt(cctx, &kmsapi.EncryptRequest{Plaintext: seed, Uid: "disk-full"})
		if err != nil {
			return "", err
		}
		dec, err := kc.Decrypt(cctx, &kmsapi.DecryptRequest{Ciphertext: enc.Ciphertext, KeyId: enc.KeyId, Annotations: enc.Annotations, Uid: "disk-full"})
		if err != nil {
			return "", err
		}
		if !bytes.Equal(dec.Plaintext, seed) || enc.KeyId != st.KeyId {
			return "", fmt.Errorf("round trip: key_id %q vs Status %q, seed equal %v", enc.KeyId, st.KeyId, bytes.Equal(dec.Plaintext, seed))
		}
		return st.KeyId, nil
	}
	var old string
	pctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := harness.Poll(pctx, 100*time.Millisecond, func() error {
		select {
		case err := <-exited:
			return harness.StopPolling(fmt.Errorf("kms-plugin exited: %v", err))
		default:
		}
		id, err := served()
		old = id
		return err
	}); err != nil {
		t.Fatalf("kms-plugin not serving: %v", err)
	}
	before, err := os.ReadFile(keyset)
	if err != nil {
		t.Fatal(err)
	}

	// Fill the filesystem.
	fill, err := os.Create(filepath.Join(mnt, "fill"))
	if err != nil {
		t.Fatal(err)
	}
	chunk := make([]byte, 4096)
	for i := 0; ; i++ {
		if _, err := fill.Write(chunk); err != nil {
			if !errors.Is(err, syscall.ENOSPC) {
				t.Fatalf("filling the tmpfs: %v", err)
			}
			break
		}
		if i > 1024 {
			t.Fatal("a 64 KiB tmpfs took 4 MiB without filling up")
		}
	}
	fill.Close()

	start := time.Now()
	r := kmsctl("keys", "create")
	fullExit := r.code
	stderr := strings.TrimSpace(r.stderr)
	t.Logf("kmsctl keys create on a full disk: exit %d in %s, stderr %q", r.code, time.Since(start).Round(time.Millisecond), stderr)
	if r.code == 0 || strings.TrimSpace(r.stdout) != "" {
		t.Errorf("kmsctl keys create on a full disk: exit %d, stdout %q; want a non-zero exit and no key_id", r.code, r.stdout)
	}
	if strings.Contains(stderr, "\n") || !strings.HasPrefix(stderr, "kmsctl: ") || !strings.Contains(stderr, "no space left on device") {
		t.Errorf("kmsctl keys create on a full disk: stderr %q, want one line \"kmsctl: ...: no space left on device\"", stderr)
	}
	after, err := os.ReadFile(keyset)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(before, after) {
		t.Errorf("the keyset changed on a failed create (%d bytes before, %d after)", len(before), len(after))
	}
	checkOnly := func(want ...string) {
		t.Helper()
		entries, err := os.ReadDir(mnt)
		if err != nil {
			t.Fatal(err)
		}
		// The keyset's lock file (empty, 0600) stays by design: it is the
		// lock every key change takes (docs/secret-files.md).
		var got []string
		for _, e := range entries {
			if e.Name() != ".keyset.json.lock" {
				got = append(got, e.Name())
			}
		}
		if strings.Join(got, ",") != strings.Join(want, ",") {
			t.Errorf("files next to the keyset: %v, want %v besides the lock file (no temporary file left)", got, want)
		}
	}
	checkOnly("fill", "keyset.json")
	// Still served, also after the plugin's next key state refresh.
	refresh, _ := time.ParseDuration(fmt.Sprint(cfg["refreshInterval"]))
	time.Sleep(refresh + time.Second)
	if id, err := served(); err != nil || id != old {
		t.Errorf("plugin after the failed create: key_id %q (err %v), want the old primary %q still served", id, err, old)
	}

	// Space again: the same command works.
	if err := os.Remove(filepath.Join(mnt, "fill")); err != nil {
		t.Fatal(err)
	}
	r = kmsctl("keys", "create")
	id := strings.TrimSpace(r.stdout)
	if r.code != 0 || id == "" || id == old {
		t.Fatalf("kmsctl keys create with space again: exit %d, key_id %q: %s", r.code, id, r.stderr)
	}
	checkOnly("keyset.json")
	list := kmsctl("keys", "list", "-o", "json")
	if list.code != 0 || !strings.Contains(list.stdout, id) || !strings.Contains(list.stdout, old) {
		t.Errorf("kmsctl keys list after the create: exit %d, want both %s and %s in %s", list.code, old, id, list.stdout)
	}
	if got, err := served(); err != nil || got != old {
		t.Errorf("plugin after the create: key_id %q (err %v), want %q (a created key is not primary)", got, err, old)
	}
	t.Logf("fault-table | disk full writing the keyset (file provider, kmsctl keys create) | stayed healthy | n/a (no apiserver; the plugin is untouched) | until space freed | - / - | - | 0 / 1 keyset | 0 / 1 keyset | create: exit %d, one line; after freeing: exit 0 |", fullExit)
}
