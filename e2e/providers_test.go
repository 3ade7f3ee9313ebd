//go:build e2e

package e2e

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kms-v2/kms-plugin/e2e/harness"
	"github.com/kms-v2/kms-plugin/e2e/keyvault-emulator/emulator"
	"github.com/kms-v2/kms-plugin/providers/pkcs11/pkcs11test"
	"github.com/kms-v2/kms-plugin/providers/pkcs11/tpmtest"
	"github.com/kms-v2/kms-plugin/rotation/etcdlayout"
)

// TestPKCS11ControlPlane runs the real control plane with the plugin on a
// SoftHSM2 token: every stored value is wrapped by an HSM key object, a
// promoted key reaches new writes, and a restarted plugin and apiserver
// still read what the old key protects.
func TestPKCS11ControlPlane(t *testing.T) {
	label := "e2e-" + provRandomHex(t, 4)
	tk := pkcs11test.NewDetachedToken(t, label)
	runProviderControlPlane(t, providerCase{
		opts: harness.Options{
			ProviderYAML: tk.ProviderYAML("k8s-kek"),
			Env:          []string{tk.Env()},
		},
		keyIDPrefix: "pkcs11:" + label + "/k8s-kek-",
	})
}

// TestAzureKeyVaultControlPlane runs the real control plane with the plugin
// on Azure Key Vault, served by the emulator in this test process and
// reached through the real SDK: client-secret login at the emulator's Entra
// endpoints, TLS trusted through a CA file, keys wrapped by the vault.
func TestAzureKeyVaultControlPlane(t *testing.T) {
	kv := startKeyVault(t, "k8s-kek")
	runProviderControlPlane(t, providerCase{
		opts:        harness.Options{ProviderYAML: kv.yaml},
		keyIDPrefix: kv.keyIDPrefix,
		backendUnwraps: func() int64 {
			return kv.e.Counts().Unwrap
		},
	})
}

// keyVault is the Key Vault emulator running in this test process, with a
// client-secret identity, and the provider section that reaches it
// through the real SDK: login at the emulator's Entra endpoints, TLS
// trusted through a CA file.
type keyVault struct {
	e *emulator.Emulator
	// yaml is the body of a provider entry: "azureKeyVault:\n  ...".
	yaml string
	// keyIDPrefix starts every key_id of the key.
	keyIDPrefix string
}

