package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"testing"

	kmsservice "k8s.io/kms/pkg/service"
	"sigs.k8s.io/yaml"

	"github.com/kms-v2/kms-plugin/e2e/keyvault-emulator/emulator"
)

// TestLeastPrivilegeAzureIdentities proves the identity split of
// manifests/identities with the real binaries, the real azkeys SDK and the
// Key Vault emulator enforcing Azure's roles: the plugin's identity
// ("Key Vault Crypto Service Encryption User") encrypts and decrypts but
// cannot create a key version, and says so in one line; kmsctl's identity
// ("Key Vault Crypto Officer") creates and promotes, and the plugin follows
// the new primary.
func TestLeastPrivilegeAzureIdentities(t *testing.T) {
	dir := t.TempDir()
	pluginShipped := readIdentityConfig(t, "azure-plugin-config.yaml")
	kmsctlShipped := readIdentityConfig(t, "azure-kmsctl-config.yaml")
	tenant := authField(t, pluginShipped, "tenantID")
	kv, err := emulator.Start(emulator.Options{Dir: dir, TenantID: tenant})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { kv.Close() })
	pluginID, kmsctlID := authField(t, pluginShipped, "clientID"), authField(t, kmsctlShipped, "clientID")
	kv.AddClientWithRole(pluginID, writeSecret(t, dir, "plugin-secret"), emulator.RoleCryptoServiceEncryptionUser)
	kv.AddClientWithRole(kmsctlID, writeSecret(t, dir, "kmsctl-secret"), emulator.RoleCryptoOfficer)

	pe := env{dir: dir, config: filepath.Join(dir, "plugin.yaml"), socket: filepath.Join(dir, "run", "kms.sock")}
	writeIdentityConfig(t, pe.config, pluginShipped, kv, filepath.Join(dir, "plugin-secret"), pe.socket)
	kmsctlConfig := filepath.Join(dir, "kmsctl.yaml")
	writeIdentityConfig(t, kmsctlConfig, kmsctlShipped, kv, filepath.Join(dir, "kmsctl-secret"), "")

	first := strings.TrimSpace(run(t, "kmsctl", "keys", "init", "--config", kmsctlConfig))
	startPlugin(t, pe)
	svc := client(t, pe)
	waitForKeyID(t, svc, first)
	enc := roundTripVia(t, svc, first)

	// The first create would tag the primary before adding a version:
	// refused at the tag update, before anything changed.
	refusedToPlugin(t, kv, kmsctlConfig, "update", "keys", "create", "--config", pe.config)

	second := strings.TrimSpace(run(t, "kmsctl", "keys", "create", "--config", kmsctlConfig))
	run(t, "kmsctl", "keys", "promote", "--config", kmsctlConfig, second)
	waitForKeyID(t, svc, second)
	roundTripVia(t, svc, second)
	// With the promotion tag in place, a create goes straight to the
	// version create; disable is a version update: both refused.
	refusedToPlugin(t, kv, kmsctlConfig, "create", "keys", "create", "--config", pe.config)
	refusedToPlugin(t, kv, kmsctlConfig, "update", "keys", "disable", "--config", pe.config, first)
	if got, err := svc.Decrypt(context.Background(), "old", &kmsservice.DecryptRequest{KeyID: enc.KeyID, Ciphertext: enc.Ciphertext}); err != nil || len(got) != 32 {
		t.Fatalf("decrypt under the old primary after promote: %v", err)
	}
	if out, stderr, code := runCode("kms-plugin", "doctor", "--config", pe.config); code != 0 || !strings.Contains(out, "primary "+second+" encrypts and decrypts") {
		t.Fatalf("doctor with the plugin's identity: exit %d\n%s%s", code, out, stderr)
	}
}

// refusedToPlugin runs kmsctl args with the plugin's identity and checks
// it fails with one line naming the refused Key Vault data action (create
// or update) and the role that has it, and that the key's versions, as
// kmsctl's own identity lists them, did not change.
func refusedToPlugin(t *testing.T, kv *emulator.Emulator, kmsctlConfig, action string, args ...string) {
	t.Helper()
	before := run(t, "kmsctl", "keys", "list", "--config", kmsctlConfig, "-o", "json")
	counts := kv.Counts()
	_, stderr, code := runCode("kmsctl", args...)
	lines := nonLogLines(stderr)
	if code == 0 || len(lines) != 1 {
		t.Fatalf("kmsctl %s with the plugin's identity: exit %d, stderr %q; want a non-zero exit and one line", args[1], code, stderr)
	}
	t.Logf("kmsctl %s with the plugin's identity: exit %d: %s", args[1], code, lines[0])
	for _, want := range []string{"HTTP 403", "does not grant Microsoft.KeyVault/vaults/keys/" + action + "/action", "Key Vault Crypto Officer", "permission denied"} {
		if !strings.Contains(lines[0], want) {
			t.Errorf("kmsctl %s with the plugin's identity: %q lacks %q", args[1], lines[0], want)
		}
	}
	if after := run(t, "kmsctl", "keys", "list", "--config", kmsctlConfig, "-o", "json"); after != before {
		t.Errorf("the refused %s changed the key:\nbefore %s\nafter %s", args[1], before, after)
	}
	if c := kv.Counts(); c.Create != counts.Create || c.Update != counts.Update || c.Rotate != counts.Rotate {
		t.Errorf("the refused %s reached the key: counts %+v, before %+v", args[1], c, counts)
	}
}

