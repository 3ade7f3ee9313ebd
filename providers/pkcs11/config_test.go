package pkcs11

import (
	"strings"
	"testing"
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
