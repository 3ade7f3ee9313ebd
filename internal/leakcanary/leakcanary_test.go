package leakcanary

import (
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"strings"
	"testing"
)

// TestScanFindsEveryEncoding: the canary must be able to fail. A secret
// written in any supported form, alone or inside a longer value, is found.
func TestScanFindsEveryEncoding(t *testing.T) {
	secret := make([]byte, 32)
	_, _ = rand.Read(secret)
	var c Canary
	c.Register("seed", secret)
	pre := func(n int) []byte { return append(bytes.Repeat([]byte{0xAB}, n), secret...) }
	forms := map[string]string{
		"raw":                   string(secret),
		"hex":                   hex.EncodeToString(secret),
		"HEX":                   strings.ToUpper(hex.EncodeToString(secret)),
		"base64":                base64.StdEncoding.EncodeToString(secret),
		"base64url":             base64.URLEncoding.EncodeToString(secret),
		"base64-nopad":          base64.RawStdEncoding.EncodeToString(secret),
		"base64url-nopad":       base64.RawURLEncoding.EncodeToString(secret),
		"base64, inside, +1":    base64.StdEncoding.EncodeToString(append(pre(1), 1, 2, 3)),
		"base64, inside, +2":    base64.StdEncoding.EncodeToString(append(pre(2), 4)),
		"base64url, inside, +4": base64.URLEncoding.EncodeToString(pre(4)),
		"base64url, inside, +5": base64.RawURLEncoding.EncodeToString(pre(5)),
	}
	for name, form := range forms {
		t.Run(name, func(t *testing.T) {
			line := []byte(`{"@level":"debug","@message":"encrypt","value":"` + form + `"}` + "\n")
			hits := c.Scan(append([]byte("earlier line\n"), line...))
			if len(hits) == 0 {
				t.Fatalf("the canary missed the secret written as %s", name)
			}
			for _, h := range hits {
				if h.Label != "seed" || h.Offset < len("earlier line\n") {
					t.Fatalf("hit %v", h)
				}
			}
		})
	}
}

func TestScanIgnoresOtherData(t *testing.T) {
	var c Canary
	secret := []byte("pin-0123456789abcdef")
	c.Register("pin", secret)
	c.Register("short", []byte("1234"))
	if c.Len() != 1 || c.Short() != 1 {
		t.Fatalf("Len %d, Short %d; want 1, 1", c.Len(), c.Short())
	}
	other := make([]byte, 1<<16)
	_, _ = rand.Read(other)
	corpus := []byte(hex.EncodeToString(other) + base64.StdEncoding.EncodeToString(other) + " port 1234 pin-0123456789abcde")
	if hits := c.Scan(corpus); len(hits) != 0 {
		t.Fatalf("hits in unrelated data: %v", hits)
	}
	if hits := Scan(corpus); len(hits) != 0 {
		t.Fatalf("Default, with nothing registered, found %v", hits)
	}
}