// roundTripVia encrypts random bytes through the plugin, checks the key_id
// is want and that they decrypt, and returns the encryption.
func roundTripVia(t *testing.T, svc kmsservice.Service, want string) *kmsservice.EncryptResponse {
	t.Helper()
	seed := make([]byte, 32)
	_, _ = rand.Read(seed)
	ctx := context.Background()
	enc, err := svc.Encrypt(ctx, "id", seed)
	if err != nil || enc.KeyID != want {
		t.Fatalf("Encrypt = %+v, %v; want key_id %s", enc, err, want)
	}
	got, err := svc.Decrypt(ctx, "id", &kmsservice.DecryptRequest{KeyID: enc.KeyID, Ciphertext: enc.Ciphertext})
	if err != nil || !bytes.Equal(got, seed) {
		t.Fatalf("Decrypt: %v", err)
	}
	return enc
}

// readIdentityConfig parses a shipped config of manifests/identities.
func readIdentityConfig(t *testing.T, name string) map[string]any {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "..", "manifests", "identities", name))
	if err != nil {
		t.Fatal(err)
	}
	var c map[string]any
	if err := yaml.Unmarshal(b, &c); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	return c
}

// providerSection is the config's provider.<kind> section.
func providerSection(t *testing.T, c map[string]any, kind string) map[string]any {
	t.Helper()
	p, _ := c["provider"].(map[string]any)
	s, ok := p[kind].(map[string]any)
	if !ok {
		t.Fatalf("config has no provider.%s section", kind)
	}
	return s
}

// azureSection is the config's provider.azureKeyVault section.
func azureSection(t *testing.T, c map[string]any) map[string]any {
	t.Helper()
	return providerSection(t, c, "azureKeyVault")
}

// copyConfig returns a deep copy of a parsed config.
func copyConfig(t *testing.T, shipped map[string]any) map[string]any {
	t.Helper()
	b, _ := yaml.Marshal(shipped)
	var c map[string]any
	if err := yaml.Unmarshal(b, &c); err != nil {
		t.Fatal(err)
	}
	return c
}

// writeConfig writes a parsed config to path, 0600.
func writeConfig(t *testing.T, path string, c map[string]any) {
	t.Helper()
	out, err := yaml.Marshal(c)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, out, 0o600); err != nil {
		t.Fatal(err)
	}
}

// authField is provider.azureKeyVault.auth.<field>.
func authField(t *testing.T, c map[string]any, field string) string {
	t.Helper()
	a, _ := azureSection(t, c)["auth"].(map[string]any)
	v, _ := a[field].(string)
	if v == "" {
		t.Fatalf("config has no auth.%s", field)
	}
	return v
}

// writeIdentityConfig writes a shipped identity config pointed at the
// emulator: only the vault URL, the authority host and CA, the secret
// file's path, and (for a plugin that serves) the socket and health
// address change; auth mode, tenant, client ID and key stay as shipped.
func writeIdentityConfig(t *testing.T, path string, shipped map[string]any, kv *emulator.Emulator, secretFile, socket string) {
	t.Helper()
	c := copyConfig(t, shipped)
	s := azureSection(t, c)
	s["vaultURL"], s["caFile"] = kv.URL, kv.CAFile
	a := s["auth"].(map[string]any)
	a["authorityHost"], a["clientSecretFile"] = kv.URL, secretFile
	if socket != "" {
		c["socket"], c["health"] = socket, freeTCPAddr(t)
	}
	writeConfig(t, path, c)
}

// writeSecret writes a random client secret to dir/name, 0600, and
// returns it.
func writeSecret(t *testing.T, dir, name string) string {
	t.Helper()
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	secret := hex.EncodeToString(b)
	if err := os.WriteFile(filepath.Join(dir, name), []byte(secret+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return secret
}
