package azurekv

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/cloud"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"
	"github.com/Azure/azure-sdk-for-go/sdk/azidentity"
	"github.com/Azure/azure-sdk-for-go/sdk/security/keyvault/azkeys"

	"github.com/kms-v2/kms-plugin/providers/secretfile"
)

// retryOptions keep every Key Vault call inside its caller's deadline (the
// apiserver's 3 s for Encrypt and Decrypt, 5 s for the plugin's checks and
// refreshes): at most two retries, short backoff, and a Retry-After longer
// than a second is not waited out (the call fails with ErrUnavailable and
// the circuit breaker keeps later calls away for that long). azcore honours
// Retry-After (and retry-after-ms) up to MaxRetryDelay and stops as soon as
// the caller's context ends.
//
// TryTimeout is longer than the apiserver's 3 s on purpose: a vault that
// answers in, say, 2.9 s is slow but working, and cutting each try at a
// fraction of the deadline turned every such call and every health check
// into a failure (measured: 2.9 s of latency made the plugin unhealthy with
// a 1.5 s try timeout). Fast failures (503, 429, a reset connection) are
// still retried inside the deadline; the try timeout only bounds a hung
// try for callers without a deadline of their own (kmsctl).
var retryOptions = policy.RetryOptions{
	MaxRetries:    2,
	TryTimeout:    4 * time.Second,
	RetryDelay:    100 * time.Millisecond,
	MaxRetryDelay: time.Second,
}

// newHTTPClient trusts the system roots plus caFile, and keeps enough idle
// connections for a burst of concurrent unwraps.
func newHTTPClient(caFile string) (*http.Client, error) {
	pool, err := x509.SystemCertPool()
	if err != nil || pool == nil {
		pool = x509.NewCertPool()
	}
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("azurekv: caFile: %w", err)
		}
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("azurekv: caFile %s: no PEM certificate in it", caFile)
		}
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	tr.MaxIdleConnsPerHost = 64
	return &http.Client{Transport: tr}, nil
}

// newClient builds the one credential and the Key Vault client a process
// uses. The SDK caches the token and renews it before expiry.
func newClient(cfg Config, hc *http.Client) (*azkeys.Client, error) {
	opts := azcore.ClientOptions{Transport: hc, Retry: retryOptions}
	if cfg.Auth.AuthorityHost != "" {
		host := cfg.Auth.AuthorityHost
		if !strings.HasSuffix(host, "/") {
			host += "/"
		}
		opts.Cloud = cloud.Configuration{
			ActiveDirectoryAuthorityHost: host,
			Services:                     cloud.AzurePublic.Services,
		}
	}
	cred, err := newCredential(cfg.Auth, opts)
	if err != nil {
		return nil, err
	}
	vault, _ := url.Parse(cfg.VaultURL)
	return azkeys.NewClient(cfg.VaultURL, cred, &azkeys.ClientOptions{
		ClientOptions: opts,
		// The challenge names https://vault.azure.net as the resource; a
		// loopback emulator cannot be a subdomain of it. Real vaults keep
		// the check.
		DisableChallengeResourceVerification: isLoopback(vault.Host),
	})
}

func newCredential(a Auth, opts azcore.ClientOptions) (azcore.TokenCredential, error) {
	// Instance discovery asks Microsoft's authority whether the authority
	// host is genuine; a local authority (the emulator) cannot pass it.
	noDiscovery := false
	if u, err := url.Parse(a.AuthorityHost); err == nil && a.AuthorityHost != "" {
		noDiscovery = isLoopback(u.Host)
	}
	switch a.Mode {
	case AuthClientSecret:
		secret, err := readSecretFile("auth.clientSecretFile", a.ClientSecretFile)
		if err != nil {
			return nil, err
		}
		return azidentity.NewClientSecretCredential(a.TenantID, a.ClientID, secret,
			&azidentity.ClientSecretCredentialOptions{ClientOptions: opts, DisableInstanceDiscovery: noDiscovery})
	case AuthClientCertificate:
		data, err := secretfile.Read("auth.clientCertificateFile", a.ClientCertificateFile)
		if err != nil {
			return nil, fmt.Errorf("azurekv: %w", err)
		}
		certs, key, err := azidentity.ParseCertificates(data, nil)
		if err != nil {
			return nil, fmt.Errorf("azurekv: auth.clientCertificateFile %s: %v (want PEM with certificate and unencrypted key, or PKCS#12 without password)", a.ClientCertificateFile, err)
		}
		return azidentity.NewClientCertificateCredential(a.TenantID, a.ClientID, certs, key,
			&azidentity.ClientCertificateCredentialOptions{ClientOptions: opts, DisableInstanceDiscovery: noDiscovery})
	case AuthWorkloadIdentity:
		return azidentity.NewWorkloadIdentityCredential(&azidentity.WorkloadIdentityCredentialOptions{
			ClientOptions: opts, ClientID: a.ClientID, TenantID: a.TenantID, TokenFilePath: a.TokenFile,
			DisableInstanceDiscovery: noDiscovery,
		})
	case AuthManagedIdentity:
		o := &azidentity.ManagedIdentityCredentialOptions{ClientOptions: opts}
		if a.ClientID != "" {
			o.ID = azidentity.ClientID(a.ClientID)
		}
		return azidentity.NewManagedIdentityCredential(o)
	case AuthDefault:
		return azidentity.NewDefaultAzureCredential(&azidentity.DefaultAzureCredentialOptions{
			ClientOptions: opts, TenantID: a.TenantID, DisableInstanceDiscovery: noDiscovery,
		})
	}
	return nil, fmt.Errorf("azurekv: auth.mode %q not supported", a.Mode)
}

// readSecretFile reads a secret that only its owner may read, trimming the
// newline editors and `kubectl create secret --from-file` leave behind.
func readSecretFile(field, path string) (string, error) {
	b, err := secretfile.Read(field, path)
	if err != nil {
		return "", fmt.Errorf("azurekv: %w", err)
	}
	return strings.TrimSpace(string(b)), nil
}