// startKeyVault starts the emulator for the test's lifetime.
func startKeyVault(t *testing.T, keyName string) keyVault {
	t.Helper()
	const clientID = "kms-plugin-e2e"
	secret := "e2e-" + provRandomHex(t, 16)
	dir := t.TempDir()
	e, err := emulator.Start(emulator.Options{Dir: dir, Clients: map[string]string{clientID: secret}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Close() })
	secretFile := filepath.Join(dir, "client-secret")
	if err := os.WriteFile(secretFile, []byte(secret+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	u, err := url.Parse(e.URL)
	if err != nil {
		t.Fatal(err)
	}
	// Fields quoted with %q: a JSON string is a YAML string.
	yaml := fmt.Sprintf(`azureKeyVault:
  vaultURL: %q
  keyName: %q
  keySize: 2048
  caFile: %q
  auth:
    mode: clientSecret
    tenantID: %q
    clientID: %q
    clientSecretFile: %q
    authorityHost: %q
`, e.URL, keyName, e.CAFile, e.TenantID, clientID, secretFile, e.URL)
	return keyVault{e: e, yaml: yaml, keyIDPrefix: "azurekv:" + u.Host + "/" + keyName + "/"}
}

// TestTPMControlPlane runs the real control plane with the plugin on a TPM
// 2.0 (swtpm behind tpm2-abrmd, as a tpm2-pkcs11 token): seeds wrapped
// with RSA-OAEP-256 in software and unwrapped inside the TPM, a promoted
// key that new writes follow, old objects read by a restarted plugin and
// apiserver, and one `kmsctl rotate` to the end. The TPM is the node's own,
// so its key state is per node.
func TestTPMControlPlane(t *testing.T) {
	label := "tpm-" + provRandomHex(t, 3)
	tp := tpmtest.Start(t, label)
	runProviderControlPlane(t, providerCase{
		opts: harness.Options{
			ProviderYAML: "keyState: perNode\n" + tp.ProviderYAML("k8s-kek"),
			Env:          tp.Env,
		},
		keyIDPrefix: "pkcs11:" + label + "/k8s-kek-",
		rotate:      true,
	})
}

// providerCase is one backend for runProviderControlPlane.
type providerCase struct {
	// opts carry the provider (ProviderYAML, Env); Setup is set by
	// runProviderControlPlane.
	opts harness.Options
	// keyIDPrefix starts every key_id the backend makes, up to the part
	// that differs per version.
	keyIDPrefix string
	// backendUnwraps, when set, counts unwrap operations the backend
	// itself served, to prove a read went to it and not to a cache.
	backendUnwraps func() int64
	// rotate ends the scenario with `kmsctl rotate --force --retire`: every
	// object rewritten under a new version, proven by the census, the old
	// versions disabled.
	rotate bool
}

// runProviderControlPlane is the scenario both provider tests share: one
// apiserver and one plugin on the provider, objects stored encrypted under
// the primary key_id, a create + promote that new writes follow, and old
// objects that still decrypt after the plugin and the apiserver restart
// with empty caches.
func runProviderControlPlane(t *testing.T, pc providerCase) {
	opts := pc.opts
	opts.Setup = func(ctx context.Context, c *harness.Cluster) error {
		_, err := c.KmsctlContext(ctx, "keys", "init")
		return err
	}
	c := harness.Start(t, opts)
	ctx := t.Context()
	a, p := c.APIServers[0], c.Plugins[0]
	wantPrefix := []byte(etcdlayout.KMSv2Prefix + c.ProviderName + ":")

	old := cpPrimary(t, c)
	if !strings.HasPrefix(old, pc.keyIDPrefix) {
		t.Fatalf("primary key_id after kmsctl keys init: got %q, want prefix %q", old, pc.keyIDPrefix)
	}
	ns := "providers-" + provRandomHex(t, 4)
	if err := c.CreateNamespace(ctx, ns); err != nil {
		t.Fatal(err)
	}

	// Values no encoding of an object could contain by chance.
	secretValue := "s3cret-" + provRandomHex(t, 8)
	cmValue := "c0nfig-" + provRandomHex(t, 8)
	if _, err := a.Client.CoreV1().Secrets(ns).Create(ctx, &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: "old-secret"},
		Data:       map[string][]byte{"password": []byte(secretValue)},
		StringData: map[string]string{"token": secretValue},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create secret: %v", err)
	}
	if _, err := a.Client.CoreV1().ConfigMaps(ns).Create(ctx, &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Name: "old-configmap"},
		Data:       map[string]string{"setting": cmValue},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create configmap: %v", err)
	}
	provWriteSecret(ctx, t, a, ns, "old-plain", "old")
	oldObjects := []string{
		c.Layout.Key("secrets", ns, "old-secret"),
		c.Layout.Key("configmaps", ns, "old-configmap"),
		c.Layout.Key("secrets", ns, "old-plain"),
	}
	for _, k := range oldObjects {
		provCheckStored(ctx, t, c, k, wantPrefix, old)
	}
	provCheckNoPlaintext(ctx, t, c, ns, map[string]string{"secret value": secretValue, "configmap value": cmValue})
	provCheckOldReads(ctx, t, a, ns, secretValue, cmValue)

	// A new version: enabled, not primary, until promoted.
	id, err := c.CreateKey()
	if err != nil {
		t.Fatal(err)
	}
	if id == old || !strings.HasPrefix(id, pc.keyIDPrefix) {
		t.Fatalf("kmsctl keys create: got key_id %q, want a new one with prefix %q (primary %q)", id, pc.keyIDPrefix, old)
	}
	if got := cpKeyState(t, c, id); got != "enabled" {
		t.Errorf("new key %s state: got %q, want enabled (not primary until promoted)", id, got)
	}
	if err := c.Promote(id); err != nil {
		t.Fatal(err)
	}
	if got := cpPrimary(t, c); got != id {
		t.Fatalf("primary after kmsctl keys promote: got %q, want %q", got, id)
	}
	if got := cpKeyState(t, c, old); got != "enabled" {
		t.Errorf("old key %s state after the promote: got %q, want enabled", old, got)
	}

	// The apiserver learns the new key_id on its next Status call; asking
	// /readyz/kms-providers makes one once the last healthy result is 20 s
	// old. Write until a write lands under the new key_id.
	start := time.Now()
	newKey := provWaitForWriteUnder(ctx, t, c, a, ns, id, 2*time.Minute)
	t.Logf("a write landed under the promoted key_id %s after the promote", time.Since(start).Round(time.Second))
	provCheckStored(ctx, t, c, newKey, wantPrefix, id)
	for _, k := range oldObjects {
		provCheckStored(ctx, t, c, k, wantPrefix, old) // not rewritten behind our back
	}
	provCheckOldReads(ctx, t, a, ns, secretValue, cmValue)

	// Caches gone: a fresh plugin and a fresh apiserver must unwrap both
	// seeds through the backend, the old one with the old key version.
	if err := p.Restart(ctx); err != nil {
		t.Fatalf("restart kms-plugin: %v", err)
	}
	var unwrapsBefore int64
	if pc.backendUnwraps != nil {
		unwrapsBefore = pc.backendUnwraps()
	}
	if err := a.Restart(ctx); err != nil {
		t.Fatalf("restart kube-apiserver: %v", err)
	}
	provCheckOldReads(ctx, t, a, ns, secretValue, cmValue)
	if got := cpReadSecret(ctx, t, a, ns, "old-plain"); got != "old" {
		t.Errorf("old-plain after restarts: got %q, want %q", got, "old")
	}
	m, err := p.Metrics(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// At least the old key's seed and the new key's seed.
	decrypts := m.Sum("kms_plugin_requests_total", map[string]string{"method": "Decrypt", "code": "OK"})
	t.Logf("successful Decrypt calls to the restarted plugin: %v", decrypts)
	if decrypts < 2 {
		t.Errorf("successful Decrypt calls to the restarted plugin: got %v, want at least 2 (a seed under each key_id)", decrypts)
	}
	if pc.backendUnwraps != nil {
		n := pc.backendUnwraps() - unwrapsBefore
		t.Logf("unwrap operations the backend served after the restarts: %d", n)
		if n < 2 {
			t.Errorf("unwrap operations the backend served after the restarts: got %d, want at least 2 (a seed under each key_id)", n)
		}
	}
	provCheckNoPlaintext(ctx, t, c, ns, map[string]string{"secret value": secretValue, "configmap value": cmValue})
	if pc.rotate {
		provRotate(ctx, t, c, pc.keyIDPrefix)
		provCheckOldReads(ctx, t, a, ns, secretValue, cmValue)
	}
}

// provRotate runs `kmsctl rotate --force --retire` and checks that every
// secret and configmap moved to the new version and the old ones are off.
func provRotate(ctx context.Context, t *testing.T, c *harness.Cluster, keyIDPrefix string) {
	t.Helper()
	rep := rotate(ctx, t, c, 0, "--force", "--retire")
	if rep.NewKeyID == rep.OldKeyID || !strings.HasPrefix(rep.NewKeyID, keyIDPrefix) {
		t.Fatalf("rotate: %s -> %s, want a new version with prefix %s", rep.OldKeyID, rep.NewKeyID, keyIDPrefix)
	}
	requireAllUnder(ctx, t, c, rep.NewKeyID, "secrets", "configmaps")
	if len(rep.Retired) == 0 {
		t.Errorf("rotate --retire disabled no version (report %+v)", rep)
	}
	for _, k := range rep.Retired {
		if got := keyState(t, c, k); got != "disabled" {
			t.Errorf("retired %s is %s, want disabled", k, got)
		}
	}
	t.Logf("rotate: %s -> %s in %s, retired %v", rep.OldKeyID, rep.NewKeyID, rep.Duration, rep.Retired)
}

// provWaitForWriteUnder writes a fresh secret in ns through a every second,
// nudging a's Status call first, until one is stored under keyID. It
// returns that secret's etcd key and fails the test at the deadline.
func provWaitForWriteUnder(ctx context.Context, t *testing.T, c *harness.Cluster, a *harness.APIServer, ns, keyID string, timeout time.Duration) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var key string
	n := 0
	err := harness.Poll(ctx, time.Second, func() error {
		if _, _, err := a.Get(ctx, "/readyz/kms-providers"); err != nil {
			return err
		}
		n++
		name := fmt.Sprintf("after-promote-%d", n)
		if _, err := a.Client.CoreV1().Secrets(ns).Create(ctx, &corev1.Secret{
			ObjectMeta: metav1.ObjectMeta{Name: name},
			Data:       map[string][]byte{"v": []byte("new")},
		}, metav1.CreateOptions{}); err != nil {
			return fmt.Errorf("create secret %s: %w", name, err)
		}
		k := c.Layout.Key("secrets", ns, name)
		got, err := c.StoredObject(ctx, k)
		if err != nil {
			return err
		}
		if got.Stored.Encoding != etcdlayout.EncodingKMSv2 || got.Stored.KeyID != keyID {
			return fmt.Errorf("%s stored as %s under key_id %q, want kmsv2 under %q", k, got.Stored.Encoding, got.Stored.KeyID, keyID)
		}
		key = k
		return nil
	})
	if err != nil {
		t.Fatalf("no write landed under the promoted key_id within %s: %v", timeout, err)
	}
	if got := cpReadSecret(ctx, t, a, ns, key[strings.LastIndexByte(key, '/')+1:]); got != "new" {
		t.Errorf("secret written under the new key: got %q, want %q", got, "new")
	}
	return key
}

