package harness

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/kms-v2/kms-plugin/internal/leakcanary"
)

// The leak canary: every secret a test hands the control plane is
// registered (the values of Secrets and ConfigMaps written through the
// harness's clients, the aescbc keys, the keyset's key material, the
// contents of the PIN and client-secret files the plugins are configured
// with, the admin token), and Close searches every log the cluster's
// processes wrote, kmsctl's output and the metrics scraped for them, raw,
// hex and base64. A hit fails the test that owns the cluster.
var canary = leakcanary.Default

// Canary is the leak canary, for tests to register secrets of their own.
func Canary() *leakcanary.Canary { return canary }

// canaryHits are hits found in output scanned as it came (scrapes), which
// no file keeps.
var canaryHits struct {
	sync.Mutex
	list []string
}

// canaryScan searches output that is not kept in a log file now.
func canaryScan(what string, out []byte) {
	hits := canary.Scan(out)
	if len(hits) == 0 {
		return
	}
	canaryHits.Lock()
	defer canaryHits.Unlock()
	for _, h := range hits {
		canaryHits.list = append(canaryHits.list, fmt.Sprintf("%s: %v", what, h))
	}
}

// canaryTransport registers the values of every Secret and ConfigMap a
// test writes through the harness's clients (JSON bodies).
type canaryTransport struct{ rt http.RoundTripper }

func wrapCanary(rt http.RoundTripper) http.RoundTripper { return canaryTransport{rt} }

func (t canaryTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	isSecret := strings.Contains(req.URL.Path, "/secrets")
	if (isSecret || strings.Contains(req.URL.Path, "/configmaps")) && req.Body != nil && req.Method != http.MethodGet {
		body, err := io.ReadAll(req.Body)
		_ = req.Body.Close()
		if err != nil {
			return nil, err
		}
		registerObject(req.URL.Path, isSecret, body)
		req = req.Clone(req.Context())
		req.Body = io.NopCloser(bytes.NewReader(body))
		req.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(body)), nil }
	}
	return t.rt.RoundTrip(req)
}

func registerObject(path string, isSecret bool, body []byte) {
	var obj struct {
		Data       map[string]string `json:"data"`
		StringData map[string]string `json:"stringData"`
		BinaryData map[string]string `json:"binaryData"`
	}
	if json.Unmarshal(body, &obj) != nil {
		return
	}
	for k, v := range obj.Data {
		if isSecret { // []byte values travel as base64
			if raw, err := base64.StdEncoding.DecodeString(v); err == nil {
				canary.Register(fmt.Sprintf("%s data %s", path, k), raw)
			}
			continue
		}
		canary.RegisterString(fmt.Sprintf("%s data %s", path, k), v)
	}
	for k, v := range obj.StringData {
		canary.RegisterString(fmt.Sprintf("%s stringData %s", path, k), v)
	}
	for k, v := range obj.BinaryData {
		if raw, err := base64.StdEncoding.DecodeString(v); err == nil {
			canary.Register(fmt.Sprintf("%s binaryData %s", path, k), raw)
		}
	}
}

// saveMetrics scrapes every running plugin and apiserver once more into the
// log folder, where checkLeaks searches them.
func (c *Cluster) saveMetrics() error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, p := range c.Plugins {
		if !p.proc.running() {
			continue
		}
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, p.HealthURL+"/metrics", nil)
		if err != nil {
			continue
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			continue
		}
		body, _ := io.ReadAll(resp.Body)
		_ = resp.Body.Close()
		_ = os.WriteFile(filepath.Join(c.logDir(), fmt.Sprintf("metrics-%s.txt", p.proc.name)), body, 0o600)
	}
	for _, a := range c.APIServers {
		if !a.Running() {
			continue
		}
		if _, body, err := a.Get(ctx, "/metrics"); err == nil {
			_ = os.WriteFile(filepath.Join(c.logDir(), fmt.Sprintf("metrics-%s.txt", a.proc.name)), []byte(body), 0o600)
		}
	}
	return nil
}

