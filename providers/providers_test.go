package providers

import (
	"errors"
	"strings"
	"testing"
)

func TestParseKeyID(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    KeyID
		wantErr bool
	}{
		{"file", "file:ks-1/123", KeyID{"file", "ks-1/123"}, false},
		{"azure", "azurekv:v.vault.azure.net/k/abc", KeyID{"azurekv", "v.vault.azure.net/k/abc"}, false},
		{"empty", "", KeyID{}, true},
		{"no colon", "file", KeyID{}, true},
		{"empty name", "file:", KeyID{}, true},
		{"upper backend", "File:x", KeyID{}, true},
		{"space", "file:a b", KeyID{}, true},
		{"non-ascii", "file:\u00e9", KeyID{}, true},
		{"too long", "file:" + strings.Repeat("a", MaxKeyIDSize), KeyID{}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseKeyID(tt.in)
			if (err != nil) != tt.wantErr {
				t.Fatalf("ParseKeyID(%q) error = %v, wantErr %v", tt.in, err, tt.wantErr)
			}
			if err != nil && !errors.Is(err, ErrInvalidInput) {
				t.Fatalf("error %v does not wrap ErrInvalidInput", err)
			}
			if got != tt.want {
				t.Fatalf("ParseKeyID(%q) = %+v, want %+v", tt.in, got, tt.want)
			}
			if err == nil && got.String() != tt.in {
				t.Fatalf("String() = %q, want %q", got.String(), tt.in)
			}
		})
	}
}

func TestHashKeyID(t *testing.T) {
	// sha256("abc"), as kube-apiserver labels its metrics.
	if got, want := HashKeyID("abc"), "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"; got != want {
		t.Fatalf("HashKeyID = %s, want %s", got, want)
	}
}

func TestValidateAnnotations(t *testing.T) {
	tests := []struct {
		name    string
		in      map[string][]byte
		wantErr bool
	}{
		{"nil", nil, false},
		{"fqdn", map[string][]byte{"version.encryption.example.io": []byte("1")}, false},
		{"single label", map[string][]byte{"version": nil}, true},
		{"upper case", map[string][]byte{"Version.example.io": nil}, true},
		{"slash", map[string][]byte{"example.io/version": nil}, true},
		{"empty label", map[string][]byte{"a..io": nil}, true},
		{"leading dash", map[string][]byte{"-a.io": nil}, true},
		{"too big", map[string][]byte{"a.io": make([]byte, MaxAnnotationsSize)}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := ValidateAnnotations(tt.in)
			if (err != nil) != tt.wantErr {
				t.Fatalf("ValidateAnnotations = %v, wantErr %v", err, tt.wantErr)
			}
		})
	}
}

func FuzzParseKeyID(f *testing.F) {
	for _, s := range []string{"file:ks/1", "", ":", "a:b:c", "pkcs11:tok/label-1"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		k, err := ParseKeyID(s)
		if err != nil {
			return
		}
		if k.String() != s {
			t.Fatalf("round trip: %q became %q", s, k.String())
		}
	})
}

func FuzzValidateAnnotations(f *testing.F) {
	f.Add("x.example.io", []byte("v"))
	f.Add("", []byte{})
	f.Fuzz(func(t *testing.T, k string, v []byte) {
		err := ValidateAnnotations(map[string][]byte{k: v})
		if err == nil && (len(k)+len(v) > MaxAnnotationsSize || !strings.Contains(k, ".") || strings.Contains(k, "/")) {
			t.Fatalf("accepted invalid annotation %q (%d bytes)", k, len(v))
		}
	})
}
