//go:build cgo

package pkcs11

import (
	"errors"
	"strings"
	"testing"

	"github.com/miekg/pkcs11"

	"github.com/kms-v2/kms-plugin/providers"
)

// TestServingSessionsAreReadOnly: everything the plugin does while serving
// (Refresh, Encrypt, Decrypt, Check) runs on pooled read-only sessions, so
// the token refuses any object write made through one; only the key
// management calls open a read/write session, and close it after.
func TestServingSessionsAreReadOnly(t *testing.T) {
	p, _ := newInitialized(t)
	ctx := testCtx(t)
	if err := p.Check(ctx); err != nil {
		t.Fatal(err)
	}
	var state uint
	err := p.tok.do(ctx, func(h pkcs11.SessionHandle) error {
		info, err := p.tok.mod.ctx.GetSessionInfo(h)
		if err != nil {
			return err
		}
		state = info.State
		_, err = p.tok.mod.ctx.CreateObject(h, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_DATA),
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
			pkcs11.NewAttribute(pkcs11.CKA_LABEL, "written-by-the-plugin"),
		})
		return err
	})
	if state != pkcs11.CKS_RO_USER_FUNCTIONS {
		t.Errorf("pooled session state %d, want CKS_RO_USER_FUNCTIONS (%d)", state, pkcs11.CKS_RO_USER_FUNCTIONS)
	}
	if !isRV(err, pkcs11.CKR_SESSION_READ_ONLY) {
		t.Fatalf("C_CreateObject on a pooled session: %v, want CKR_SESSION_READ_ONLY", err)
	}
	// Key management still works, on sessions of its own, and the pool
	// keeps its login after they close.
	kv, err := p.CreateVersion(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Promote(ctx, kv.KeyID); err != nil {
		t.Fatal(err)
	}
	s, err := p.Encrypt(ctx, make([]byte, providers.SeedSize))
	if err != nil || s.KeyID != kv.KeyID {
		t.Fatalf("Encrypt after promote: %v (key_id %s), want %s", err, s.KeyID, kv.KeyID)
	}
	if _, err := p.Decrypt(ctx, s); err != nil {
		t.Fatal(err)
	}
}

// TestUserTypeTheTokenLacks: a plugin config asking for a role SoftHSM2
// does not have fails at once, with one line naming pkcs11.userType, and
// is not retried.
func TestUserTypeTheTokenLacks(t *testing.T) {
	_, cfg := newInitialized(t)
	cfg.UserType = UserTypeCryptoUser
	for range 2 {
		p, err := New(testCtx(t), cfg, testLogger(t))
		if err == nil {
			p.Close()
			t.Fatal("New logged in as cryptoUser on SoftHSM2, which has no such role")
		}
		msg := err.Error()
		if !strings.Contains(msg, "pkcs11.userType") || !strings.Contains(msg, "no cryptoUser role") || strings.Contains(msg, "\n") ||
			!errors.Is(err, providers.ErrPermissionDenied) {
			t.Fatalf("got %q, want one line naming pkcs11.userType and the missing role, ErrPermissionDenied", msg)
		}
	}
}
