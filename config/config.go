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
	"regexp"
	"strconv"
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
	// (a name or a numeric gid from 0 to 4294967294), so an apiserver
	// running as another user in that group can connect; a socket folder
	// the plugin creates is then 0750 in that group, so the group can reach
	// the socket. Unset: 0600, owner only.
	SocketGroup string `json:"socketGroup,omitempty"`
	// AllowedPeers, when set, is who may use the socket, checked on every
	// connection with the credentials the kernel records for the
	// connecting process (SO_PEERCRED): a peer is served when its uid is in
	// uids or its gid is in gids; any other connection is closed before a
	// request is read, counted in kms_plugin_peers_refused_total and
	// logged once per uid. Unset: whoever the socket's file mode lets in.
	//
	//	allowedPeers:
	//	  uids: [0]       # kube-apiserver running as root
	//	  gids: [1001]    # or any process whose primary group is 1001
	AllowedPeers *Peers `json:"allowedPeers,omitempty"`
	// Health is an optional loopback address (127.0.0.1:PORT) serving
	// /healthz, /readyz and Prometheus /metrics.
	Health string `json:"health,omitempty"`
	// Metrics is an optional second listener serving only /metrics, for a
	// cluster Prometheus to scrape; see MetricsListener.
	Metrics *MetricsListener `json:"metrics,omitempty"`
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

// Peers lists the uids and gids allowed to connect to the socket. The gid
// is the connecting process's effective primary gid (the kernel does not
// report supplementary groups here). At least one id must be listed.
type Peers struct {
	// UIDs are user ids, 0 to 4294967294.
	UIDs []int64 `json:"uids,omitempty"`
	// GIDs are group ids, 0 to 4294967294.
	GIDs []int64 `json:"gids,omitempty"`
}

// MetricsListener is the optional metrics-only listener. It serves
// without authentication, so it binds loopback unless AllowRemote says
// otherwise:
//
//	metrics:
//	  address: 10.0.0.5:9788   # the node's internal IP; firewall the port
//	  allowRemote: true
type MetricsListener struct {
	// Address is HOST:PORT to listen on.
	Address string `json:"address"`
	// AllowRemote lets Address be other than loopback (an interface IP,
	// or ":PORT" for every interface). The metrics carry no key material
	// and name key_ids only by hash, but they show request rates, error
	// classes and provider names to whoever reaches the port.
	AllowRemote bool `json:"allowRemote,omitempty"`
}

// validate checks the listener: unset is fine; set, the address must
// parse, differ from the health address, and be loopback unless
// AllowRemote.
func (m *MetricsListener) validate(health string) error {
	if m == nil {
		return nil
	}
	if m.Address == "" {
		return errors.New("metrics.address: missing; set HOST:PORT, e.g. 127.0.0.1:9788, or remove metrics")
	}
	if _, _, err := net.SplitHostPort(m.Address); err != nil {
		return fmt.Errorf("metrics.address %q: want HOST:PORT, e.g. 127.0.0.1:9788: %v", m.Address, err)
	}
	if m.Address == health {
		return fmt.Errorf("metrics.address %q is the health address too; the health listener already serves /metrics, so pick another port or remove metrics", m.Address)
	}
	if m.AllowRemote {
		return nil
	}
	if err := CheckLoopback(m.Address); err != nil {
		return fmt.Errorf("metrics.address %w; or set metrics.allowRemote: true to serve it there (then firewall the port or bind the node's internal IP)", err)
	}
	return nil
}

// MaxSocketPath is the longest socket path Linux can bind: sun_path holds
// 108 bytes including the final NUL. (plugin.MaxSocketPath is the same
// limit, where the socket is made.)
const MaxSocketPath = 107

