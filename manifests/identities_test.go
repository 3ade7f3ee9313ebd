package manifests

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kms-v2/kms-plugin/config"
	"github.com/kms-v2/kms-plugin/providers"
	"github.com/kms-v2/kms-plugin/providers/azurekv"
	"github.com/kms-v2/kms-plugin/providers/pkcs11"
)

// TestAzureIdentityConfigs: the two shipped Azure configs load with the
// real config loader and describe one key reached by two identities: the
// same vault and key, different client IDs and different credential files,
// so the plugin never holds kmsctl's credential (or its role). The header
// comments name the role each identity needs.
func TestAzureIdentityConfigs(t *testing.T) {
	plugin := loadIdentity[*azurekv.Config](t, azurekv.Kind, "azure-plugin-config.yaml", "Key Vault Crypto Service Encryption User")
	kmsctl := loadIdentity[*azurekv.Config](t, azurekv.Kind, "azure-kmsctl-config.yaml", "Key Vault Crypto Officer")
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

// TestPKCS11IdentityConfigs: the two shipped PKCS#11 configs load with the
// real config loader and describe one key reached by two HSM roles: the same
// module, token, key label and algorithm; the plugin logs in as the use-only
// Crypto User and kmsctl as the key-owning user, each with its own PIN
// file. The header comments name the role each login needs.
func TestPKCS11IdentityConfigs(t *testing.T) {
	plugin := loadIdentity[*pkcs11.Config](t, pkcs11.Kind, "pkcs11-plugin-config.yaml", "Crypto User")
	kmsctl := loadIdentity[*pkcs11.Config](t, pkcs11.Kind, "pkcs11-kmsctl-config.yaml", "Crypto Officer")
	if plugin.Module != kmsctl.Module || plugin.TokenLabel != kmsctl.TokenLabel || plugin.KeyLabel != kmsctl.KeyLabel || plugin.Algorithm != kmsctl.Algorithm {
		t.Errorf("different keys: plugin %s %s %s %s, kmsctl %s %s %s %s; both must name the same module, token, key label and algorithm",
			plugin.Module, plugin.TokenLabel, plugin.KeyLabel, plugin.Algorithm, kmsctl.Module, kmsctl.TokenLabel, kmsctl.KeyLabel, kmsctl.Algorithm)
	}
	if plugin.UserType != pkcs11.UserTypeCryptoUser {
		t.Errorf("plugin userType %q, want %s (a role that cannot create keys)", plugin.UserType, pkcs11.UserTypeCryptoUser)
	}
	if kmsctl.UserType != "" && kmsctl.UserType != pkcs11.UserTypeUser {
		t.Errorf("kmsctl userType %q, want %s (the role that owns the keys)", kmsctl.UserType, pkcs11.UserTypeUser)
	}
	if plugin.PinFile == kmsctl.PinFile {
		t.Errorf("both configs read the PIN from %s; want one PIN file per role", plugin.PinFile)
	}
}

// loadIdentity loads manifests/identities/name with config.Load and kind
// only, checks its header names role, and returns its provider section.
func loadIdentity[C any](t *testing.T, kind providers.Kind, name, role string) C {
	t.Helper()
	path := filepath.Join("identities", name)
	cfg, err := config.Load(path, providers.Kinds{kind})
	if err != nil {
		t.Fatal(err)
	}
	if len(cfg.Providers) != 1 {
		t.Fatalf("%s: %d providers, want one", path, len(cfg.Providers))
	}
	c, ok := cfg.Providers[0].Section.(C)
	if !ok {
		t.Fatalf("%s: provider section is %T, want %T", path, cfg.Providers[0].Section, c)
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
