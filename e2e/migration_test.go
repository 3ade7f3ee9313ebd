//go:build e2e

package e2e

import (
	"bytes"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kms-v2/kms-plugin/e2e/harness"
	"github.com/kms-v2/kms-plugin/providers/pkcs11/pkcs11test"
	"github.com/kms-v2/kms-plugin/rotation"
)

// TestProviderMigration moves one control plane of two apiservers from
// the file provider to a PKCS#11 token (SoftHSM2) and then to Azure Key
// Vault (the emulator), each inside one plugin per apiserver, with
// writers running throughout; then promotes a new Key Vault version with
// no propagation wait. The steps build on each other and share the
// cluster, so the first failure stops the rest.
func TestProviderMigration(t *testing.T) {
	label := "mig-" + provRandomHex(t, 4)
	tk := pkcs11test.NewDetachedToken(t, label)
	c := harness.Start(t, harness.Options{APIServers: 2, Env: []string{tk.Env()}})
	m := &migration{c: c, ns: populate(t.Context(), t, c, "migrate", 60, 20), secrets: 60, configmaps: 20}
	kv := startKeyVault(t, "k8s-kek")
	steps := []struct {
		name string
		run  func(t *testing.T)
	}{
		{"PerNodeKeysetsRefuseRotation", m.perNodeKeysetsRefuseRotation},
		{"FileToPKCS11", func(t *testing.T) {
			m.migrate(t, m.fileEntries(), tk.ProviderYAML("k8s-kek"), "pkcs11", "pkcs11:"+label+"/")
		}},
		{"PKCS11ToKeyVault", func(t *testing.T) {
			m.migrate(t, []string{tk.ProviderYAML("k8s-kek"), tk.ProviderYAML("k8s-kek")}, kv.yaml, "azureKeyVault", kv.keyIDPrefix)
		}},
		{"SharedPromoteWithoutWait", m.sharedPromoteWithoutWait},
	}
	for _, s := range steps {
		if !t.Run(s.name, s.run) {
			return
		}
	}
}

// migration is the cluster and the objects the steps move.
type migration struct {
	c                   *harness.Cluster
	ns                  string
	secrets, configmaps int
	// keysets are each plugin's own keyset file, once the first step made
	// the file provider per node.
	keysets []string
}

// fileEntries are each plugin's file provider entry.
func (m *migration) fileEntries() []string {
	var out []string
	for _, k := range m.keysets {
		out = append(out, fmt.Sprintf("file: {path: %q}\n", k))
	}
	return out
}

// perNodeKeysetsRefuseRotation gives each plugin its own copy of the
// keyset, as two nodes would have, and shows that a forced rotation is
// refused before it creates or promotes anything.
func (m *migration) perNodeKeysetsRefuseRotation(t *testing.T) {
	ctx, c := t.Context(), m.c
	shared, err := os.ReadFile(c.KeysetPath())
	if err != nil {
		t.Fatal(err)
	}
	for i, p := range c.Plugins {
		path := filepath.Join(filepath.Dir(p.ConfigPath), "keyset.json")
		if err := os.WriteFile(path, shared, 0o600); err != nil {
			t.Fatal(err)
		}
		m.keysets = append(m.keysets, path)
		if err := p.SetProviders(m.fileEntries()[i]); err != nil {
			t.Fatal(err)
		}
		if err := p.Restart(ctx); err != nil {
			t.Fatal(err)
		}
	}
	before, _ := c.Keys()
	primary := mustPrimary(t, c)
	r := runKmsctl(ctx, t, c, perNodeRotateArgs(c, "--force")...)
	if r.code != 6 || !strings.Contains(r.stderr, "--keyset-distributed") || !strings.Contains(r.stderr, "2 apiservers") {
		t.Fatalf("rotate --force on per-node keysets: exit %d, want 6 with the fix named\n%s", r.code, r.stderr)
	}
	if after, _ := c.Keys(); !slices.Equal(after, before) {
		t.Errorf("key versions changed by a refused rotation: %+v -> %+v", before, after)
	}
	for _, k := range m.keysets {
		if b, err := os.ReadFile(k); err != nil || !bytes.Equal(b, shared) {
			t.Errorf("keyset %s changed by a refused rotation (err %v)", k, err)
		}
	}
	requireAllUnder(ctx, t, c, primary, "secrets", "configmaps")
}

