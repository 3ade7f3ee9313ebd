package harness

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"
	kmstypes "k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2/v2"
	"sigs.k8s.io/yaml"

	"github.com/kms-v2/kms-plugin/config"
	"github.com/kms-v2/kms-plugin/rotation"
)

func TestKeyIDHash(t *testing.T) {
	// The apiserver's label for key_id "k1", computed independently.
	sum := sha256.Sum256([]byte("k1"))
	if got, want := KeyIDHash("k1"), "sha256:"+hex.EncodeToString(sum[:]); got != want {
		t.Errorf("KeyIDHash: got %q, want %q", got, want)
	}
}

func TestMetrics(t *testing.T) {
	m, err := ParseMetrics(`# TYPE kms_plugin_requests_total counter
kms_plugin_requests_total{method="Decrypt",code="OK"} 7
kms_plugin_requests_total{method="Decrypt",code="Internal"} 2
kms_plugin_requests_total{method="Encrypt",code="OK"} 3
# TYPE kms_plugin_primary_key_info gauge
kms_plugin_primary_key_info{key_id_hash="sha256:b"} 1
kms_plugin_primary_key_info{key_id_hash="sha256:a"} 1
`)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name   string
		metric string
		labels map[string]string
		want   float64
	}{
		{"all series", "kms_plugin_requests_total", nil, 12},
		{"one label", "kms_plugin_requests_total", map[string]string{"method": "Decrypt"}, 9},
		{"two labels", "kms_plugin_requests_total", map[string]string{"method": "Decrypt", "code": "OK"}, 7},
		{"no match", "kms_plugin_requests_total", map[string]string{"method": "Status"}, 0},
		{"missing family", "nope", nil, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := m.Sum(tt.metric, tt.labels); got != tt.want {
				t.Errorf("Sum(%s, %v): got %v, want %v", tt.metric, tt.labels, got, tt.want)
			}
		})
	}
	if got, want := strings.Join(m.LabelValues("kms_plugin_primary_key_info", "key_id_hash"), ","), "sha256:a,sha256:b"; got != want {
		t.Errorf("LabelValues: got %q, want %q", got, want)
	}
	if m.Has("kms_plugin_primary_key_info", map[string]string{"key_id_hash": "sha256:c"}) {
		t.Errorf("Has(sha256:c): got true, want false")
	}
}

func TestDecodeStoredDEKSourceHash(t *testing.T) {
	enc := func(dek string) []byte {
		b, err := proto.Marshal(&kmstypes.EncryptedObject{EncryptedData: []byte("data"), KeyID: "k1", EncryptedDEKSource: []byte(dek)})
		if err != nil {
			t.Fatal(err)
		}
		return append([]byte(rotation.KMSv2Prefix+"p:"), b...)
	}
	a, a2, b := decodeStored("/registry/secrets/ns/a", enc("seed-1"), 1), decodeStored("/registry/secrets/ns/b", enc("seed-1"), 2), decodeStored("/registry/secrets/ns/c", enc("seed-2"), 3)
	if a.Stored.Encoding != rotation.EncodingKMSv2 || a.Stored.KeyID != "k1" {
		t.Fatalf("decode: got %s %q, want kmsv2 k1", a.Stored.Encoding, a.Stored.KeyID)
	}
	if a.SeedID() != a2.SeedID() {
		t.Errorf("same seed: got SeedIDs %q and %q, want equal", a.SeedID(), a2.SeedID())
	}
	if a.SeedID() == b.SeedID() {
		t.Errorf("different seeds: got equal SeedIDs %q", a.SeedID())
	}
	if strings.Contains(a.DEKSourceHash, hex.EncodeToString([]byte("seed-1"))) || !strings.HasPrefix(a.DEKSourceHash, "sha256:") {
		t.Errorf("DEKSourceHash %q: want a sha256 that does not reveal the source", a.DEKSourceHash)
	}
	if plain := decodeStored("/registry/namespaces/x", []byte("k8s\x00rest"), 4); plain.SeedID() != "" {
		t.Errorf("plain value: got SeedID %q, want empty", plain.SeedID())
	}
}

