package azurekv

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"path/filepath"
	"strings"

	"github.com/kms-v2/kms-plugin/providers"
)

// Defaults for optional fields.
const (
	// DefaultAlgorithm wraps with RSA-OAEP and SHA-256, the strongest RSA
	// wrapping Key Vault offers; RSA-OAEP (SHA-1) exists for old keys only.
	DefaultAlgorithm = "RSA-OAEP-256"
	// DefaultKeyType for keys made by Init (RSA-HSM needs a Premium vault).
	DefaultKeyType = "RSA"
	// DefaultKeySize for keys made by Init.
	DefaultKeySize = 3072
	// DefaultCacheSize and DefaultCacheTTL are the shared unwrap cache's.
	DefaultCacheSize = providers.DefaultUnwrapCacheSize
	DefaultCacheTTL  = providers.DefaultUnwrapCacheTTL
)

// Auth modes.
const (
	// AuthWorkloadIdentity exchanges a projected Kubernetes service-account
	// token for an Entra token (federated credential). Empty fields come from
	// the AZURE_CLIENT_ID, AZURE_TENANT_ID and AZURE_FEDERATED_TOKEN_FILE
	// variables the workload identity webhook injects.
	AuthWorkloadIdentity = "workloadIdentity"
	// AuthManagedIdentity uses the VM's or node's managed identity; clientID
	// selects a user-assigned one.
	AuthManagedIdentity = "managedIdentity"
	// AuthClientSecret uses a service principal's secret read from a file.
	AuthClientSecret = "clientSecret"
	// AuthClientCertificate uses a service principal's certificate and
	// private key (PEM or PKCS#12 without password) read from a file.
	AuthClientCertificate = "clientCertificate"
	// AuthDefault is azidentity's DefaultAzureCredential chain; handy on a
	// workstation, too implicit for production.
	AuthDefault = "default"
)

// Config is the `provider.azureKeyVault` section of the plugin
// configuration.
type Config struct {
	// VaultURL is the vault, e.g. https://myvault.vault.azure.net/.
	VaultURL string `json:"vaultURL"`
	// KeyName is the Key Vault key whose versions wrap the seeds.
	KeyName string `json:"keyName"`
	// KeyVersion pins the primary to one version. Empty (recommended): the
	// primary follows the promotion tag, or else the newest enabled version;
	// see the package documentation.
	KeyVersion string `json:"keyVersion,omitempty"`
	// Algorithm is RSA-OAEP-256 (default) or RSA-OAEP. Deterministic
	// wrappings (AES key wrap) are refused: the apiserver needs every
	// Encrypt to differ.
	Algorithm string `json:"algorithm,omitempty"`
	// KeyType (RSA or RSA-HSM) and KeySize (2048, 3072, 4096) apply to the
	// key `kmsctl keys init` creates; later versions copy the primary's.
	KeyType string `json:"keyType,omitempty"`
	KeySize int    `json:"keySize,omitempty"`
	// CAFile is an extra PEM bundle to trust besides the system roots, for
	// TLS-inspecting proxies and the emulator.
	CAFile string `json:"caFile,omitempty"`
	// Auth selects how the plugin authenticates to Entra ID.
	Auth Auth `json:"auth"`
	// UnwrapCache bounds the in-memory cache of unwrapped seeds. Unset:
	// DefaultCacheSize entries for DefaultCacheTTL. Size 0 turns caching off.
	UnwrapCache *UnwrapCache `json:"unwrapCache,omitempty"`

	// disableCoalescing turns off singleflight on Decrypt; only the
	// benchmark sets it, to measure what coalescing saves.
	disableCoalescing bool
}

// Auth is the Entra ID identity of the plugin. Secrets and certificates
// come only from files, never inline, so the config file can be world
// readable and the secret rotated by replacing a file. Those files must be
// readable by their owner only, like the pkcs11 PIN file: a credential
// other local users can read is a credential given away.
type Auth struct {
	// Mode is workloadIdentity, managedIdentity, clientSecret,
	// clientCertificate or default.
	Mode string `json:"mode"`
	// TenantID is the Entra tenant (directory) ID.
	TenantID string `json:"tenantID,omitempty"`
	// ClientID is the application (or user-assigned identity) client ID.
	ClientID string `json:"clientID,omitempty"`
	// ClientSecretFile holds the client secret (clientSecret mode).
	ClientSecretFile string `json:"clientSecretFile,omitempty"`
	// ClientCertificateFile holds certificate and key (clientCertificate).
	ClientCertificateFile string `json:"clientCertificateFile,omitempty"`
	// TokenFile is the projected service-account token (workloadIdentity);
	// default AZURE_FEDERATED_TOKEN_FILE.
	TokenFile string `json:"tokenFile,omitempty"`
	// AuthorityHost overrides the Entra endpoint for sovereign clouds, e.g.
	// https://login.microsoftonline.us/, or the emulator.
	AuthorityHost string `json:"authorityHost,omitempty"`
}

// UnwrapCache and Duration are the shared section types, kept under
// their old names.
type (
	UnwrapCache = providers.UnwrapCache
	Duration    = providers.Duration
)

