// Package config holds the schema of the kms-plugin configuration file and
// loads it: strict YAML (an unknown field is an error naming it), relative
// paths resolved against the file's folder, defaults applied, and every field
// validated before anything starts. kms-plugin and kmsctl read the same file,
// so both always agree on which backend and key they manage.
package config

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/kms-v2/kms-plugin/providers/azurekv"
	"github.com/kms-v2/kms-plugin/providers/file"
	"github.com/kms-v2/kms-plugin/providers/pkcs11"
)

// Defaults for optional fields.
const (
	DefaultCheckInterval   = 10 * time.Second
	DefaultRefreshInterval = 5 * time.Second
	DefaultMaxStaleness    = 30 * time.Second
)

// Config is the whole configuration file.
type Config struct {
	// Socket is the absolute path of the Unix socket to serve KMS v2 on, as
	// named in the EncryptionConfiguration (unix://<socket>).
	Socket string `json:"socket"`
	// SocketGroup, when set, makes the socket 0660 and owned by this group
	// (a name or a numeric gid), so an apiserver running as another user in
	// that group can connect. Unset: 0600, owner only.
	SocketGroup string `json:"socketGroup,omitempty"`
	// Health is an optional loopback address (127.0.0.1:PORT) serving
	// /healthz, /readyz and Prometheus /metrics.
	Health string `json:"health,omitempty"`
	// CheckInterval is how often the provider's backend is probed in the
	// background; Status reports the last result.
	CheckInterval Duration `json:"checkInterval,omitempty"`
	// RefreshInterval is how often key state (versions, primary) is reloaded
	// from the backend, so a promote made by kmsctl reaches every plugin.
	RefreshInterval Duration `json:"refreshInterval,omitempty"`
	// MaxStaleness is how old the last successful check may be before
	// Status reports unhealthy.
	MaxStaleness Duration `json:"maxStaleness,omitempty"`
	// Log configures logging.
	Log Log `json:"log,omitempty"`
	// Provider selects exactly one key backend.
	Provider Provider `json:"provider"`
}

// Log configures the plugin's structured logs.
type Log struct {
	// Level is trace, debug, info (default), warn or error.
	Level string `json:"level,omitempty"`
	// Format is text (default) or json.
	Format string `json:"format,omitempty"`
}

// Provider holds one backend's section; exactly one must be set.
type Provider struct {
	// File is a local Tink keyset file.
	File *file.Config `json:"file,omitempty"`
	// PKCS11 is a key in a PKCS#11 token (an HSM, or SoftHSM2 in tests).
	PKCS11 *pkcs11.Config `json:"pkcs11,omitempty"`
	// AzureKeyVault is a key in Azure Key Vault or Managed HSM.
	AzureKeyVault *azurekv.Config `json:"azureKeyVault,omitempty"`
}

// backendConfig is what every backend's Config offers for loading.
type backendConfig interface {
	ResolvePaths(dir string)
	Validate() error
}

// section is one backend's place in the schema.
type section struct {
	name string
	set  bool
	cfg  backendConfig
}

// sections lists every compiled-in backend by its YAML name: the one place
// a new backend joins the config schema.
func (p Provider) sections() []section {
	return []section{
		{"file", p.File != nil, p.File},
		{"pkcs11", p.PKCS11 != nil, p.PKCS11},
		{"azureKeyVault", p.AzureKeyVault != nil, p.AzureKeyVault},
	}
}

// Backend returns the name and config of the one selected backend.
func (p Provider) Backend() (string, backendConfig, error) {
	var set, known []string
	var chosen section
	for _, s := range p.sections() {
		known = append(known, s.name)
		if s.set {
			set = append(set, s.name)
			chosen = s
		}
	}
	switch len(set) {
	case 0:
		return "", nil, fmt.Errorf("provider: no backend configured; set one of %s", strings.Join(known, ", "))
	case 1:
		return chosen.name, chosen.cfg, nil
	}
	return "", nil, fmt.Errorf("provider: %d backends configured (%s); set exactly one", len(set), strings.Join(set, ", "))
}

// Load reads, parses and validates the configuration file at path.
func Load(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	c, err := Parse(data, filepath.Dir(abs))
	if err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	return c, nil
}

