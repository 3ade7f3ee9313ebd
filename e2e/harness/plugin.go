package harness

import (
	"context"
	"fmt"
	"io"
	"maps"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"sigs.k8s.io/yaml"
)

// maxSocketPath is the longest path a Unix socket address holds (108 bytes
// with the terminating NUL on Linux).
const maxSocketPath = 107

// Plugin is one kms-plugin process serving one apiserver.
type Plugin struct {
	// Index matches the APIServers entry this plugin serves.
	Index int
	// Socket is the Unix socket the apiserver dials (unix://<Socket>).
	Socket string
	// ConfigPath is the plugin's config file; kmsctl accepts it too.
	ConfigPath string
	// HealthURL is http://127.0.0.1:PORT, serving /healthz, /readyz and
	// /metrics.
	HealthURL string

	c    *Cluster
	proc *process
}

// newPlugin writes plugin i's config file; Start runs it.
func (c *Cluster) newPlugin(i int) (*Plugin, error) {
	dir := filepath.Join(c.Dir, fmt.Sprintf("p%d", i))
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	socket := filepath.Join(dir, "kms.sock")
	if len(socket) > maxSocketPath {
		return nil, fmt.Errorf("socket path %s is %d bytes, over the %d a Unix socket allows; set TMPDIR to a shorter folder", socket, len(socket), maxSocketPath)
	}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	p := &Plugin{
		Index:      i,
		Socket:     socket,
		ConfigPath: filepath.Join(dir, "kms-plugin.yaml"),
		HealthURL:  fmt.Sprintf("http://127.0.0.1:%d", port),
		c:          c,
	}
	cfg, err := c.pluginConfig(p)
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(p.ConfigPath, cfg, 0o600); err != nil {
		return nil, err
	}
	p.proc = &process{
		name:    fmt.Sprintf("kms-plugin-%d", i),
		path:    c.bins.plugin,
		args:    []string{"serve", "--config", p.ConfigPath},
		env:     c.opts.Env,
		logPath: filepath.Join(c.logDir(), fmt.Sprintf("kms-plugin-%d.log", i)),
	}
	c.onClose(func() error {
		err := p.proc.stop()
		if raceEnabled && p.proc.logContains("WARNING: DATA RACE") {
			err = fmt.Errorf("%s: the race detector found a data race; see %s", p.proc.name, p.proc.logPath)
		}
		return err
	})
	return p, nil
}

// pluginConfig renders plugin p's config: manifests/plugin-config.yaml with
// this machine's socket, health address and keyset, plus fast refresh and
// checks so a promote reaches every instance within a second or two, debug
// logs, and the shared provider section.
func (c *Cluster) pluginConfig(p *Plugin) ([]byte, error) {
	shipped, err := LoadShipped()
	if err != nil {
		return nil, err
	}
	provider := map[string]any{"file": map[string]any{"path": c.KeysetPath()}}
	if c.opts.ProviderYAML != "" {
		provider = map[string]any{}
		if err := yaml.Unmarshal([]byte(c.opts.ProviderYAML), &provider); err != nil {
			return nil, fmt.Errorf("Options.ProviderYAML: %w", err)
		}
	}
	cfg := maps.Clone(shipped.Plugin)
	maps.Copy(cfg, map[string]any{
		"socket":          p.Socket,
		"health":          p.HealthURL[len("http://"):],
		"refreshInterval": "1s",
		"checkInterval":   "1s",
		"maxStaleness":    "5s",
		"log":             map[string]any{"level": "debug", "format": "text"},
		"provider":        provider,
	})
	maps.Copy(cfg, c.opts.PluginSettings)
	return yaml.Marshal(cfg)
}

// Configure rewrites the plugin's config file: edit gets the config as a
// map (socket, health, provider, ...) and changes it. Restart applies it.
func (p *Plugin) Configure(edit func(cfg map[string]any)) error {
	b, err := os.ReadFile(p.ConfigPath)
	if err != nil {
		return err
	}
	cfg := map[string]any{}
	if err := yaml.Unmarshal(b, &cfg); err != nil {
		return fmt.Errorf("%s: %w", p.ConfigPath, err)
	}
	edit(cfg)
	out, err := yaml.Marshal(cfg)
	if err != nil {
		return err
	}
	return os.WriteFile(p.ConfigPath, out, 0o600)
}