// ResolvePaths makes relative file paths absolute against dir, the config
// file's folder.
func (c *Config) ResolvePaths(dir string) {
	for _, p := range []*string{&c.CAFile, &c.Auth.ClientSecretFile, &c.Auth.ClientCertificateFile, &c.Auth.TokenFile} {
		if *p != "" && !filepath.IsAbs(*p) {
			*p = filepath.Join(dir, *p)
		}
	}
}

// Validate checks the section; every error names the field and the fix.
func (c Config) Validate() error {
	if c.VaultURL == "" {
		return errors.New("vaultURL: missing; set the vault, e.g. https://myvault.vault.azure.net/")
	}
	u, err := url.Parse(c.VaultURL)
	if err != nil || u.Scheme != "https" || u.Host == "" || (u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.User != nil {
		return fmt.Errorf("vaultURL %q: want https://<vault>.vault.azure.net/ with no path", c.VaultURL)
	}
	if !validName(c.KeyName, 127, true) {
		return fmt.Errorf("keyName %q: want 1-127 letters, digits and dashes, e.g. k8s-kek", c.KeyName)
	}
	if c.KeyVersion != "" && !validName(c.KeyVersion, 64, false) {
		return fmt.Errorf("keyVersion %q: want a version ID (32 hex digits) or empty to follow the primary", c.KeyVersion)
	}
	switch c.Algorithm {
	case "", "RSA-OAEP-256", "RSA-OAEP":
	default:
		return fmt.Errorf("algorithm %q: want RSA-OAEP-256 (default) or RSA-OAEP", c.Algorithm)
	}
	switch c.KeyType {
	case "", "RSA", "RSA-HSM":
	default:
		return fmt.Errorf("keyType %q: want RSA (default) or RSA-HSM", c.KeyType)
	}
	switch c.KeySize {
	case 0, 2048, 3072, 4096:
	default:
		return fmt.Errorf("keySize %d: want 2048, 3072 (default) or 4096", c.KeySize)
	}
	if err := c.UnwrapCache.Validate("unwrapCache"); err != nil {
		return err
	}
	return c.Auth.validate()
}

func (a Auth) validate() error {
	need := func(field, v, example string) error {
		if v == "" {
			return fmt.Errorf("auth.%s: missing for mode %s; set it, e.g. %s", field, a.Mode, example)
		}
		return nil
	}
	var errs []error
	switch a.Mode {
	case AuthClientSecret:
		errs = append(errs, need("tenantID", a.TenantID, "the directory ID"), need("clientID", a.ClientID, "the application ID"),
			need("clientSecretFile", a.ClientSecretFile, "/etc/kms-plugin/client-secret"))
	case AuthClientCertificate:
		errs = append(errs, need("tenantID", a.TenantID, "the directory ID"), need("clientID", a.ClientID, "the application ID"),
			need("clientCertificateFile", a.ClientCertificateFile, "/etc/kms-plugin/client.pem"))
	case AuthWorkloadIdentity, AuthManagedIdentity, AuthDefault:
	case "":
		return errors.New("auth.mode: missing; set workloadIdentity, managedIdentity, clientSecret, clientCertificate or default")
	default:
		return fmt.Errorf("auth.mode %q: want workloadIdentity, managedIdentity, clientSecret, clientCertificate or default", a.Mode)
	}
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	if a.Mode != AuthClientSecret && a.ClientSecretFile != "" {
		return fmt.Errorf("auth.clientSecretFile: only used by mode clientSecret, not %s; remove it", a.Mode)
	}
	if a.Mode != AuthClientCertificate && a.ClientCertificateFile != "" {
		return fmt.Errorf("auth.clientCertificateFile: only used by mode clientCertificate, not %s; remove it", a.Mode)
	}
	if a.Mode != AuthWorkloadIdentity && a.TokenFile != "" {
		return fmt.Errorf("auth.tokenFile: only used by mode workloadIdentity, not %s; remove it", a.Mode)
	}
	if a.AuthorityHost != "" {
		u, err := url.Parse(a.AuthorityHost)
		if err != nil || u.Scheme != "https" || u.Host == "" {
			return fmt.Errorf("auth.authorityHost %q: want an https URL such as https://login.microsoftonline.us/", a.AuthorityHost)
		}
	}
	return nil
}

// validName reports whether s is 1..max ASCII letters and digits (and
// dashes when dash is true), the alphabet of Key Vault names and versions.
func validName(s string, max int, dash bool) bool {
	if s == "" || len(s) > max {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || dash && c == '-') {
			return false
		}
	}
	return true
}

// isLoopback reports whether host (with or without port) names this
// machine. Only then are the checks that cannot pass against a local
// emulator (challenge resource verification, instance discovery) relaxed;
// a real vault or authority is never on loopback.
func isLoopback(hostport string) bool {
	host := hostport
	if h, _, err := net.SplitHostPort(hostport); err == nil {
		host = h
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(strings.Trim(host, "[]"))
	return ip != nil && ip.IsLoopback()
}
