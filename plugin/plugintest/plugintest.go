// Package plugintest serves a providers.Provider through the real plugin
// service on a temporary Unix socket and checks the KMS v2 contract the way
// kube-apiserver sees it: with the apiserver's own client and envelope code
// (k8s.io/apiserver/.../envelope/kmsv2), not with a hand-written client.
// Every backend's tests call Contract.
package plugintest

import (
	"bytes"
	"context"
	"crypto/rand"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"k8s.io/apiserver/pkg/storage/value"
	"k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2"
	kmstypes "k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2/v2"
	kmsservice "k8s.io/kms/pkg/service"

	"github.com/kms-v2/kms-plugin/internal/fipstest"
	"github.com/kms-v2/kms-plugin/plugin"
	"github.com/kms-v2/kms-plugin/providers"
	"github.com/kms-v2/kms-plugin/rotation/etcdlayout"
)

// Server is a running plugin on a temporary socket.
type Server struct {
	// Socket is the socket's absolute path.
	Socket string
	// Service is the running service, for health inspection.
	Service *plugin.Service
}

// Endpoint is the EncryptionConfiguration form of the socket.
func (s *Server) Endpoint() string { return "unix://" + s.Socket }

// Serve runs the plugin service over p on a fresh socket until the test
// ends. refresh is the background refresh and check interval.
func Serve(t testing.TB, p providers.Provider, refresh time.Duration) *Server {
	t.Helper()
	// Socket paths are limited to 108 bytes; t.TempDir() can be longer.
	dir, err := os.MkdirTemp("", "kms")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "kms.sock")
	svc, err := plugin.New(plugin.Options{
		Provider:        p,
		Logger:          hclog.New(&hclog.LoggerOptions{Level: hclog.Warn, Output: testWriter{t}}),
		CheckInterval:   refresh,
		RefreshInterval: refresh,
		MaxStaleness:    10 * refresh,
	})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := plugin.Listen(sock, "")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	svc.Check(ctx)
	go svc.Run(ctx)
	gs := plugin.NewGRPCServer(svc)
	go func() { _ = gs.Serve(ln) }()
	t.Cleanup(func() {
		cancel()
		gs.Stop()
	})
	return &Server{Socket: sock, Service: svc}
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(string(bytes.TrimRight(b, "\n")))
	return len(b), nil
}

// Client connects the apiserver's own KMS v2 gRPC client to s.
func Client(t testing.TB, s *Server) kmsservice.Service {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	svc, err := kmsv2.NewGRPCService(ctx, s.Endpoint(), "plugintest", 3*time.Second)
	if err != nil {
		t.Fatalf("NewGRPCService: %v", err)
	}
	return svc
}

// Transformer is what one apiserver holds between two Status changes: a
// seed, its EncryptedObject, and the envelope transformer built on them.
type Transformer struct {
	value.Transformer
	// KeyID is the key_id Encrypt stamped on the seed.
	KeyID string
}

// NewTransformer does what kube-apiserver does when Status reports a new
// key_id: generate a seed, have the plugin encrypt it, and build the
// envelope transformer that writes objects with it.
func NewTransformer(ctx context.Context, svc kmsservice.Service, uid string) (*Transformer, error) {
	tr, obj, cacheKey, err := kmsv2.GenerateTransformer(ctx, uid, svc, true)
	if err != nil {
		return nil, err
	}
	state := kmsv2.State{
		Transformer:                           tr,
		EncryptedObjectKeyID:                  obj.KeyID,
		EncryptedObjectEncryptedDEKSource:     obj.EncryptedDEKSource,
		EncryptedObjectAnnotations:            obj.Annotations,
		EncryptedObjectEncryptedDEKSourceType: kmstypes.EncryptedDEKSourceType_HKDF_SHA256_XNONCE_AES_GCM_SEED,
		UID:                                   uid,
		ExpirationTimestamp:                   time.Now().Add(3 * time.Minute),
		CacheKey:                              cacheKey,
		KMSProviderName:                       "plugintest",
	}
	env := kmsv2.NewEnvelopeTransformer(svc, "plugintest", func() (kmsv2.State, error) { return state, nil }, "apiserver-test")
	return &Transformer{Transformer: env, KeyID: obj.KeyID}, nil
}

// FreshReader returns an envelope transformer with an empty seed cache, like
// an apiserver that just restarted: every read makes a Decrypt call. Reads
// report stale when the object's key_id is not currentKeyID.
func FreshReader(svc kmsservice.Service, currentKeyID string) value.Transformer {
	return kmsv2.NewEnvelopeTransformer(svc, "plugintest", func() (kmsv2.State, error) {
		return kmsv2.State{EncryptedObjectKeyID: currentKeyID, EncryptedObjectEncryptedDEKSourceType: kmstypes.EncryptedDEKSourceType_HKDF_SHA256_XNONCE_AES_GCM_SEED}, nil
	}, "apiserver-restarted")
}

