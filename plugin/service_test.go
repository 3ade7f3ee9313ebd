package plugin

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	kmsapi "k8s.io/kms/apis/v2"

	"github.com/kms-v2/kms-plugin/providers"
)

// fakeProvider is built from function fields so each test sets only the
// behaviour it needs; unset fields behave like a healthy provider.
type fakeProvider struct {
	encrypt func([]byte) (providers.Sealed, error)
	decrypt func(providers.Sealed) ([]byte, error)
	check   func() error
	keyID   string
	checks  atomic.Int64
}

func (f *fakeProvider) Encrypt(_ context.Context, pt []byte) (providers.Sealed, error) {
	if f.encrypt != nil {
		return f.encrypt(pt)
	}
	return providers.Sealed{KeyID: f.keyID, Ciphertext: bytes.Repeat([]byte{1}, 40)}, nil
}

func (f *fakeProvider) Decrypt(_ context.Context, s providers.Sealed) ([]byte, error) {
	if f.decrypt != nil {
		return f.decrypt(s)
	}
	return make([]byte, 32), nil
}

func (f *fakeProvider) PrimaryKeyID(context.Context) (string, error) { return f.keyID, nil }

// Owns claims every key_id: a fake is the only provider of its service.
func (f *fakeProvider) Owns(string) bool { return true }

func (f *fakeProvider) Check(context.Context) error {
	f.checks.Add(1)
	if f.check != nil {
		return f.check()
	}
	return nil
}

func (f *fakeProvider) Close() error { return nil }

func newService(t *testing.T, p providers.Provider, logs *bytes.Buffer) *Service {
	t.Helper()
	if logs == nil {
		logs = &bytes.Buffer{}
	}
	return newServiceTo(t, p, logs)
}

// newServiceTo is newService logging to any writer.
func newServiceTo(t *testing.T, p providers.Provider, logs io.Writer) *Service {
	t.Helper()
	s, err := New(Options{
		Provider:      p,
		Logger:        hclog.New(&hclog.LoggerOptions{Level: hclog.Trace, Output: logs}),
		Metrics:       NewMetrics(prometheus.NewRegistry()),
		CheckInterval: time.Hour, RefreshInterval: time.Hour, MaxStaleness: 2 * time.Hour,
	})
	if err != nil {
		t.Fatal(err)
	}
	s.Check(context.Background())
	return s
}

func TestStatusMakesNoProviderCall(t *testing.T) {
	p := &fakeProvider{keyID: "fake:k1"}
	s := newService(t, p, nil)
	before := p.checks.Load()
	for i := 0; i < 1000; i++ {
		r, err := s.Status(context.Background(), &kmsapi.StatusRequest{})
		if err != nil {
			t.Fatal(err)
		}
		if r.Version != "v2" || r.Healthz != "ok" || r.KeyId != "fake:k1" {
			t.Fatalf("Status = %+v, want v2/ok/fake:k1", r)
		}
	}
	if got := p.checks.Load() - before; got != 0 {
		t.Fatalf("1000 Status calls made %d provider checks, want 0", got)
	}
}

func TestHealthFollowsBackgroundCheck(t *testing.T) {
	var failing atomic.Bool
	p := &fakeProvider{keyID: "fake:k1", check: func() error {
		if failing.Load() {
			return fmt.Errorf("vault said no: %w", providers.ErrUnavailable)
		}
		return nil
	}}
	s := newService(t, p, nil)
	h := HealthHandler(s, prometheus.NewRegistry())
	get := func(path string) int {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path, nil))
		return rec.Code
	}
	if got := get("/readyz"); got != http.StatusOK {
		t.Fatalf("/readyz while healthy = %d, want 200", got)
	}
	failing.Store(true)
	s.Check(context.Background())
	r, err := s.Status(context.Background(), &kmsapi.StatusRequest{})
	if err != nil {
		t.Fatalf("Status while the backend is down must still answer (writes keep working): %v", err)
	}
	if r.Healthz == "ok" || !strings.Contains(r.Healthz, "unavailable") || r.KeyId != "fake:k1" {
		t.Fatalf("Status while unhealthy = %+v, want healthz naming the class and the key_id", r)
	}
	if strings.Contains(r.Healthz, "vault said no") {
		t.Fatalf("healthz %q carries backend error text; it must carry only the class", r.Healthz)
	}
	if got := get("/readyz"); got != http.StatusServiceUnavailable {
		t.Fatalf("/readyz while unhealthy = %d, want 503", got)
	}
	if got := get("/livez"); got != http.StatusOK {
		t.Fatalf("/livez while unhealthy = %d, want 200", got)
	}
	failing.Store(false)
	s.Check(context.Background())
	if ok, why := s.Healthy(); !ok {
		t.Fatalf("after recovery Healthy = false (%s)", why)
	}
}

func TestStaleHealthIsUnhealthy(t *testing.T) {
	s := newService(t, &fakeProvider{keyID: "fake:k1"}, nil)
	if got := s.healthz(time.Now().Add(3 * time.Hour)); got == healthOK {
		t.Fatalf("healthz 3h after the last check = %q, want unhealthy (MaxStaleness 2h)", got)
	}
}

