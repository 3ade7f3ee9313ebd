package pkcs11

import (
	"bytes"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/kms-v2/kms-plugin/providers"
)

func TestConfigValidate(t *testing.T) {
	good := Config{Module: "/usr/lib/softhsm/libsofthsm2.so", TokenLabel: "kms", PinFile: "/etc/kms-plugin/pin", KeyLabel: "k8s-kek"}
	cases := []struct {
		name string
		edit func(c *Config)
		want string // "" means valid
	}{
		{"Valid", func(c *Config) {}, ""},
		{"ValidWithSessions", func(c *Config) { c.Sessions = 4 }, ""},
		{"NoModule", func(c *Config) { c.Module = "" }, "pkcs11.module: required"},
		{"RelativeModule", func(c *Config) { c.Module = "libsofthsm2.so" }, "absolute path"},
		{"NoToken", func(c *Config) { c.TokenLabel = "" }, "pkcs11.tokenLabel: required"},
		{"LongToken", func(c *Config) { c.TokenLabel = strings.Repeat("t", 33) }, "at most 32"},
		{"TokenWithSpace", func(c *Config) { c.TokenLabel = "my token" }, "pkcs11.tokenLabel"},
		{"TokenWithSlash", func(c *Config) { c.TokenLabel = "a/b" }, "'/'"},
		{"NoPinFile", func(c *Config) { c.PinFile = "" }, "pkcs11.pinFile: required"},
		{"NoKeyLabel", func(c *Config) { c.KeyLabel = "" }, "pkcs11.keyLabel: required"},
		{"KeyLabelWithSlash", func(c *Config) { c.KeyLabel = "a/b" }, "pkcs11.keyLabel"},
		{"LongKeyLabel", func(c *Config) { c.KeyLabel = strings.Repeat("k", 65) }, "at most 64"},
		{"NegativeSessions", func(c *Config) { c.Sessions = -1 }, "pkcs11.sessions"},
		{"UserTypeUser", func(c *Config) { c.UserType = UserTypeUser }, ""},
		{"UserTypeCryptoUser", func(c *Config) { c.UserType = UserTypeCryptoUser }, ""},
		{"UserTypeSO", func(c *Config) { c.UserType = "so" }, "pkcs11.userType \"so\": want user (default"},
		{"AESNamed", func(c *Config) { c.Algorithm = "AES-256-GCM" }, ""},
		{"RSA", func(c *Config) { c.Algorithm = "RSA-OAEP-256" }, ""},
		{"RSAWithEverything", func(c *Config) { *c = rsaWith(*c, 4096, &UnwrapCache{Size: 10, TTL: Duration(time.Minute)}) }, ""},
		{"RSACacheOff", func(c *Config) { *c = rsaWith(*c, 2048, &UnwrapCache{}) }, ""},
		{"UnknownAlgorithm", func(c *Config) { c.Algorithm = "RSA-OAEP" }, "want AES-256-GCM (default) or RSA-OAEP-256"},
		{"LowercaseAlgorithm", func(c *Config) { c.Algorithm = "aes-256-gcm" }, "pkcs11.algorithm"},
		{"KeySizeWithAES", func(c *Config) { c.KeySize = 2048 }, "pkcs11.keySize: only used with algorithm RSA-OAEP-256"},
		{"CacheWithAES", func(c *Config) { c.UnwrapCache = &UnwrapCache{Size: 10} }, "pkcs11.unwrapCache: only used with algorithm RSA-OAEP-256"},
		{"OddKeySize", func(c *Config) { *c = rsaWith(*c, 1024, nil) }, "want 2048, 3072 (default) or 4096"},
		{"NegativeCacheSize", func(c *Config) { *c = rsaWith(*c, 0, &UnwrapCache{Size: -1}) }, "pkcs11.unwrapCache.size"},
		{"HugeCache", func(c *Config) { *c = rsaWith(*c, 0, &UnwrapCache{Size: 1_000_001}) }, "pkcs11.unwrapCache.size"},
		{"LongCacheTTL", func(c *Config) { *c = rsaWith(*c, 0, &UnwrapCache{Size: 1, TTL: Duration(2 * time.Hour)}) }, "at most 1h"},
		{"NegativeCacheTTL", func(c *Config) { *c = rsaWith(*c, 0, &UnwrapCache{Size: 1, TTL: -1}) }, "pkcs11.unwrapCache.ttl"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			cfg := good
			c.edit(&cfg)
			err := cfg.Validate()
			switch {
			case c.want == "" && err != nil:
				t.Fatalf("got %v, want valid", err)
			case c.want != "" && (err == nil || !strings.Contains(err.Error(), c.want)):
				t.Fatalf("got %v, want an error mentioning %q", err, c.want)
			case err != nil && strings.Contains(err.Error(), "\n"):
				t.Fatalf("error %q spans lines, want one line", err)
			}
		})
	}
}

func rsaWith(c Config, keySize int, cache *UnwrapCache) Config {
	c.Algorithm, c.KeySize, c.UnwrapCache = AlgorithmRSAOAEP, keySize, cache
	return c
}

