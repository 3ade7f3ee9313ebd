package harness

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	apiserverapi "k8s.io/apiserver/pkg/apis/apiserver"
	apiserverinstall "k8s.io/apiserver/pkg/apis/apiserver/install"
	apiservervalidation "k8s.io/apiserver/pkg/apis/apiserver/validation"
	kmstypes "k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2/v2"
	"sigs.k8s.io/yaml"

	"github.com/kms-v2/kms-plugin/config"
	"github.com/kms-v2/kms-plugin/providers"
	"github.com/kms-v2/kms-plugin/providers/file"
	"github.com/kms-v2/kms-plugin/rotation/etcdlayout"
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
		return append([]byte(etcdlayout.KMSv2Prefix+"p:"), b...)
	}
	a, a2, b := decodeStored("/registry/secrets/ns/a", enc("seed-1"), 1), decodeStored("/registry/secrets/ns/b", enc("seed-1"), 2), decodeStored("/registry/secrets/ns/c", enc("seed-2"), 3)
	if a.Stored.Encoding != etcdlayout.EncodingKMSv2 || a.Stored.KeyID != "k1" || a.Stored.Provider != "p" {
		t.Fatalf("decode: got %s %q %q, want kmsv2 provider p key k1", a.Stored.Encoding, a.Stored.Provider, a.Stored.KeyID)
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
	kinds := providers.Kinds{file.Kind}
	cfg, err := config.Load(path, kinds)
	if err != nil {
		t.Fatalf("config.Load of the harness's plugin config: %v\n%s", err, data)
	}
	if got, want := cfg.Providers[0].Section.Instance(), c.KeysetPath(); got != want {
		t.Errorf("provider.file.path: got %q, want %q", got, want)
	}
	p.ConfigPath = path
	if err := p.SetProviders("file: {path: /new.json}", "name: old\nfile: {path: "+c.KeysetPath()+"}"); err != nil {
		t.Fatal(err)
	}
	if cfg, err = config.Load(path, kinds); err != nil {
		t.Fatalf("config.Load after SetProviders: %v", err)
	}
	if got := cfg.Providers; len(got) != 2 || got[0].Section.Instance() != "/new.json" || got[1].Name != "old" {
		t.Errorf("after SetProviders: got %+v, want /new.json then old", got)
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

// parseEncryptionConfig decodes an EncryptionConfiguration the way
// kube-apiserver does (strictly, through its scheme into the internal type)
// and runs the apiserver's own validation on it.
func parseEncryptionConfig(t *testing.T, data []byte) *apiserverapi.EncryptionConfiguration {
	t.Helper()
	scheme := runtime.NewScheme()
	apiserverinstall.Install(scheme)
	codecs := serializer.NewCodecFactory(scheme, serializer.EnableStrict)
	obj, gvk, err := codecs.UniversalDecoder().Decode(data, nil, nil)
	if err != nil {
		t.Fatalf("decode: %v\n%s", err, data)
	}
	cfg, ok := obj.(*apiserverapi.EncryptionConfiguration)
	if !ok {
		t.Fatalf("decoded %v (%T), want an EncryptionConfiguration\n%s", gvk, obj, data)
	}
	if errs := apiservervalidation.ValidateEncryptionConfiguration(cfg, false); len(errs) > 0 {
		t.Fatalf("kube-apiserver's validation: %v\n%s", errs.ToAggregate(), data)
	}
	return cfg
}

func TestEncryptionConfig(t *testing.T) {
	c := &Cluster{ProviderName: "kms-e2e", Resources: []string{"secrets", "configmaps"}}
	data, err := c.renderEncryptionConfig("/tmp/x/kms.sock", c.DefaultEncryptionProviders())
	if err != nil {
		t.Fatal(err)
	}
	cfg := parseEncryptionConfig(t, data)
	if len(cfg.Resources) != 1 || len(cfg.Resources[0].Providers) != 2 {
		t.Fatalf("got %+v, want one entry with two providers", cfg)
	}
	if got, want := strings.Join(cfg.Resources[0].Resources, ","), "secrets,configmaps"; got != want {
		t.Errorf("resources: got %s, want %s", got, want)
	}
	kms := cfg.Resources[0].Providers[0].KMS
	if kms == nil || kms.APIVersion != "v2" || kms.Name != "kms-e2e" || kms.Endpoint != "unix:///tmp/x/kms.sock" || kms.Timeout.Duration != 3*time.Second {
		t.Errorf("first provider: got %+v, want kms v2 kms-e2e on unix:///tmp/x/kms.sock, timeout 3s", cfg.Resources[0].Providers[0])
	}
	if cfg.Resources[0].Providers[1].Identity == nil {
		t.Errorf("second provider: got %+v, want identity", cfg.Resources[0].Providers[1])
	}
}

// TestEncryptionProviders renders the orders the trust tests switch
// between, each checked by kube-apiserver's own decoder and validation.
func TestEncryptionProviders(t *testing.T) {
	c := &Cluster{ProviderName: "a", Resources: []string{"secrets"}}
	kinds := func(cfg *apiserverapi.EncryptionConfiguration) string {
		var out []string
		for _, p := range cfg.Resources[0].Providers {
			switch {
			case p.KMS != nil:
				out = append(out, "kms:"+p.KMS.Name+"@"+p.KMS.Endpoint)
			case p.AESCBC != nil:
				out = append(out, "aescbc:"+p.AESCBC.Keys[0].Name)
			case p.Identity != nil:
				out = append(out, "identity")
			default:
				out = append(out, "?")
			}
		}
		return strings.Join(out, ",")
	}
	tests := []struct {
		name      string
		providers []EncryptionProvider
		want      string
	}{
		{"renamed provider on the same socket", []EncryptionProvider{KMS("b"), KMS("a"), Identity()}, "kms:b@unix:///s,kms:a@unix:///s,identity"},
		{"plaintext first", []EncryptionProvider{Identity(), KMS("a")}, "identity,kms:a@unix:///s"},
		{"aescbc first", []EncryptionProvider{AESCBC("key1"), KMS("a"), Identity()}, "aescbc:key1,kms:a@unix:///s,identity"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			data, err := c.renderEncryptionConfig("/s", tt.providers)
			if err != nil {
				t.Fatal(err)
			}
			if got := kinds(parseEncryptionConfig(t, data)); got != tt.want {
				t.Errorf("providers: got %s, want %s", got, tt.want)
			}
		})
	}

	// The aescbc secret is 32 bytes, and the same in every rendering, so
	// kms-first-aescbc-second still reads what aescbc-first wrote.
	first, err := c.renderEncryptionConfig("/s", []EncryptionProvider{AESCBC("key1"), Identity()})
	if err != nil {
		t.Fatal(err)
	}
	second, err := c.renderEncryptionConfig("/s", []EncryptionProvider{KMS("a"), AESCBC("key1")})
	if err != nil {
		t.Fatal(err)
	}
	s1 := parseEncryptionConfig(t, first).Resources[0].Providers[0].AESCBC.Keys[0].Secret
	s2 := parseEncryptionConfig(t, second).Resources[0].Providers[1].AESCBC.Keys[0].Secret
	if key, err := base64.StdEncoding.DecodeString(s1); err != nil || len(key) != 32 {
		t.Errorf("aescbc secret: %d bytes (%v), want 32", len(key), err)
	}
	if s1 != s2 {
		t.Errorf("aescbc secret changed between renderings")
	}
	if _, err := c.renderEncryptionConfig("/s", nil); err == nil {
		t.Errorf("no providers: want an error")
	}
}

// TestSetEncryptionConfig: the file is replaced whole.
func TestSetEncryptionConfig(t *testing.T) {
	dir := t.TempDir()
	a := &APIServer{EncryptionConfig: filepath.Join(dir, "encryption-config.yaml")}
	for _, content := range []string{"first", "second"} {
		if err := a.SetEncryptionConfig([]byte(content)); err != nil {
			t.Fatal(err)
		}
		if got, err := os.ReadFile(a.EncryptionConfig); err != nil || string(got) != content {
			t.Errorf("file: got %q (%v), want %q", got, err, content)
		}
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 1 {
		t.Errorf("folder holds %d files, want only the config (no temp file left)", len(ents))
	}
}

// TestAPIServerEtcdPrefix: Options.EtcdPrefix reaches every apiserver's
// flags and the cluster's Layout; the default passes no flag.
func TestAPIServerEtcdPrefix(t *testing.T) {
	for _, tt := range []struct {
		prefix     string
		wantFlag   string
		wantLayout string
	}{
		{"", "", etcdlayout.DefaultPrefix},
		{"/custom", "/custom", "/custom"},
	} {
		t.Run("prefix "+tt.prefix, func(t *testing.T) {
			dir := t.TempDir()
			layout := etcdlayout.Default()
			if tt.prefix != "" {
				var err error
				if layout, err = etcdlayout.New(tt.prefix); err != nil {
					t.Fatal(err)
				}
			}
			c := &Cluster{
				Dir: dir, SharedDir: filepath.Join(dir, "shared"), ProviderName: "p", Resources: []string{"secrets", "configmaps"},
				Layout: layout, Token: "t", Etcd: &Etcd{Endpoint: "http://127.0.0.1:1"},
				Plugins: []*Plugin{{Socket: filepath.Join(dir, "kms.sock")}},
				opts:    Options{EtcdPrefix: tt.prefix},
			}
			defer c.Close()
			if err := os.MkdirAll(c.SharedDir, 0o700); err != nil {
				t.Fatal(err)
			}
			a, err := c.newAPIServer(0)
			if err != nil {
				t.Fatal(err)
			}
			got := ""
			for i, arg := range a.baseArgs {
				if arg == "--etcd-prefix" && i+1 < len(a.baseArgs) {
					got = a.baseArgs[i+1]
				}
			}
			if got != tt.wantFlag {
				t.Errorf("--etcd-prefix: got %q, want %q (args %v)", got, tt.wantFlag, a.baseArgs)
			}
			if c.Layout.Prefix() != tt.wantLayout {
				t.Errorf("layout: got %s, want %s", c.Layout, tt.wantLayout)
			}
			data, err := os.ReadFile(a.EncryptionConfig)
			if err != nil {
				t.Fatal(err)
			}
			if kms := parseEncryptionConfig(t, data).Resources[0].Providers[0].KMS; kms == nil || kms.Name != "p" {
				t.Errorf("written EncryptionConfiguration: first provider %+v, want kms p", kms)
			}
		})
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
