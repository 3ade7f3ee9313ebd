package rotation

import (
	"fmt"
	"os"
	"strings"

	apiserverv1 "k8s.io/apiserver/pkg/apis/apiserver/v1"
	"sigs.k8s.io/yaml"

	"github.com/kms-v2/kms-plugin/rotation/etcdlayout"
)

// EncryptionConfig is what kmsctl needs from the apiserver's
// EncryptionConfiguration: which resources it lists and which provider
// writes each. It keeps no key material: aescbc/aesgcm/secretbox secrets are
// dropped on load.
type EncryptionConfig struct {
	// Path is the file it was read from, for messages.
	Path    string
	entries []configEntry
}

// configEntry is one `resources:` block: its resource names and the writer
// its first provider makes (KeyID empty: the plugin's Status supplies it).
type configEntry struct {
	resources []string
	writer    etcdlayout.Writer
}

// LoadEncryptionConfig reads an EncryptionConfiguration file strictly.
func LoadEncryptionConfig(path string) (*EncryptionConfig, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("--encryption-config: %w", err)
	}
	var cfg apiserverv1.EncryptionConfiguration
	if err := yaml.UnmarshalStrict(b, &cfg); err != nil {
		return nil, fmt.Errorf("--encryption-config %s: not an EncryptionConfiguration: %w", path, err)
	}
	if cfg.Kind != "EncryptionConfiguration" {
		return nil, fmt.Errorf("--encryption-config %s: kind %q, want EncryptionConfiguration (the file given to kube-apiserver --encryption-provider-config)", path, cfg.Kind)
	}
	out := &EncryptionConfig{Path: path}
	for i, rc := range cfg.Resources {
		if len(rc.Providers) == 0 {
			return nil, fmt.Errorf("--encryption-config %s: resources[%d] has no providers", path, i)
		}
		w, err := writerOfProvider(rc.Providers[0])
		if err != nil {
			return nil, fmt.Errorf("--encryption-config %s: resources[%d]: %w", path, i, err)
		}
		out.entries = append(out.entries, configEntry{resources: rc.Resources, writer: w})
	}
	return out, nil
}

// writerOfProvider is the writer a provider stanza makes; the value prefix
// of aescbc, aesgcm and secretbox names their first key.
func writerOfProvider(p apiserverv1.ProviderConfiguration) (etcdlayout.Writer, error) {
	other := func(kind string, keys []apiserverv1.Key) (etcdlayout.Writer, error) {
		if len(keys) == 0 {
			return etcdlayout.Writer{}, fmt.Errorf("%s provider without keys", kind)
		}
		return etcdlayout.Writer{Encoding: etcdlayout.EncodingOther, Kind: kind, Provider: keys[0].Name}, nil
	}
	switch {
	case p.KMS != nil && p.KMS.APIVersion == "v2":
		return etcdlayout.KMSv2Writer(p.KMS.Name, ""), nil
	case p.KMS != nil:
		return etcdlayout.Writer{Encoding: etcdlayout.EncodingOther, Kind: "kms:v1", Provider: p.KMS.Name}, nil
	case p.AESCBC != nil:
		return other("aescbc:v1", p.AESCBC.Keys)
	case p.AESGCM != nil:
		return other("aesgcm:v1", p.AESGCM.Keys)
	case p.Secretbox != nil:
		return other("secretbox:v1", p.Secretbox.Keys)
	case p.Identity != nil:
		return etcdlayout.Writer{Encoding: etcdlayout.EncodingPlain}, nil
	}
	return etcdlayout.Writer{}, fmt.Errorf("a provider with no known type")
}

// WriterFor returns the writer of r as the apiserver picks it: the first
// `resources:` block whose list matches, exactly or by wildcard. A
// resource no block lists is stored in plaintext.
func (c *EncryptionConfig) WriterFor(r Resource) etcdlayout.Writer {
	name := r.configName()
	group := r.GVR.Group
	for _, e := range c.entries {
		for _, s := range e.resources {
			if s == name || s == "*.*" || s == "*."+group || (group == "" && s == name+".") {
				return e.writer
			}
		}
	}
	return etcdlayout.Writer{Encoding: etcdlayout.EncodingPlain}
}

// Resources lists the resources the file encrypts, in flag spelling. A
// wildcard, or a resource of another group (whose API version the file
// does not say), cannot be listed: the error names it and asks for
// --resources.
func (c *EncryptionConfig) Resources() ([]string, error) {
	var out []string
	for _, e := range c.entries {
		if e.writer.Encoding == etcdlayout.EncodingPlain {
			continue
		}
		for _, s := range e.resources {
			switch {
			case strings.HasPrefix(s, "*"):
				return nil, fmt.Errorf("--encryption-config %s encrypts %q, a wildcard kmsctl cannot enumerate: name the resources with --resources", c.Path, s)
			case coreResources[strings.TrimSuffix(s, ".")]:
				out = append(out, strings.TrimSuffix(s, "."))
			default:
				res, group, _ := strings.Cut(s, ".")
				return nil, fmt.Errorf("--encryption-config %s encrypts %q: name it with its API version in --resources (%s.<version>.%s)", c.Path, s, res, group)
			}
		}
	}
	return out, nil
}