// SetProviders rewrites the plugin's config with a providers: list in
// place of provider:, each entry given as YAML (e.g. "name: old\nfile:
// {path: /k.json}"). The first encrypts. Restart applies it.
func (p *Plugin) SetProviders(entries ...string) error {
	var list []any
	for _, e := range entries {
		m := map[string]any{}
		if err := yaml.Unmarshal([]byte(e), &m); err != nil {
			return fmt.Errorf("provider entry %q: %w", e, err)
		}
		list = append(list, m)
	}
	return p.Configure(func(cfg map[string]any) {
		delete(cfg, "provider")
		cfg["providers"] = list
	})
}

// KeysetPath is the file keyset every plugin shares when Options.ProviderYAML
// is empty.
func (c *Cluster) KeysetPath() string { return filepath.Join(c.SharedDir, "keyset.json") }

// Start runs the plugin and waits until its socket exists and /healthz
// answers 200 (at most Options.StartTimeout when ctx has no deadline).
func (p *Plugin) Start(ctx context.Context) error {
	ctx, cancel := p.c.startContext(ctx)
	defer cancel()
	if err := p.proc.start(); err != nil {
		return err
	}
	err := Poll(ctx, 50*time.Millisecond, func() error {
		if done, werr := p.proc.exited(); done {
			return StopPolling(fmt.Errorf("exited: %v", werr))
		}
		st, err := os.Stat(p.Socket)
		if err != nil {
			return err
		}
		if st.Mode()&os.ModeSocket == 0 {
			return fmt.Errorf("%s is not a socket", p.Socket)
		}
		resp, err := http.Get(p.HealthURL + "/healthz")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("/healthz: %s", resp.Status)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("%s not serving: %w\n%s", p.proc.name, err, p.proc.tail(30))
	}
	return nil
}

// Stop sends SIGTERM and waits for the plugin to exit. It fails if the
// plugin had died on its own or ignored SIGTERM.
func (p *Plugin) Stop() error { return p.proc.stop() }

// Restart stops and starts the plugin with the same config and socket.
func (p *Plugin) Restart(ctx context.Context) error {
	if err := p.Stop(); err != nil {
		return err
	}
	return p.Start(ctx)
}

// Kill ends the plugin with SIGKILL and waits until it is gone. Its socket
// file stays behind, as after a crash; Start serves again.
func (p *Plugin) Kill() error { return p.proc.kill() }

// Readyz asks the plugin's /readyz once, bounded by ctx and 2 s, and
// returns the status code and the first line of the answer; a plugin that
// does not answer at all is an error.
func (p *Plugin) Readyz(ctx context.Context) (int, string, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, p.HealthURL+"/readyz", nil)
	if err != nil {
		return 0, "", err
	}
	resp, err := healthClient.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 4<<10))
	line, _, _ := strings.Cut(strings.TrimSpace(string(body)), "\n")
	return resp.StatusCode, line, err
}

// healthClient asks plugins' health endpoints without keeping connections
// open across a plugin restart.
var healthClient = &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}

// Running reports whether the plugin process is alive.
func (p *Plugin) Running() bool { return p.proc.running() }

// LogTail returns the last n lines of the plugin's log.
func (p *Plugin) LogTail(n int) string { return p.proc.tail(n) }

// Metrics scrapes the plugin's Prometheus endpoint.
func (p *Plugin) Metrics(ctx context.Context) (Metrics, error) {
	return scrape(ctx, http.DefaultClient, p.HealthURL+"/metrics", "")
}

// PluginMetrics scrapes plugin i's Prometheus endpoint.
func (c *Cluster) PluginMetrics(ctx context.Context, i int) (Metrics, error) {
	return c.Plugins[i].Metrics(ctx)
}
