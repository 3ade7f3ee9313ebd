// Package config holds the schema of the kms-plugin configuration file and
// loads it: strict YAML (an unknown field is an error naming it), relative
// paths resolved against the file's folder, defaults applied, and every field
// validated before anything starts. kms-plugin and kmsctl read the same file,
// so both always agree on which backend and key they manage.
package config

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/kms-v2/kms-plugin/providers"
)

// Defaults for optional fields.
const (
	// DefaultCheckInterval is 5 s so an outage shows on the plugin's
	// /readyz (and in Status) within 10 s even when the failing check
	// itself runs into its 5 s timeout: interval + check timeout.
	DefaultCheckInterval   = 5 * time.Second
	DefaultRefreshInterval = 5 * time.Second
	DefaultMaxStaleness    = 30 * time.Second
)

// MaxFileSize is the largest configuration file Load accepts: a real one
// is a few hundred bytes, and a path that names something else (a log, a
// device, a FIFO that never ends) must fail with a clear line rather than
// be read into memory whole.
const MaxFileSize = 1 << 20

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
	// Providers are the key providers in order: the first encrypts (its
	// primary is Status's key_id), the others only decrypt, which is how
	// a cluster moves from one backend to another without a second plugin.
	// Parse leaves the resolved list here, whichever form the file used.
	Providers []Entry `json:"providers,omitempty"`
	// Provider is the one-entry shorthand of Providers.
	Provider *Entry `json:"provider,omitempty"`

	// shorthand: the file used provider:, so errors say so.
	shorthand bool
}

// Log configures the plugin's structured logs.
type Log struct {
	// Level is trace, debug, info (default), warn or error.
	Level string `json:"level,omitempty"`
	// Format is text (default) or json.
	Format string `json:"format,omitempty"`
}

// Load reads, parses and validates the configuration file at path; kinds
// are the backends compiled into the binary.
func Load(path string, kinds providers.Kinds) (*Config, error) {
	data, err := readFile(path)
	if err != nil {
		return nil, err
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	c, err := Parse(data, filepath.Dir(abs), kinds)
	if err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	return c, nil
}

// readFile reads path through io.LimitReader, at most MaxFileSize+1 bytes,
// so a file over the limit is refused without being read whole, whatever
// it is.
func readFile(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	tooBig := func(size string) error {
		return fmt.Errorf("config %s: %s, over the %d-byte (1 MiB) limit; is this the plugin's configuration file?", path, size, MaxFileSize)
	}
	if fi.Mode().IsRegular() && fi.Size() > MaxFileSize {
		return nil, tooBig(fmt.Sprintf("%d bytes", fi.Size()))
	}
	data, err := io.ReadAll(io.LimitReader(f, MaxFileSize+1))
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	if len(data) > MaxFileSize { // not a regular file, or one that grew
		return nil, tooBig(fmt.Sprintf("more than %d bytes", MaxFileSize))
	}
	return data, nil
}

// Parse parses configuration bytes; relative paths resolve against dir,
// and each provider entry's section is decoded with its kind from kinds.
func Parse(data []byte, dir string, kinds providers.Kinds) (*Config, error) {
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
	if err := c.resolveEntries(kinds, dir); err != nil {
		return nil, err
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
	return c.validateEntries()
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
