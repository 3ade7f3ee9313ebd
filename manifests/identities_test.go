package manifests

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kms-v2/kms-plugin/config"
	"github.com/kms-v2/kms-plugin/providers"
	"github.com/kms-v2/kms-plugin/providers/azurekv"
)

// TestAzureIdentityConfigs: the two shipped Azure configs load with the
// real config loader and describe one key reached by two identities: the
// same vault and key, different client IDs and different credential files,
// so the plugin never holds kmsctl's credential (or its role). The header
// comments name the role each identity needs.
func TestAzureIdentityConfigs(t *testing.T) {
	plugin := loadAzureIdentity(t, "azure-plugin-config.yaml", "Key Vault Crypto Service Encryption User")
	kmsctl := loadAzureIdentity(t, "azure-kmsctl-config.yaml", "Key Vault Crypto Officer")
	if plugin.VaultURL != kmsctl.VaultURL || plugin.KeyName != kmsctl.KeyName {
		t.Errorf("different keys: plugin %s %s, kmsctl %s %s; both must name the same vault and key",
			plugin.VaultURL, plugin.KeyName, kmsctl.VaultURL, kmsctl.KeyName)
	}
	if plugin.Auth.TenantID != kmsctl.Auth.TenantID {
		t.Errorf("different tenants: plugin %s, kmsctl %s", plugin.Auth.TenantID, kmsctl.Auth.TenantID)
	}
	if plugin.Auth.ClientID == "" || plugin.Auth.ClientID == kmsctl.Auth.ClientID {
		t.Errorf("client IDs plugin %q, kmsctl %q: want two different identities", plugin.Auth.ClientID, kmsctl.Auth.ClientID)
	}
	pc, kc := credentialFile(plugin.Auth), credentialFile(kmsctl.Auth)
	if pc == "" || kc == "" || pc == kc {
		t.Errorf("credential files plugin %q, kmsctl %q: want two different files", pc, kc)
	}
}

// loadAzureIdentity loads manifests/identities/name with config.Load and
// the azurekv kind only, checks its header names role, and returns its
// azureKeyVault section.
func loadAzureIdentity(t *testing.T, name, role string) *azurekv.Config {
	t.Helper()
	path := filepath.Join("identities", name)
	cfg, err := config.Load(path, providers.Kinds{azurekv.Kind})
	if err != nil {
		t.Fatal(err)
	}
	if len(cfg.Providers) != 1 {
		t.Fatalf("%s: %d providers, want one azureKeyVault", path, len(cfg.Providers))
	}
	c, ok := cfg.Providers[0].Section.(*azurekv.Config)
	if !ok {
		t.Fatalf("%s: provider section is %T, want *azurekv.Config", path, cfg.Providers[0].Section)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(strings.Join(strings.Fields(strings.ReplaceAll(string(b), "#", " ")), " "), role) {
		t.Errorf("%s: the header does not name the role %q the identity needs", path, role)
	}
	return c
}

// credentialFile is the file an identity's credential is read from.
func credentialFile(a azurekv.Auth) string {
	if a.ClientSecretFile != "" {
		return a.ClientSecretFile
	}
	return a.ClientCertificateFile
}
