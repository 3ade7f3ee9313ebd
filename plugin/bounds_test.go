package plugin

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"golang.org/x/time/rate"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	kmsapi "k8s.io/kms/apis/v2"

	"github.com/kms-v2/kms-plugin/providers"
)

func TestClip(t *testing.T) {
	tests := []struct {
		name string
		in   string
		n    int
		want string
	}{
		{"short is whole", "uid-1", 64, "uid-1"},
		{"exactly n is whole", strings.Repeat("a", 64), 64, strings.Repeat("a", 64)},
		{"long is cut and its length noted", strings.Repeat("a", 3<<20), 64, strings.Repeat("a", 64) + "…(3145728 bytes)"},
		{"cut backs off to a UTF-8 boundary", "abcé" + strings.Repeat("x", 10), 4, "abc…(15 bytes)"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := clip(tt.in, tt.n); got != tt.want {
				t.Fatalf("clip(%d bytes, %d) = %q, want %q", len(tt.in), tt.n, got, tt.want)
			}
		})
	}
}

func TestLogBudget(t *testing.T) {
	dropped := prometheus.NewCounter(prometheus.CounterOpts{Name: "dropped"})
	b := newLogBudget(0, 3, dropped) // a burst of 3, never refilled
	for i := range 3 {
		if ok, before := b.take(); !ok || before != 0 {
			t.Fatalf("take %d within the burst = %v, %d; want true, 0", i, ok, before)
		}
	}
	for i := range 5 {
		if ok, _ := b.take(); ok {
			t.Fatalf("take %d past the burst allowed a line", i)
		}
	}
	if got, want := testutil.ToFloat64(dropped), 5.0; got != want {
		t.Fatalf("dropped counter = %v, want %v", got, want)
	}
	b.lim.SetLimit(rate.Inf)
	if ok, before := b.take(); !ok || before != 5 {
		t.Fatalf("first take after a refill = %v, %d; want true, 5 (the lines dropped before it)", ok, before)
	}
	if ok, before := b.take(); !ok || before != 0 {
		t.Fatalf("second take after a refill = %v, %d; want true, 0", ok, before)
	}
}

// TestRequestLogsAreBounded floods the log interceptor with bad requests
// carrying a 3 MiB uid: few lines are written, none carries more than
// logClip bytes of the uid, the rest are counted as dropped, and a
// provider failure still gets its line afterwards.
func TestRequestLogsAreBounded(t *testing.T) {
	var logs bytes.Buffer
	failing := false
	p := &fakeProvider{keyID: "fake:k1", decrypt: func(providers.Sealed) ([]byte, error) {
		if failing {
			return nil, fmt.Errorf("vault down: %w", providers.ErrUnavailable)
		}
		return nil, providers.ErrInvalidCiphertext
	}}
	s := newService(t, p, &logs)
	logs.Reset()
	info := &grpc.UnaryServerInfo{FullMethod: "/v2.KeyManagementService/Decrypt"}
	call := func(req *kmsapi.DecryptRequest) error {
		_, err := s.logInterceptor(context.Background(), req, info, func(ctx context.Context, r any) (any, error) {
			return s.Decrypt(ctx, r.(*kmsapi.DecryptRequest))
		})
		return err
	}
	const flood = 1000
	start := time.Now()
	bigUID := strings.Repeat("u", 3<<20)
	for range flood {
		if err := call(&kmsapi.DecryptRequest{Uid: bigUID, KeyId: "fake:k1", Ciphertext: []byte{1}}); status.Code(err) != codes.InvalidArgument {
			t.Fatalf("bad ciphertext: %v, want InvalidArgument", err)
		}
	}
	longKeyID := strings.Repeat("k", 4096)
	_ = call(&kmsapi.DecryptRequest{Uid: "uid-x", KeyId: longKeyID, Ciphertext: []byte{1}})

	elapsed := time.Since(start)
	lines := strings.Count(logs.String(), "\n")
	dropped := testutil.ToFloat64(s.m.logsDropped.WithLabelValues(reasonRateLimited))
	t.Logf("%d bad requests: %d lines (%d bytes), %v dropped", flood+1, lines, logs.Len(), dropped)
	if budget := clientLogBurst + int(clientLogRate*elapsed.Seconds()) + 1; lines > budget {
		t.Errorf("%d bad requests in %v wrote %d lines, want at most %d (burst %d, then %d/s)", flood+1, elapsed, lines, budget, clientLogBurst, clientLogRate)
	}
	if got, want := int(dropped)+lines, flood+1; got != want {
		t.Errorf("lines written (%d) + dropped (%v) = %d, want every request accounted for (%d)", lines, dropped, got, want)
	}
	if strings.Contains(logs.String(), strings.Repeat("u", logClip+1)) || strings.Contains(logs.String(), strings.Repeat("k", logClip+1)) {
		t.Errorf("a log line carries more than %d bytes of a client's uid or key_id", logClip)
	}
	if !strings.Contains(logs.String(), strings.Repeat("u", logClip)+"…(3145728 bytes)") {
		t.Errorf("logs lack the clipped uid with its length:\n%.2000s", logs.String())
	}

	// The client budget is spent; a backend failure still gets its line.
	logs.Reset()
	failing = true
	if err := call(&kmsapi.DecryptRequest{Uid: "uid-outage", KeyId: "fake:k1", Ciphertext: []byte{1}}); status.Code(err) != codes.Unavailable {
		t.Fatalf("backend down: %v, want Unavailable", err)
	}
	if !strings.Contains(logs.String(), "uid-outage") {
		t.Errorf("after a flood of bad requests, a backend failure was not logged: %q", logs.String())
	}
}