// Parse parses configuration bytes; relative paths resolve against dir.
func Parse(data []byte, dir string) (*Config, error) {
	var c Config
	if err := yaml.UnmarshalStrict(data, &c); err != nil {
		// Drop the decoder's layered prefixes; keep what names the problem.
		msg := oneLine(err.Error())
		for _, p := range []string{"error unmarshaling JSON: ", "while decoding JSON: ", "json: "} {
			msg = strings.TrimPrefix(msg, p)
		}
		return nil, errors.New(msg)
	}
	if c.Socket != "" && !strings.HasPrefix(c.Socket, "@") && !filepath.IsAbs(c.Socket) {
		c.Socket = filepath.Join(dir, c.Socket)
	}
	if _, b, err := c.Provider.Backend(); err == nil {
		b.ResolvePaths(dir)
	}
	c.applyDefaults()
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return &c, nil
}

func (c *Config) applyDefaults() {
	if c.CheckInterval == 0 {
		c.CheckInterval = Duration(DefaultCheckInterval)
	}
	if c.RefreshInterval == 0 {
		c.RefreshInterval = Duration(DefaultRefreshInterval)
	}
	if c.MaxStaleness == 0 {
		c.MaxStaleness = Duration(DefaultMaxStaleness)
	}
	if c.Log.Level == "" {
		c.Log.Level = "info"
	}
	if c.Log.Format == "" {
		c.Log.Format = "text"
	}
}

// Validate checks every field and returns the first problem, naming the
// field and the fix.
func (c *Config) Validate() error {
	switch {
	case c.Socket == "":
		return errors.New("socket: missing; set the absolute path of the Unix socket, e.g. /run/kms-plugin/kms.sock")
	case strings.HasPrefix(c.Socket, "@"):
		return fmt.Errorf("socket %q: abstract sockets have no file permissions and are refused; use a filesystem path", c.Socket)
	}
	if c.Health != "" {
		host, _, err := net.SplitHostPort(c.Health)
		if err != nil {
			return fmt.Errorf("health %q: want 127.0.0.1:PORT: %v", c.Health, err)
		}
		if ip := net.ParseIP(host); host != "localhost" && (ip == nil || !ip.IsLoopback()) {
			return fmt.Errorf("health %q: must be a loopback address such as 127.0.0.1:PORT (the endpoint is unauthenticated)", c.Health)
		}
	}
	for name, d := range map[string]Duration{"checkInterval": c.CheckInterval, "refreshInterval": c.RefreshInterval, "maxStaleness": c.MaxStaleness} {
		if d < Duration(100*time.Millisecond) {
			return fmt.Errorf("%s %s: must be at least 100ms", name, d)
		}
	}
	if c.MaxStaleness < c.CheckInterval {
		return fmt.Errorf("maxStaleness %s is shorter than checkInterval %s; health would flap, make it at least checkInterval", c.MaxStaleness, c.CheckInterval)
	}
	switch c.Log.Level {
	case "trace", "debug", "info", "warn", "error":
	default:
		return fmt.Errorf("log.level %q: want trace, debug, info, warn or error", c.Log.Level)
	}
	switch c.Log.Format {
	case "text", "json":
	default:
		return fmt.Errorf("log.format %q: want text or json", c.Log.Format)
	}
	name, b, err := c.Provider.Backend()
	if err != nil {
		return err
	}
	if err := b.Validate(); err != nil {
		return fmt.Errorf("provider.%s: %w", name, err)
	}
	return nil
}

// oneLine folds a multi-line parser error into one line.
func oneLine(s string) string {
	return strings.Join(strings.Fields(strings.ReplaceAll(s, "\n", " ")), " ")
}

// Duration is a time.Duration written in YAML as a Go duration string
// ("10s", "1m30s").
type Duration time.Duration

// String formats d like time.Duration.
func (d Duration) String() string { return time.Duration(d).String() }

// MarshalJSON writes d as a duration string.
func (d Duration) MarshalJSON() ([]byte, error) { return []byte(`"` + d.String() + `"`), nil }

// UnmarshalJSON reads a duration string such as "10s".
func (d *Duration) UnmarshalJSON(b []byte) error {
	s := strings.Trim(string(b), `"`)
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("duration %s: want a value such as 10s or 1m", b)
	}
	*d = Duration(v)
	return nil
}