// TestConfigDecodes reads the new fields as the plugin's strict YAML (via
// JSON) decoding does, and checks the defaults the RSA mode derives.
func TestConfigDecodes(t *testing.T) {
	cases := []struct {
		name     string
		json     string
		wantSize int
		wantTTL  time.Duration
		wantBits int
	}{
		{"RSADefaults", `{"algorithm":"RSA-OAEP-256"}`, DefaultCacheSize, DefaultCacheTTL, DefaultKeySize},
		{"RSAExplicit", `{"algorithm":"RSA-OAEP-256","keySize":2048,"unwrapCache":{"size":10,"ttl":"30s"}}`, 10, 30 * time.Second, 2048},
		{"CacheOffKeepsTTLDefault", `{"algorithm":"RSA-OAEP-256","unwrapCache":{"size":0}}`, 0, DefaultCacheTTL, DefaultKeySize},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dec := json.NewDecoder(bytes.NewReader([]byte(c.json)))
			dec.DisallowUnknownFields()
			var cfg Config
			if err := dec.Decode(&cfg); err != nil {
				t.Fatal(err)
			}
			o := cfg.unwrapOptions()
			if o.CacheSize != c.wantSize || o.CacheTTL != c.wantTTL || cfg.keySize() != c.wantBits {
				t.Fatalf("got cache %d for %s, %d bits; want %d for %s, %d bits", o.CacheSize, o.CacheTTL, cfg.keySize(), c.wantSize, c.wantTTL, c.wantBits)
			}
			if o.NoCoalescing {
				t.Fatal("coalescing is off, want it on outside the benchmark")
			}
		})
	}
	var d Duration
	if err := json.Unmarshal([]byte(`"5 minutes"`), &d); err == nil || !strings.Contains(err.Error(), "5m") {
		t.Fatalf("bad duration: got %v, want an error suggesting 5m", err)
	}
}

func TestConfigResolvePaths(t *testing.T) {
	cases := []struct {
		name                    string
		in                      Config
		wantModule, wantPinFile string
	}{
		{"Relative", Config{Module: "lib/p11.so", PinFile: "pin"}, "/etc/kms/lib/p11.so", "/etc/kms/pin"},
		{"Absolute", Config{Module: "/usr/lib/p11.so", PinFile: "/run/pin"}, "/usr/lib/p11.so", "/run/pin"},
		{"BareModuleNameLeftForValidate", Config{Module: "p11.so", PinFile: "pin"}, "p11.so", "/etc/kms/pin"},
		{"Empty", Config{}, "", ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			cfg := c.in
			cfg.ResolvePaths("/etc/kms")
			if cfg.Module != c.wantModule || cfg.PinFile != c.wantPinFile {
				t.Fatalf("got module %q pinFile %q, want %q %q", cfg.Module, cfg.PinFile, c.wantModule, c.wantPinFile)
			}
		})
	}
}

// FuzzUnframe feeds arbitrary stored bytes to the ciphertext parser: it
// must never panic and must accept only the one valid shape.
func FuzzUnframe(f *testing.F) {
	f.Add(frame(make([]byte, ivSize), make([]byte, 48)))
	f.Add([]byte{})
	f.Add([]byte{formatV1})
	f.Fuzz(func(t *testing.T, b []byte) {
		iv, ct, err := unframe(b)
		if err != nil {
			return
		}
		if len(b) != sealedLen || b[0] != formatV1 || len(iv) != ivSize || len(ct) != providersSeedPlusTag {
			t.Fatalf("accepted %d bytes (format %d): iv %d, ct %d", len(b), b[0], len(iv), len(ct))
		}
	})
}

const providersSeedPlusTag = 32 + tagSize

// FuzzUnframeRSA feeds arbitrary stored bytes to the RSA framing for a
// 2048-bit key: only the format byte and exactly the modulus length pass.
func FuzzUnframeRSA(f *testing.F) {
	f.Add(frameRSA(make([]byte, 256)))
	f.Add([]byte{})
	f.Add([]byte{formatRSA})
	f.Add(frame(make([]byte, ivSize), make([]byte, 48)))
	f.Fuzz(func(t *testing.T, b []byte) {
		ct, err := unframeRSA(b, 256)
		if err != nil {
			if len(b) == 257 && b[0] == formatRSA {
				t.Fatalf("refused a well-framed ciphertext: %v", err)
			}
			return
		}
		if len(b) != 257 || b[0] != formatRSA || len(ct) != 256 || !bytes.Equal(ct, b[1:]) {
			t.Fatalf("accepted %d bytes (format %d) as %d bytes", len(b), b[0], len(ct))
		}
	})
}

// unframeRSA errors are ErrInvalidCiphertext, which the plugin maps for
// the apiserver.
func TestUnframeRSAErrors(t *testing.T) {
	for _, b := range [][]byte{nil, {formatRSA}, append([]byte{formatV1}, make([]byte, 256)...)} {
		if _, err := unframeRSA(b, 256); !errors.Is(err, providers.ErrInvalidCiphertext) {
			t.Errorf("unframeRSA(%d bytes): got %v, want ErrInvalidCiphertext", len(b), err)
		}
	}
}