// serveGRPC serves s through NewGRPCServer on a temporary socket and
// returns a client that may send up to 8 MiB.
func serveGRPC(t *testing.T, s *Service) kmsapi.KeyManagementServiceClient {
	t.Helper()
	sock := filepath.Join(shortDir(t), "kms.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	gs := NewGRPCServer(s)
	go func() { _ = gs.Serve(ln) }()
	t.Cleanup(gs.Stop)
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallSendMsgSize(8<<20)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return kmsapi.NewKeyManagementServiceClient(conn)
}

// TestRequestSizeLimit: the largest request the KMS v2 API allows reaches
// the provider; one over maxRequestSize is ResourceExhausted before it is
// decoded, and is still counted and logged.
func TestRequestSizeLimit(t *testing.T) {
	var logs lockedBuffer
	var reached atomic.Int64
	s := newServiceTo(t, &fakeProvider{keyID: "fake:k1", decrypt: func(providers.Sealed) ([]byte, error) {
		reached.Add(1)
		return make([]byte, 32), nil
	}}, &logs)
	c := serveGRPC(t, s)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	// 32 KiB of annotations in 8 entries, key_id and ciphertext at 1 KiB.
	annotations := map[string][]byte{}
	for i := range 8 {
		key := fmt.Sprintf("k%d.example.com", i)
		annotations[key] = make([]byte, 4<<10-len(key))
	}
	largest := &kmsapi.DecryptRequest{
		Uid:         "0b7e9c3a-4a55-4d3e-9f3c-2d6f1d2b6a11",
		KeyId:       "fake:" + strings.Repeat("k", providers.MaxKeyIDSize-len("fake:")),
		Ciphertext:  make([]byte, providers.MaxCiphertextSize),
		Annotations: annotations,
	}
	if err := providers.ValidateAnnotations(annotations); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Decrypt(ctx, largest); err != nil {
		t.Fatalf("the largest request the API allows: %v", err)
	}
	if n := reached.Load(); n != 1 {
		t.Fatalf("the largest request reached the provider %d times, want 1", n)
	}

	over := &kmsapi.DecryptRequest{Uid: strings.Repeat("u", maxRequestSize), KeyId: "fake:k1", Ciphertext: []byte{1}}
	_, err := c.Decrypt(ctx, over)
	if status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("a request over %d bytes: %v, want ResourceExhausted", maxRequestSize, err)
	}
	if reached.Load() != 1 {
		t.Fatal("the oversized request reached the provider")
	}
	// The stats handler runs as the RPC ends, just after the client's answer.
	deadline := time.Now().Add(5 * time.Second)
	for testutil.ToFloat64(s.m.requests.WithLabelValues("Decrypt", "ResourceExhausted")) != 1 {
		if time.Now().After(deadline) {
			t.Fatal(`kms_plugin_requests_total{method="Decrypt",code="ResourceExhausted"} never reached 1`)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if !strings.Contains(logs.String(), "refused before decoding") {
		t.Errorf("the refused request was not logged:\n%s", logs.String())
	}
}

// lockedBuffer is a log sink the server's goroutines write while the test
// reads it.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
