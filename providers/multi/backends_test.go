package multi_test

import (
	"bytes"
	"context"
	"path/filepath"
	"testing"
	"time"

	"k8s.io/apiserver/pkg/storage/value"
	kmsservice "k8s.io/kms/pkg/service"

	"github.com/kms-v2/kms-plugin/internal/fipstest"
	"github.com/kms-v2/kms-plugin/plugin/plugintest"
	"github.com/kms-v2/kms-plugin/providers"
	"github.com/kms-v2/kms-plugin/providers/file"
	"github.com/kms-v2/kms-plugin/providers/multi"
	"github.com/kms-v2/kms-plugin/providers/pkcs11"
	"github.com/kms-v2/kms-plugin/providers/pkcs11/pkcs11test"
	"github.com/kms-v2/kms-plugin/providers/providertest"
	"github.com/kms-v2/kms-plugin/rotation/etcdlayout"
)

// newFile is a file provider on a fresh keyset.
func newFile(t *testing.T) providers.Provider {
	t.Helper()
	cfg := file.Config{Path: filepath.Join(t.TempDir(), "keyset.json")}
	if _, err := file.Init(context.Background(), cfg, nil); err != nil {
		t.Fatal(err)
	}
	p, err := file.New(context.Background(), cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

// newToken is a pkcs11 provider on a fresh SoftHSM2 token.
func newToken(t *testing.T) *pkcs11.Provider {
	t.Helper()
	tk := pkcs11test.NewToken(t, "")
	cfg := pkcs11.Config{Module: tk.Module, TokenLabel: tk.Label, PinFile: tk.PinFile, KeyLabel: "kek"}
	if _, err := pkcs11.Init(context.Background(), cfg, nil); err != nil {
		t.Fatal(err)
	}
	p, err := pkcs11.New(context.Background(), cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

func router(t *testing.T, ps ...providers.Provider) *multi.Provider {
	t.Helper()
	var es []multi.Entry
	for i, p := range ps {
		es = append(es, multi.Entry{Name: []string{"first", "second"}[i], Scope: providers.ScopeShared, Provider: p})
	}
	m, err := multi.New(context.Background(), es)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// rotating is the router with its first entry's Rotator, so the
// conformance suite also rotates through it.
type rotating struct {
	*multi.Provider
	providers.Rotator
}

// TestConformance runs the provider conformance suite against routers of
// real backends, each order: the first entry encrypts and rotates, and
// every key_id it makes is routed back to it.
func TestConformance(t *testing.T) {
	t.Run("pkcs11+file", func(t *testing.T) {
		providertest.Run(t, func(t *testing.T) providers.Provider {
			tok := newToken(t)
			return rotating{router(t, tok, newFile(t)), tok}
		})
	})
	t.Run("file+pkcs11", func(t *testing.T) {
		providertest.Run(t, func(t *testing.T) providers.Provider {
			f := newFile(t)
			return rotating{router(t, f, newToken(t)), f.(providers.Rotator)}
		})
	})
}

// TestPluginContractAcrossAMigration serves a file-only plugin, writes an
// object the way kube-apiserver does, then serves [pkcs11, file]: the
// apiserver's own client passes the whole contract against it, and a
// restarted apiserver reads the old object through the decrypt-only entry
// and finds it stale.
func TestPluginContractAcrossAMigration(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	f, tok := newFile(t), newToken(t)
	before := plugintest.Client(t, plugintest.Serve(t, router(t, f), time.Second))
	// A seed sealed by the file-only plugin, through the gRPC client alone:
	// the plugin's own path, run in every mode (the envelope below is not).
	seed := []byte("32-byte-seed-from-the-file-era!!")
	old, err := before.Encrypt(ctx, "uid-before-seed", seed)
	if err != nil {
		t.Fatal(err)
	}
	var tr *plugintest.Transformer
	secret := []byte("written-under-the-file-provider")
	dataCtx := value.DefaultContext(etcdlayout.Default().Key("secrets", "default", "old"))
	var stored []byte
	if !fipstest.Only() {
		if tr, err = plugintest.NewTransformer(ctx, before, "uid-before"); err != nil {
			t.Fatal(err)
		}
		if stored, err = tr.TransformToStorage(ctx, secret, dataCtx); err != nil {
			t.Fatal(err)
		}
	}

	after := router(t, tok, f)
	plugintest.Contract(t, after)
	svc := plugintest.Client(t, plugintest.Serve(t, after, time.Second))
	pkcs11Only := plugintest.Client(t, plugintest.Serve(t, router(t, tok), time.Second))
	oldReq := &kmsservice.DecryptRequest{KeyID: old.KeyID, Ciphertext: old.Ciphertext, Annotations: old.Annotations}
	if got, err := svc.Decrypt(ctx, "uid-after-seed", oldReq); err != nil || !bytes.Equal(got, seed) {
		t.Fatalf("Decrypt of the file-era seed through [pkcs11, file]: %v (match %v)", err, bytes.Equal(got, seed))
	}
	if _, err := pkcs11Only.Decrypt(ctx, "uid-after-seed", oldReq); err == nil {
		t.Fatal("a pkcs11-only plugin decrypted a seed under the file provider")
	}

	t.Run("Envelope", func(t *testing.T) {
		fipstest.SkipIfOnly(t, "kube-apiserver's envelope transformer builds its DEK cipher with cipher.NewGCM, GCM at caller-chosen nonces")
		primary, _ := tok.PrimaryKeyID(ctx)
		got, stale, err := plugintest.FreshReader(svc, primary).TransformFromStorage(ctx, stored, dataCtx)
		if err != nil {
			t.Fatalf("read of the file-era object through [pkcs11, file]: %v", err)
		}
		if !bytes.Equal(got, secret) || !stale {
			t.Fatalf("read %q stale=%v, want %q and stale (not under the encrypting provider)", got, stale, secret)
		}
		// Without the file entry the object is unreadable: the route matters.
		if _, _, err := plugintest.FreshReader(pkcs11Only, primary).TransformFromStorage(ctx, stored, dataCtx); err == nil {
			t.Fatal("a pkcs11-only plugin read an object under the file provider")
		}
	})
}