// migrate moves every plugin from the entries in from (one per plugin) to
// the entry to, in two rolling phases so every plugin can decrypt with the
// new provider before any encrypts with it; then rotate --retire rewrites
// every object, finds none left under the old provider and says it can
// go; then the old provider leaves every config. Writers run until the
// apiservers restart with empty caches to read everything once more.
func (m *migration) migrate(t *testing.T, from []string, to, kind, keyIDPrefix string) {
	ctx, c := t.Context(), m.c
	w := startWriters(ctx, c, m.ns, 4, m.secrets)
	defer w.stop()
	// kmsctl reads plugin 0's config: list the new provider there to
	// create its first key before any plugin starts with it.
	if err := c.Plugins[0].SetProviders(from[0], to); err != nil {
		t.Fatal(err)
	}
	if _, err := c.KmsctlContext(ctx, "keys", "init", "--provider", kind); err != nil {
		t.Fatal(err)
	}
	m.roll(t, func(i int) []string { return []string{from[i], to} }, nil)
	newKey := mustPrimaryOf(t, c, kind)
	if !strings.HasPrefix(newKey, keyIDPrefix) {
		t.Fatalf("%s primary %s, want prefix %s", kind, newKey, keyIDPrefix)
	}
	m.roll(t, func(i int) []string { return []string{to, from[i]} }, func(i int) {
		provWaitForWriteUnder(ctx, t, c, c.APIServers[i], m.ns, newKey, 2*time.Minute)
	})
	rep := rotate(ctx, t, c, 0, "--retire")
	old := oldProviderName(from[0])
	if len(rep.DecryptOnly) != 1 || rep.DecryptOnly[0].Provider != old || rep.DecryptOnly[0].Objects != 0 || !rep.DecryptOnly[0].Removable {
		t.Fatalf("rotate --retire: decrypt-only report %+v, want %s with 0 objects, removable", rep.DecryptOnly, old)
	}
	// The writers may have rewritten everything already: then the rewrite
	// pass has no entry for a resource.
	var rewritten int64
	for _, st := range rep.Rewrite {
		rewritten += st.Rewritten
	}
	t.Logf("rotate --retire: %s, %d objects rewritten, old provider %s removable, disabled %v",
		rep.Action, rewritten, old, rep.DecryptOnly[0].Disabled)
	requireAllUnder(ctx, t, c, newKey, "secrets", "configmaps")
	m.roll(t, func(int) []string { return []string{to} }, nil)
	w.stop()
	checkWriters(t, w)
	m.readEverythingFresh(t, w)
}

// roll rewrites and restarts each plugin in turn with entries(i), checks
// its health lists them, and runs after(i) when set.
func (m *migration) roll(t *testing.T, entries func(i int) []string, after func(i int)) {
	t.Helper()
	for i, p := range m.c.Plugins {
		if err := p.SetProviders(entries(i)...); err != nil {
			t.Fatal(err)
		}
		if err := p.Restart(t.Context()); err != nil {
			t.Fatal(err)
		}
		health := pluginHealth(t, p)
		if n := strings.Count(health, ": ok\n"); n != len(entries(i)) {
			t.Fatalf("plugin %d health after restart, want %d providers ok:\n%s", i, len(entries(i)), health)
		}
		if after != nil {
			after(i)
		}
	}
}