// Contract checks the KMS v2 contract for p through the real socket with
// the apiserver's client: Status fields, Encrypt's key_id equal to Status's,
// a seed through Encrypt and Decrypt, an object written by one apiserver
// read by a restarted one, and tampered or foreign data refused.
//
// Under GODEBUG=fips140=only the object part (subtest Envelope) skips:
// kube-apiserver's envelope transformer uses GCM at caller-chosen nonces,
// which that mode refuses. Everything the plugin itself does still runs.
func Contract(t *testing.T, p providers.Provider) {
	t.Helper()
	srv := Serve(t, p, time.Second)
	svc := Client(t, srv)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	st, err := svc.Status(ctx)
	if err != nil {
		t.Fatalf("Status: %v", err)
	}
	if st.Version != "v2" || st.Healthz != "ok" {
		t.Fatalf("Status = version %q healthz %q, want v2 and ok", st.Version, st.Healthz)
	}
	if code, err := kmsv2.ValidateKeyID(st.KeyID); err != nil {
		t.Fatalf("Status key_id rejected by the apiserver's validation (%s): %v", code, err)
	}

	// A seed through Encrypt and back through Decrypt, with the apiserver's
	// gRPC client only: the plugin's own path, which runs in every mode.
	seed := make([]byte, 32)
	if _, err := rand.Read(seed); err != nil {
		t.Fatal(err)
	}
	enc, err := svc.Encrypt(ctx, "uid-roundtrip", seed)
	if err != nil {
		t.Fatalf("Encrypt: %v", err)
	}
	if enc.KeyID != st.KeyID {
		t.Fatalf("Encrypt stamped key_id %q, Status reports %q", enc.KeyID, st.KeyID)
	}
	if bytes.Contains(enc.Ciphertext, seed) {
		t.Fatal("ciphertext contains the seed")
	}
	dec, err := svc.Decrypt(ctx, "uid-roundtrip", &kmsservice.DecryptRequest{KeyID: enc.KeyID, Ciphertext: enc.Ciphertext, Annotations: enc.Annotations})
	if err != nil {
		t.Fatalf("Decrypt: %v", err)
	}
	if !bytes.Equal(dec, seed) {
		t.Fatal("Decrypt returned another seed")
	}

	t.Run("Envelope", func(t *testing.T) {
		fipstest.SkipIfOnly(t, "kube-apiserver's envelope transformer (kmsv2.GenerateTransformer) builds its DEK cipher with cipher.NewGCM, GCM at caller-chosen nonces")
		tr, err := NewTransformer(ctx, svc, "uid-contract")
		if err != nil {
			t.Fatalf("GenerateTransformer (Encrypt through the apiserver's code): %v", err)
		}
		if tr.KeyID != st.KeyID {
			t.Fatalf("Encrypt stamped key_id %q, Status reports %q", tr.KeyID, st.KeyID)
		}
		secret := []byte("top-secret-value-" + rand.Text())
		dataCtx := value.DefaultContext(etcdlayout.Default().Key("secrets", "default", "contract"))
		stored, err := tr.TransformToStorage(ctx, secret, dataCtx)
		if err != nil {
			t.Fatalf("TransformToStorage: %v", err)
		}
		if bytes.Contains(stored, secret) {
			t.Fatal("stored bytes contain the plaintext")
		}
		got, stale, err := FreshReader(svc, st.KeyID).TransformFromStorage(ctx, stored, dataCtx)
		if err != nil {
			t.Fatalf("TransformFromStorage in a restarted apiserver (Decrypt through the socket): %v", err)
		}
		if !bytes.Equal(got, secret) {
			t.Fatalf("read back %q, want %q", got, secret)
		}
		if stale {
			t.Fatal("object written under the current key reads as stale")
		}
		// Another object's authenticated data must not open this one.
		if _, _, err := FreshReader(svc, st.KeyID).TransformFromStorage(ctx, stored, value.DefaultContext(etcdlayout.Default().Key("secrets", "default", "other"))); err == nil {
			t.Fatal("object read under another etcd key")
		}
	})

	// Direct Decrypt calls with bad input: errors, never a panic or a seed.
	obj := mustEncrypt(ctx, t, svc)
	bad := []struct {
		name string
		req  kmsservice.DecryptRequest
	}{
		{"tampered", kmsservice.DecryptRequest{KeyID: obj.KeyID, Ciphertext: flip(obj.Ciphertext)}},
		{"random", kmsservice.DecryptRequest{KeyID: obj.KeyID, Ciphertext: []byte(rand.Text())}},
		{"unknown key_id", kmsservice.DecryptRequest{KeyID: obj.KeyID + "x", Ciphertext: obj.Ciphertext}},
		{"empty key_id", kmsservice.DecryptRequest{Ciphertext: obj.Ciphertext}},
		{"empty ciphertext", kmsservice.DecryptRequest{KeyID: obj.KeyID}},
		{"oversized ciphertext", kmsservice.DecryptRequest{KeyID: obj.KeyID, Ciphertext: make([]byte, 1025)}},
		{"bad annotation", kmsservice.DecryptRequest{KeyID: obj.KeyID, Ciphertext: obj.Ciphertext, Annotations: map[string][]byte{"nodots": nil}}},
	}
	for _, b := range bad {
		t.Run("Decrypt/"+b.name, func(t *testing.T) {
			if pt, err := svc.Decrypt(ctx, "uid-bad", &b.req); err == nil {
				t.Fatalf("Decrypt accepted %s input and returned %d bytes", b.name, len(pt))
			}
		})
	}
	if _, err := svc.Encrypt(ctx, "uid-short", []byte("short")); err == nil {
		t.Fatal("Encrypt accepted a plaintext that is not a 32-byte seed")
	}
	// The service must still be healthy after all that.
	if st, err := svc.Status(ctx); err != nil || st.Healthz != "ok" {
		t.Fatalf("Status after bad input: %+v, %v", st, err)
	}
}

func mustEncrypt(ctx context.Context, t *testing.T, svc kmsservice.Service) *kmsservice.EncryptResponse {
	t.Helper()
	seed := make([]byte, 32)
	_, _ = rand.Read(seed)
	r, err := svc.Encrypt(ctx, "uid-direct", seed)
	if err != nil {
		t.Fatalf("Encrypt: %v", err)
	}
	return r
}

func flip(b []byte) []byte {
	c := bytes.Clone(b)
	c[len(c)/2] ^= 0x80
	return c
}
