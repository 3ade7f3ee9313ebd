package harness

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"os"
	"path/filepath"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	apiserverv1 "k8s.io/apiserver/pkg/apis/apiserver/v1"
	"sigs.k8s.io/yaml"
)

// EncryptionProvider is one entry of an EncryptionConfiguration's providers
// list, as the harness renders it for one apiserver. Build it with KMS,
// Identity or AESCBC; the first entry writes, every entry reads.
type EncryptionProvider struct {
	kms      string // KMS v2 provider name
	identity bool
	aescbc   string // aescbc key name
}

// KMS is a KMS v2 provider named name, served by the apiserver's own plugin
// socket. Several names may share that socket: the provider name only
// changes the prefix k8s:enc:kms:v2:<name>: of what it writes.
func KMS(name string) EncryptionProvider { return EncryptionProvider{kms: name} }

// Identity stores (and reads) plaintext.
func Identity() EncryptionProvider { return EncryptionProvider{identity: true} }

// AESCBC is an aescbc provider with one key named keyName. Its 32-byte
// secret is generated on first use and stays the same for the cluster's
// life, so a later configuration can still read what it wrote.
func AESCBC(keyName string) EncryptionProvider { return EncryptionProvider{aescbc: keyName} }

func (p EncryptionProvider) String() string {
	switch {
	case p.kms != "":
		return "kms " + p.kms
	case p.aescbc != "":
		return "aescbc " + p.aescbc
	case p.identity:
		return "identity"
	}
	return "(empty provider)"
}

// DefaultEncryptionProviders are what Launch configures: KMS v2 under the
// cluster's ProviderName first (it writes) and identity second (it reads
// what was stored before encryption was on).
func (c *Cluster) DefaultEncryptionProviders() []EncryptionProvider {
	return []EncryptionProvider{KMS(c.ProviderName), Identity()}
}

// RenderEncryptionConfig renders an EncryptionConfiguration (apiserver.config.k8s.io/v1)
// that encrypts the cluster's Resources with providers, in order, for
// apiserver a (its KMS entries dial a's plugin socket).
func (a *APIServer) RenderEncryptionConfig(providers ...EncryptionProvider) ([]byte, error) {
	return a.c.renderEncryptionConfig(a.c.Plugins[a.Index].Socket, providers)
}

func (c *Cluster) renderEncryptionConfig(socket string, providers []EncryptionProvider) ([]byte, error) {
	if len(providers) == 0 {
		return nil, fmt.Errorf("an EncryptionConfiguration needs at least one provider")
	}
	shipped, err := LoadShipped()
	if err != nil {
		return nil, err
	}
	rc := apiserverv1.ResourceConfiguration{Resources: append([]string(nil), c.Resources...)}
	for _, p := range providers {
		var pc apiserverv1.ProviderConfiguration
		switch {
		case p.kms != "":
			// The shipped entry (apiVersion, timeout), on this
			// cluster's socket and under the name the test asks for.
			kms := shipped.KMS
			kms.Name, kms.Endpoint = p.kms, "unix://"+socket
			pc.KMS = &kms
		case p.aescbc != "":
			secret, err := c.aescbcSecret(p.aescbc)
			if err != nil {
				return nil, err
			}
			pc.AESCBC = &apiserverv1.AESConfiguration{Keys: []apiserverv1.Key{{Name: p.aescbc, Secret: secret}}}
		case p.identity:
			pc.Identity = &apiserverv1.IdentityConfiguration{}
		default:
			return nil, fmt.Errorf("empty EncryptionProvider: build it with KMS, Identity or AESCBC")
		}
		rc.Providers = append(rc.Providers, pc)
	}
	cfg := apiserverv1.EncryptionConfiguration{
		TypeMeta:  metav1.TypeMeta{APIVersion: "apiserver.config.k8s.io/v1", Kind: "EncryptionConfiguration"},
		Resources: []apiserverv1.ResourceConfiguration{rc},
	}
	return yaml.Marshal(cfg)
}

// aescbcSecret returns the base64 32-byte secret of the aescbc key name,
// generating it on first use.
func (c *Cluster) aescbcSecret(name string) (string, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if s, ok := c.secrets[name]; ok {
		return s, nil
	}
	key := make([]byte, 32)
	if _, err := rand.Read(key); err != nil {
		return "", err
	}
	if c.secrets == nil {
		c.secrets = map[string]string{}
	}
	canary.Register("aescbc key "+name, key)
	c.secrets[name] = base64.StdEncoding.EncodeToString(key)
	return c.secrets[name], nil
}

// SetEncryptionConfig replaces the EncryptionConfiguration file the
// apiserver loads; it takes effect at the next Start or Restart.
func (a *APIServer) SetEncryptionConfig(config []byte) error {
	// Write and rename, so no reader ever sees half a file.
	tmp, err := os.CreateTemp(filepath.Dir(a.EncryptionConfig), ".encryption-config-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(config); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), a.EncryptionConfig)
}

// Reconfigure renders an EncryptionConfiguration from providers, installs
// it and restarts the apiserver, which is ready again when it returns.
func (a *APIServer) Reconfigure(ctx context.Context, providers ...EncryptionProvider) error {
	cfg, err := a.RenderEncryptionConfig(providers...)
	if err != nil {
		return err
	}
	if err := a.SetEncryptionConfig(cfg); err != nil {
		return err
	}
	a.c.logf("harness: restarting %s with providers %v", a.proc.name, providers)
	if err := a.Restart(ctx); err != nil {
		return fmt.Errorf("restart with providers %v: %w", providers, err)
	}
	return nil
}