// sharedPromoteWithoutWait rotates Key Vault (shared key state) with no
// propagation wait while plugin 1 would refresh its key state only after
// 10 minutes: apiserver 1 reads what apiserver 0 writes under the new
// version long before that, which works only because a plugin looks an
// unknown key_id up once (that lookup also teaches plugin 1 the new
// primary, so apiserver 1 switches too). Not one read may fail.
func (m *migration) sharedPromoteWithoutWait(t *testing.T) {
	ctx, c := t.Context(), m.c
	slow := c.Plugins[1]
	if err := slow.Configure(func(cfg map[string]any) { cfg["refreshInterval"] = "10m" }); err != nil {
		t.Fatal(err)
	}
	if err := slow.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	w := startWriters(ctx, c, m.ns, 4, m.secrets)
	defer w.stop()
	old := mustPrimary(t, c)
	rep := rotate(ctx, t, c, 0, "--force")
	for _, ph := range rep.Phases {
		if ph.Phase == rotation.PhasePropagate && ph.Seconds > 1 {
			t.Errorf("propagate took %s, want no wait for shared key state", ph.Duration)
		}
	}
	if rep.NewKeyID == old {
		t.Fatalf("rotate --force kept %s", old)
	}
	requireAllUnder(ctx, t, c, rep.NewKeyID, "secrets", "configmaps")
	w.stop()
	checkWriters(t, w)
}

// readEverythingFresh restarts every apiserver (their seed caches gone,
// each object's seed comes from the plugin again) and reads every object
// of the namespace through each, checking the writers' last values.
func (m *migration) readEverythingFresh(t *testing.T, w *writers) {
	ctx, c := t.Context(), m.c
	for i, a := range c.APIServers {
		if err := a.Restart(ctx); err != nil {
			t.Fatalf("restart apiserver %d: %v", i, err)
		}
		secrets, err := a.Client.CoreV1().Secrets(m.ns).List(ctx, metav1.ListOptions{})
		if err != nil {
			t.Fatalf("apiserver %d: list secrets: %v", i, err)
		}
		cms, err := a.Client.CoreV1().ConfigMaps(m.ns).List(ctx, metav1.ListOptions{})
		if err != nil {
			t.Fatalf("apiserver %d: list configmaps: %v", i, err)
		}
		if len(secrets.Items) < m.secrets || len(cms.Items) < m.configmaps {
			t.Errorf("apiserver %d reads %d secrets and %d configmaps, want at least %d and %d", i, len(secrets.Items), len(cms.Items), m.secrets, m.configmaps)
		}
		for _, s := range secrets.Items {
			want, ok := w.acked[s.Name]
			if got := string(s.Data["v"]); ok && got != want && got != w.inFlight[s.Name] {
				t.Errorf("apiserver %d: secret %s reads %q, want the acknowledged %q", i, s.Name, got, want)
			}
		}
	}
}

// checkWriters fails on any writer error but a conflict, and on no write.
func checkWriters(t *testing.T, w *writers) {
	t.Helper()
	t.Logf("writers: %d acknowledged writes, %d conflicts, %d errors", w.writes, w.conflicts, len(w.errs))
	if len(w.errs) > 0 {
		t.Errorf("writers saw %d errors other than 409 (failed reads or writes), first: %v", len(w.errs), w.errs[0])
	}
	if w.writes == 0 {
		t.Error("writers made no write")
	}
}

// mustPrimaryOf is the primary key_id of the configured provider name.
func mustPrimaryOf(t *testing.T, c *harness.Cluster, name string) string {
	t.Helper()
	keys, err := c.Keys()
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range keys {
		if k.Provider == name && k.State == "primary" {
			return k.KeyID
		}
	}
	t.Fatalf("no primary for provider %s in %+v", name, keys)
	return ""
}

// oldProviderName is the default name of an entry: its backend's YAML key.
func oldProviderName(entry string) string {
	name, _, _ := strings.Cut(entry, ":")
	return strings.TrimSpace(name)
}

// pluginHealth is the plugin's /healthz?verbose body.
func pluginHealth(t *testing.T, p *harness.Plugin) string {
	t.Helper()
	resp, err := http.Get(p.HealthURL + "/healthz?verbose")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
