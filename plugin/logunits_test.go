package plugin

import (
	"context"
	"encoding/json"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"google.golang.org/grpc"
	kmsapi "k8s.io/kms/apis/v2"
)

// unitless are the numeric log fields that are counts, not measures.
var unitless = map[string]bool{"dropped_before": true, "failed_binds": true, "versions": true}

// TestJSONLogDurationsHaveUnits: with log.format json, a duration is
// written as float seconds under a key ending in _seconds (the rule of
// docs/observability.md), never as hclog's bare integer nanoseconds.
// Every numeric field of every line must be a known count or carry the
// unit in its key.
func TestJSONLogDurationsHaveUnits(t *testing.T) {
	tests := []struct {
		name    string
		run     func(t *testing.T, s *Service)
		wantKey string
	}{
		{name: "request line", run: logRequests, wantKey: "duration_seconds"},
		{name: "listener bind retry", run: failBind, wantKey: "retry_in_seconds"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var logs lockedBuffer
			s := jsonService(t, &logs)
			tt.run(t, s)
			found := false
			for _, line := range strings.Split(strings.TrimSpace(logs.String()), "\n") {
				var fields map[string]any
				if err := json.Unmarshal([]byte(line), &fields); err != nil {
					t.Fatalf("not a JSON line: %q: %v", line, err)
				}
				for k, v := range fields {
					if _, isNum := v.(float64); isNum && !unitless[k] && !strings.HasSuffix(k, "_seconds") {
						t.Errorf("field %q = %v has no unit (want float seconds under %s_seconds) in %s", k, v, k, line)
					}
				}
				if _, ok := fields[tt.wantKey].(float64); ok {
					found = true
				}
			}
			if !found {
				t.Errorf("no line carries %s as a number:\n%s", tt.wantKey, logs.String())
			}
		})
	}
}

// jsonService is a Service logging JSON lines at trace level to w.
func jsonService(t *testing.T, w io.Writer) *Service {
	t.Helper()
	s, err := New(Options{
		Provider: &fakeProvider{keyID: "fake:k1"},
		Logger:   hclog.New(&hclog.LoggerOptions{Level: hclog.Trace, JSONFormat: true, Output: w}),
		Metrics:  NewMetrics(prometheus.NewRegistry()),
	})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// logRequests sends a good Encrypt and a bad Decrypt through the request
// log.
func logRequests(t *testing.T, s *Service) {
	info := func(m string) *grpc.UnaryServerInfo {
		return &grpc.UnaryServerInfo{FullMethod: "/v2.KeyManagementService/" + m}
	}
	ctx := context.Background()
	if _, err := s.logInterceptor(ctx, &kmsapi.EncryptRequest{Plaintext: make([]byte, 32), Uid: "u1"}, info("Encrypt"), func(ctx context.Context, req any) (any, error) {
		return s.Encrypt(ctx, req.(*kmsapi.EncryptRequest))
	}); err != nil {
		t.Fatal(err)
	}
	_, _ = s.logInterceptor(ctx, &kmsapi.DecryptRequest{KeyId: "fake:k1", Uid: "u2"}, info("Decrypt"), func(ctx context.Context, req any) (any, error) {
		return s.Decrypt(ctx, req.(*kmsapi.DecryptRequest))
	})
}

// failBind runs the metrics listener on a taken port until one failed
// bind is counted.
func failBind(t *testing.T, s *Service) {
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); s.ServeMetrics(ctx, taken.Addr().String(), prometheus.NewRegistry()) }()
	waitFor(t, 5*time.Second, "a bind error counted", func() bool { return testutil.ToFloat64(s.m.metricsBindErrs) >= 1 })
	cancel()
	<-done
}