// registerConfigSecrets registers what the plugins' configs point at: the
// keyset's key material and the contents of every *File (PIN files,
// client-secret files).
func (c *Cluster) registerConfigSecrets() error {
	var errs []error
	for _, p := range c.Plugins {
		data, err := os.ReadFile(p.ConfigPath)
		if err != nil {
			continue // never written: nothing ran with it
		}
		var cfg any
		if err := yaml.Unmarshal(data, &cfg); err != nil {
			errs = append(errs, fmt.Errorf("leak canary: %s: %w", p.ConfigPath, err))
			continue
		}
		walkConfig(cfg, "", func(parent, key, value string) {
			if !filepath.IsAbs(value) {
				value = filepath.Join(filepath.Dir(p.ConfigPath), value)
			}
			switch {
			case parent == "file" && key == "path":
				if ks, err := os.ReadFile(value); err == nil {
					if _, err := canary.RegisterKeyset("keyset "+filepath.Base(value), ks); err != nil {
						errs = append(errs, fmt.Errorf("leak canary: %s: %w", value, err))
					}
				}
			case strings.HasSuffix(key, "File"):
				if s, err := os.ReadFile(value); err == nil {
					canary.Register(key+" "+filepath.Base(value), bytes.TrimSpace(s))
				}
			}
		})
	}
	return errors.Join(errs...)
}

// walkConfig calls fn for every string value in a parsed YAML document,
// with its key and the key of the map holding it.
func walkConfig(v any, parent string, fn func(parent, key, value string)) {
	switch v := v.(type) {
	case map[string]any:
		for k, x := range v {
			if s, ok := x.(string); ok {
				fn(parent, k, s)
				continue
			}
			walkConfig(x, k, fn)
		}
	case []any:
		for _, x := range v {
			walkConfig(x, parent, fn)
		}
	}
}

// checkLeaks searches the cluster's log folder (every process's log,
// kmsctl's output, the last metrics) for the registered secrets, and
// reports hits (file and line, never the secret) with those found earlier in
// scraped metrics.
func (c *Cluster) checkLeaks() error {
	canary.RegisterString("apiserver admin token", c.Token)
	if c.RotationToken != "" {
		canary.RegisterString("rotation ServiceAccount token", c.RotationToken)
	}
	regErr := c.registerConfigSecrets()
	var found []string
	scanned := 0
	files, _ := filepath.Glob(filepath.Join(c.logDir(), "*"))
	sort.Strings(files)
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		scanned += len(data)
		for _, h := range canary.Scan(data) {
			line := 1 + bytes.Count(data[:h.Offset], []byte("\n"))
			found = append(found, fmt.Sprintf("%s:%d: %s (%s)", f, line, h.Label, h.Encoding))
		}
	}
	canaryHits.Lock()
	found = append(found, canaryHits.list...)
	canaryHits.list = nil
	canaryHits.Unlock()
	c.logf("harness: leak canary: %d secrets searched for in %d bytes of logs, kmsctl output and metrics (%d files): %d hits",
		canary.Len(), scanned, len(files), len(found))
	if len(found) > 0 {
		var b strings.Builder
		w := bufio.NewWriter(&b)
		fmt.Fprintf(w, "leak canary: %d secrets found in the control plane's output:\n", len(found))
		for _, f := range found {
			fmt.Fprintf(w, "  %s\n", f)
		}
		_ = w.Flush()
		return errors.Join(regErr, errors.New(b.String()))
	}
	return regErr
}

// kmsctlLog appends one kmsctl run's output to the log folder.
func (c *Cluster) kmsctlLog(args []string, stdout, stderr []byte) {
	f, err := os.OpenFile(filepath.Join(c.logDir(), "kmsctl.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return
	}
	defer f.Close()
	fmt.Fprintf(f, "=== kmsctl %s\n%s%s", strings.Join(args, " "), stdout, stderr)
}

// registerKeyFiles registers the private key in each PEM file: no log or
// report may show it.
func registerKeyFiles(paths []string) error {
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		block, _ := pem.Decode(b)
		if block == nil {
			return fmt.Errorf("leak canary: %s holds no PEM block", p)
		}
		canary.Register("private key "+filepath.Base(p), block.Bytes)
	}
	return nil
}
