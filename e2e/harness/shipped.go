package harness

import (
	"fmt"
	"os"
	"path/filepath"
	"sync"

	apiserverv1 "k8s.io/apiserver/pkg/apis/apiserver/v1"
	"sigs.k8s.io/yaml"
)

// The control planes the tests start are configured from the files users
// install, so a test can only pass with what the manifests ship: the KMS
// entry (apiVersion, name, timeout) and the resource list come from
// manifests/encryption-config.yaml, and each plugin's config starts from
// manifests/plugin-config.yaml. The harness changes only what must differ
// on a test machine (socket and health addresses, the keyset path) and the
// timings its Options name.
const (
	shippedEncryptionConfig = "manifests/encryption-config.yaml"
	shippedPluginConfig     = "manifests/plugin-config.yaml"
)

// Shipped is what the harness takes from the shipped files.
type Shipped struct {
	// KMS is the EncryptionConfiguration's KMS v2 entry.
	KMS apiserverv1.KMSConfiguration
	// Resources are the resources the EncryptionConfiguration encrypts.
	Resources []string
	// Plugin is the plugin config, as a YAML map.
	Plugin map[string]any
}

var (
	shippedOnce sync.Once
	shipped     Shipped
	shippedErr  error
)

// LoadShipped reads and checks the shipped files once per process. A
// missing or changed-shape file is an error, not a silent fallback to the
// harness's own settings.
func LoadShipped() (Shipped, error) {
	shippedOnce.Do(func() { shipped, shippedErr = loadShipped() })
	return shipped, shippedErr
}

func loadShipped() (Shipped, error) {
	root, err := RepoRoot()
	if err != nil {
		return Shipped{}, err
	}
	var s Shipped
	if s.KMS, s.Resources, err = readShippedEncryption(filepath.Join(root, shippedEncryptionConfig)); err != nil {
		return Shipped{}, err
	}
	b, err := os.ReadFile(filepath.Join(root, shippedPluginConfig))
	if err != nil {
		return Shipped{}, err
	}
	if err := yaml.Unmarshal(b, &s.Plugin); err != nil || s.Plugin == nil {
		return Shipped{}, fmt.Errorf("%s: not a YAML map: %v", shippedPluginConfig, err)
	}
	return s, nil
}

// readShippedEncryption returns the first resource group's KMS v2 entry
// and resources; the shipped file has one group, KMS first.
func readShippedEncryption(path string) (apiserverv1.KMSConfiguration, []string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return apiserverv1.KMSConfiguration{}, nil, err
	}
	var cfg apiserverv1.EncryptionConfiguration
	if err := yaml.UnmarshalStrict(b, &cfg); err != nil {
		return apiserverv1.KMSConfiguration{}, nil, fmt.Errorf("%s: %w", shippedEncryptionConfig, err)
	}
	if len(cfg.Resources) == 0 || len(cfg.Resources[0].Providers) == 0 || cfg.Resources[0].Providers[0].KMS == nil {
		return apiserverv1.KMSConfiguration{}, nil, fmt.Errorf("%s: the first resource group's first provider is not kms", shippedEncryptionConfig)
	}
	kms := *cfg.Resources[0].Providers[0].KMS
	if kms.APIVersion != "v2" || kms.Timeout == nil {
		return apiserverv1.KMSConfiguration{}, nil, fmt.Errorf("%s: the kms provider must be apiVersion v2 with a timeout", shippedEncryptionConfig)
	}
	return kms, cfg.Resources[0].Resources, nil
}
