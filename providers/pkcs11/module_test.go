//go:build cgo

package pkcs11

import (
	"context"
	"testing"

	"github.com/miekg/pkcs11"
)

// TestRetryBusyDoesNotNest: CreateVersion retries a try whose reinit
// already retried; a store busy for good must cost one round of tries,
// not one round per outer try.
func TestRetryBusyDoesNotNest(t *testing.T) {
	m := &module{quirks: quirks{staleObjects: true}}
	calls := 0
	err := m.retryBusy(context.Background(), func() error {
		return m.retryBusy(context.Background(), func() error {
			calls++
			return pkcs11.Error(pkcs11.CKR_GENERAL_ERROR)
		})
	})
	if !isRV(err, pkcs11.CKR_GENERAL_ERROR) {
		t.Fatalf("got %v, want CKR_GENERAL_ERROR", err)
	}
	if calls != busyBackoff.Steps {
		t.Fatalf("the busy call ran %d times, want %d", calls, busyBackoff.Steps)
	}
}