func TestErrorCodes(t *testing.T) {
	tests := []struct {
		name string
		err  error
		want codes.Code
	}{
		{"not found", providers.ErrKeyNotFound, codes.NotFound},
		{"disabled", providers.ErrKeyDisabled, codes.FailedPrecondition},
		{"bad ciphertext", providers.ErrInvalidCiphertext, codes.InvalidArgument},
		{"unavailable", fmt.Errorf("x: %w", providers.ErrUnavailable), codes.Unavailable},
		{"denied", providers.ErrPermissionDenied, codes.PermissionDenied},
		{"deadline", context.DeadlineExceeded, codes.DeadlineExceeded},
		{"unknown", errors.New("boom"), codes.Internal},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newService(t, &fakeProvider{keyID: "fake:k1", decrypt: func(providers.Sealed) ([]byte, error) { return nil, tt.err }}, nil)
			_, err := s.Decrypt(context.Background(), &kmsapi.DecryptRequest{KeyId: "fake:k1", Ciphertext: []byte{1}})
			if got := status.Code(err); got != tt.want {
				t.Fatalf("code = %v, want %v (err %v)", got, tt.want, err)
			}
		})
	}
}

func TestRepliesTheApiserverWouldRejectAreNeverSent(t *testing.T) {
	tests := []struct {
		name   string
		sealed providers.Sealed
	}{
		{"empty key_id", providers.Sealed{Ciphertext: []byte{1}}},
		{"long key_id", providers.Sealed{KeyID: strings.Repeat("k", 1025), Ciphertext: []byte{1}}},
		{"empty ciphertext", providers.Sealed{KeyID: "fake:k1"}},
		{"long ciphertext", providers.Sealed{KeyID: "fake:k1", Ciphertext: make([]byte, 1025)}},
		{"bad annotation key", providers.Sealed{KeyID: "fake:k1", Ciphertext: []byte{1}, Annotations: map[string][]byte{"Bad": nil}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newService(t, &fakeProvider{keyID: "fake:k1", encrypt: func([]byte) (providers.Sealed, error) { return tt.sealed, nil }}, nil)
			_, err := s.Encrypt(context.Background(), &kmsapi.EncryptRequest{Plaintext: make([]byte, 32)})
			if got := status.Code(err); got != codes.Internal {
				t.Fatalf("code = %v, want Internal", got)
			}
		})
	}
}

func TestPanicIsRecovered(t *testing.T) {
	s := newService(t, &fakeProvider{keyID: "fake:k1", decrypt: func(providers.Sealed) ([]byte, error) { panic("bug") }}, nil)
	_, err := s.recoverInterceptor(context.Background(), &kmsapi.DecryptRequest{}, &grpc.UnaryServerInfo{FullMethod: "/v2.KeyManagementService/Decrypt"}, func(ctx context.Context, req any) (any, error) {
		return s.Decrypt(ctx, &kmsapi.DecryptRequest{KeyId: "fake:k1", Ciphertext: []byte{1}})
	})
	if got := status.Code(err); got != codes.Internal {
		t.Fatalf("code after panic = %v, want Internal", got)
	}
}

// TestLogsCarryNoSecrets logs at trace level through every path and checks
// that neither the seed nor the ciphertext appears in any encoding.
func TestLogsCarryNoSecrets(t *testing.T) {
	seed := []byte("0123456789abcdef0123456789ABCDEF")
	ct := []byte("CIPHERTEXT-CIPHERTEXT-CIPHERTEXT")
	var logs bytes.Buffer
	p := &fakeProvider{keyID: "fake:k1",
		encrypt: func([]byte) (providers.Sealed, error) { return providers.Sealed{KeyID: "fake:k1", Ciphertext: ct}, nil },
		decrypt: func(providers.Sealed) ([]byte, error) { return nil, providers.ErrInvalidCiphertext },
	}
	s := newService(t, p, &logs)
	info := func(m string) *grpc.UnaryServerInfo {
		return &grpc.UnaryServerInfo{FullMethod: "/v2.KeyManagementService/" + m}
	}
	_, _ = s.logInterceptor(context.Background(), &kmsapi.EncryptRequest{Plaintext: seed, Uid: "uid-1"}, info("Encrypt"), func(ctx context.Context, req any) (any, error) {
		return s.Encrypt(ctx, req.(*kmsapi.EncryptRequest))
	})
	_, _ = s.logInterceptor(context.Background(), &kmsapi.DecryptRequest{Ciphertext: ct, KeyId: "fake:k1", Uid: "uid-2"}, info("Decrypt"), func(ctx context.Context, req any) (any, error) {
		return s.Decrypt(ctx, req.(*kmsapi.DecryptRequest))
	})
	out := logs.String()
	if !strings.Contains(out, "uid-1") || !strings.Contains(out, "uid-2") {
		t.Fatalf("logs lack the request uids:\n%s", out)
	}
	for _, secret := range [][]byte{seed, ct} {
		for _, enc := range []string{string(secret), hex.EncodeToString(secret), base64.StdEncoding.EncodeToString(secret)} {
			if strings.Contains(out, enc) {
				t.Fatalf("logs contain secret bytes (%q):\n%s", enc, out)
			}
		}
	}
}