// TestPluginConfigLoads checks that what the harness writes for a plugin is
// a config the product itself accepts, with the overrides applied.
func TestPluginConfigLoads(t *testing.T) {
	dir := t.TempDir()
	c := &Cluster{Dir: dir, SharedDir: filepath.Join(dir, "shared"), opts: Options{PluginSettings: map[string]any{"refreshInterval": "3s"}}}
	p := &Plugin{Socket: filepath.Join(dir, "kms.sock"), HealthURL: "http://127.0.0.1:9999"}
	data, err := c.pluginConfig(p)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "kms-plugin.yaml")
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Load(path)
	if err != nil {
		t.Fatalf("config.Load of the harness's plugin config: %v\n%s", err, data)
	}
	if got, want := cfg.Provider.File.Path, c.KeysetPath(); got != want {
		t.Errorf("provider.file.path: got %q, want %q", got, want)
	}
	if got, want := time.Duration(cfg.RefreshInterval), 3*time.Second; got != want {
		t.Errorf("refreshInterval: got %s, want %s (PluginSettings override)", got, want)
	}

	c.opts.ProviderYAML = "file:\n  path: /elsewhere/keyset.json\n"
	data, err = c.pluginConfig(p)
	if err != nil {
		t.Fatal(err)
	}
	var parsed struct {
		Provider map[string]map[string]string `json:"provider"`
	}
	if err := yaml.Unmarshal(data, &parsed); err != nil {
		t.Fatal(err)
	}
	if got, want := parsed.Provider["file"]["path"], "/elsewhere/keyset.json"; got != want {
		t.Errorf("ProviderYAML: got path %q, want %q", got, want)
	}
}

func TestEncryptionConfig(t *testing.T) {
	c := &Cluster{ProviderName: "kms-e2e", Resources: []string{"secrets", "configmaps"}}
	got := string(c.encryptionConfig("/tmp/x/kms.sock"))
	var parsed struct {
		Resources []struct {
			Resources []string         `json:"resources"`
			Providers []map[string]any `json:"providers"`
		} `json:"resources"`
	}
	if err := yaml.Unmarshal([]byte(got), &parsed); err != nil {
		t.Fatalf("%v\n%s", err, got)
	}
	if len(parsed.Resources) != 1 || len(parsed.Resources[0].Providers) != 2 {
		t.Fatalf("got %+v, want one entry with two providers", parsed)
	}
	kms, ok := parsed.Resources[0].Providers[0]["kms"].(map[string]any)
	if !ok || kms["apiVersion"] != "v2" || kms["name"] != "kms-e2e" || kms["endpoint"] != "unix:///tmp/x/kms.sock" {
		t.Errorf("first provider: got %v, want kms v2 kms-e2e on unix:///tmp/x/kms.sock", parsed.Resources[0].Providers[0])
	}
	if _, ok := parsed.Resources[0].Providers[1]["identity"]; !ok {
		t.Errorf("second provider: got %v, want identity", parsed.Resources[0].Providers[1])
	}
}

func TestHasFlag(t *testing.T) {
	tests := []struct {
		name string
		args []string
		want bool
	}{
		{"absent", []string{"keys", "list"}, false},
		{"separate value", []string{"keys", "list", "--config", "x"}, true},
		{"joined value", []string{"--config=x", "keys"}, true},
		{"other flag with the prefix", []string{"--configs", "x"}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := hasFlag(tt.args, "--config"); got != tt.want {
				t.Errorf("hasFlag(%v): got %v, want %v", tt.args, got, tt.want)
			}
		})
	}
}

func TestPoll(t *testing.T) {
	t.Run("succeeds after retries", func(t *testing.T) {
		n := 0
		err := Poll(context.Background(), time.Millisecond, func() error {
			if n++; n < 3 {
				return errors.New("not yet")
			}
			return nil
		})
		if err != nil || n != 3 {
			t.Errorf("got err %v after %d calls, want nil after 3", err, n)
		}
	})
	t.Run("stops on a permanent error", func(t *testing.T) {
		n := 0
		boom := errors.New("process exited")
		err := Poll(context.Background(), time.Millisecond, func() error { n++; return StopPolling(boom) })
		if !errors.Is(err, boom) || n != 1 {
			t.Errorf("got err %v after %d calls, want %v after 1", err, n, boom)
		}
	})
	t.Run("deadline carries the last complaint", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
		defer cancel()
		err := Poll(ctx, 5*time.Millisecond, func() error { return errors.New("still 503") })
		if err == nil || !strings.Contains(err.Error(), "still 503") {
			t.Errorf("got %v, want an error naming the last complaint", err)
		}
	})
}

func TestTailFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "log")
	if err := os.WriteFile(path, []byte("a\nb\nc\nd\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if got, want := tailFile(path, 2), "c\nd"; got != want {
		t.Errorf("tailFile(2): got %q, want %q", got, want)
	}
	if got := tailFile(filepath.Join(t.TempDir(), "missing"), 2); !strings.Contains(got, "no log") {
		t.Errorf("tailFile(missing): got %q, want a note", got)
	}
}