// MaxID is the largest uid or gid: 2^32-1 is (uid_t)-1, "no id".
const MaxID = 1<<32 - 2

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
	if err := requirePath(data, "socket"); err != nil {
		return nil, err
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
	case len(c.Socket) > MaxSocketPath:
		return fmt.Errorf("socket %q: %d bytes, over the %d-byte limit of a Unix socket path (sun_path is 108 bytes with the final NUL); choose a shorter path", c.Socket, len(c.Socket), MaxSocketPath)
	}
	if err := validGroup(c.SocketGroup); err != nil {
		return err
	}
	if err := c.AllowedPeers.validate(); err != nil {
		return err
	}
	if c.Health != "" {
		if err := CheckLoopback(c.Health); err != nil {
			return fmt.Errorf("health %w", err)
		}
	}
	if err := c.Metrics.validate(c.Health); err != nil {
		return err
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

// ErrNotLoopback is what CheckLoopback returns for an address other users
// of the network could reach.
var ErrNotLoopback = errors.New("must be a loopback address such as 127.0.0.1:PORT (the endpoint is unauthenticated)")

// CheckLoopback refuses a listen address that is not on loopback: the
// plugin's health endpoint and kmsctl's metrics serve without
// authentication. An empty host (":9090") binds every interface and is
// refused too. The error starts with the quoted address, for the caller to
// prefix with the field or flag name.
func CheckLoopback(addr string) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("%q: want 127.0.0.1:PORT: %v", addr, err)
	}
	if ip := net.ParseIP(host); host != "localhost" && (ip == nil || !ip.IsLoopback()) {
		return fmt.Errorf("%q: %w", addr, ErrNotLoopback)
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

// requirePath refuses a YAML number or boolean in a path field.
// sigs.k8s.io/yaml turns `socket: 123` into the string "123" for a string
// field, which would then resolve as a relative path and be served
// without a word.
func requirePath(data []byte, field string) error {
	var raw map[string]any
	if err := yaml.Unmarshal(data, &raw); err != nil {
		return nil //nolint:nilerr // the strict decode accepted it; its own errors are reported there
	}
	var kind string
	switch raw[field].(type) {
	case nil, string:
		return nil
	case bool:
		kind = "YAML boolean"
	case float64, int64, int:
		kind = "YAML number"
	default:
		kind = "YAML list or map"
	}
	return fmt.Errorf("%s: %v is a %s, not a path; write the absolute path of the Unix socket, e.g. %s: /run/kms-plugin/kms.sock", field, raw[field], kind, field)
}

// groupName is what a group name may look like (as useradd allows).
var groupName = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9._-]*\$?$`)

// validGroup checks socketGroup's form: a gid in range, or a plausible
// name. Whether the name exists is checked where the socket is made, as
// kmsctl reads this file on machines without that group.
func validGroup(g string) error {
	if g == "" {
		return nil
	}
	if n, err := strconv.ParseInt(g, 10, 64); err == nil || isNumeric(g) {
		if err != nil || n < 0 || n > MaxID {
			return fmt.Errorf("socketGroup %q: want a group name or a gid from 0 to %d", g, int64(MaxID))
		}
		return nil
	}
	if !groupName.MatchString(g) {
		return fmt.Errorf("socketGroup %q: not a group name or gid; want a name such as kms or a gid from 0 to %d", g, int64(MaxID))
	}
	return nil
}

// isNumeric reports whether s is an optionally signed run of digits.
func isNumeric(s string) bool {
	s = strings.TrimPrefix(s, "-")
	return s != "" && strings.Trim(s, "0123456789") == ""
}

// validate checks allowedPeers: unset is fine; set, it must list an id
// (an empty rule would refuse every connection, the apiserver's too), and
// every id must be in range.
func (p *Peers) validate() error {
	if p == nil {
		return nil
	}
	if len(p.UIDs) == 0 && len(p.GIDs) == 0 {
		return errors.New("allowedPeers: lists no uid or gid, which would refuse every connection; list the apiserver's uid (uids: [0] when it runs as root) or remove allowedPeers")
	}
	for field, ids := range map[string][]int64{"uids": p.UIDs, "gids": p.GIDs} {
		for i, id := range ids {
			if id < 0 || id > MaxID {
				return fmt.Errorf("allowedPeers.%s[%d] %d: want an id from 0 to %d", field, i, id, int64(MaxID))
			}
		}
	}
	return nil
}
