//go:build !cgo

package pkcs11

import (
	"context"
	"errors"
	"testing"
)

func TestNoCgoBuildFailsClearly(t *testing.T) {
	cfg := Config{Module: "/usr/lib/softhsm/libsofthsm2.so", TokenLabel: "kms", PinFile: "/etc/pin", KeyLabel: "k8s-kek"}
	if _, err := New(context.Background(), cfg, nil); !errors.Is(err, errNoCgo) {
		t.Fatalf("New: got %v, want errNoCgo", err)
	}
	if _, err := Init(context.Background(), cfg, nil); !errors.Is(err, errNoCgo) {
		t.Fatalf("Init: got %v, want errNoCgo", err)
	}
}