// provCheckStored checks that etcd holds key as a KMS v2 value of this
// cluster's provider under keyID.
func provCheckStored(ctx context.Context, t *testing.T, c *harness.Cluster, key string, wantPrefix []byte, keyID string) {
	t.Helper()
	got, err := c.StoredObject(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(got.Raw, wantPrefix) {
		n := min(len(got.Raw), len(wantPrefix))
		t.Errorf("%s: stored value starts %q, want prefix %q", key, got.Raw[:n], wantPrefix)
	}
	if got.Stored.Encoding != etcdlayout.EncodingKMSv2 || got.Stored.KeyID != keyID {
		t.Errorf("%s: stored as %s under key_id %q (err %v), want kmsv2 under %q", key, got.Stored.Encoding, got.Stored.KeyID, got.Stored.Err, keyID)
	}
}

// provCheckNoPlaintext scans every value in etcd for the given values, raw
// and base64. A marker in an (unencrypted) namespace annotation must be
// found, or the scan proves nothing.
func provCheckNoPlaintext(ctx context.Context, t *testing.T, c *harness.Cluster, ns string, values map[string]string) {
	t.Helper()
	marker := "visible-" + provRandomHex(t, 8)
	if _, err := c.APIServers[0].Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{
		ObjectMeta: metav1.ObjectMeta{Name: ns + "-plain-" + provRandomHex(t, 2), Annotations: map[string]string{"e2e.kms.example/marker": marker}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	all, err := c.StoredObjects(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	needles := map[string][]byte{}
	for name, v := range values {
		needles[name] = []byte(v)
		needles[name+" (base64)"] = []byte(base64.StdEncoding.EncodeToString([]byte(v)))
	}
	markerFound := false
	for _, o := range all {
		if bytes.Contains(o.Raw, []byte(marker)) {
			markerFound = true
		}
		for name, n := range needles {
			if bytes.Contains(o.Raw, n) {
				t.Errorf("%s found in plaintext in etcd under %s", name, o.Key)
			}
		}
	}
	if !markerFound {
		t.Errorf("the plaintext scan of %d etcd values did not find the unencrypted namespace marker; the scan cannot be trusted", len(all))
	}
}

// provCheckOldReads reads the first objects back through the apiserver.
func provCheckOldReads(ctx context.Context, t *testing.T, a *harness.APIServer, ns, secretValue, cmValue string) {
	t.Helper()
	s, err := a.Client.CoreV1().Secrets(ns).Get(ctx, "old-secret", metav1.GetOptions{})
	if err != nil {
		t.Fatalf("read secret: %v", err)
	}
	for _, k := range []string{"password", "token"} {
		if got := string(s.Data[k]); got != secretValue {
			t.Errorf("secret %s: got %q, want %q", k, got, secretValue)
		}
	}
	cm, err := a.Client.CoreV1().ConfigMaps(ns).Get(ctx, "old-configmap", metav1.GetOptions{})
	if err != nil {
		t.Fatalf("read configmap: %v", err)
	}
	if got := cm.Data["setting"]; got != cmValue {
		t.Errorf("configmap setting: got %q, want %q", got, cmValue)
	}
}

func provWriteSecret(ctx context.Context, t *testing.T, a *harness.APIServer, ns, name, value string) {
	t.Helper()
	if _, err := a.Client.CoreV1().Secrets(ns).Create(ctx, &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Data:       map[string][]byte{"v": []byte(value)},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create secret %s/%s: %v", ns, name, err)
	}
}

func provRandomHex(t *testing.T, n int) string {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}
