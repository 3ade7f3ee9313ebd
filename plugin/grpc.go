package plugin

import (
	"context"
	"runtime/debug"
	"time"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	kmsapi "k8s.io/kms/apis/v2"
)

// NewGRPCServer returns a gRPC server with the service registered behind
// panic recovery, metrics and request logging interceptors. k8s.io/kms's own
// NewGRPCService adds none of these, which is why the plugin builds its own.
func NewGRPCServer(s *Service) *grpc.Server {
	srv := grpc.NewServer(grpc.ChainUnaryInterceptor(s.metricsInterceptor, s.logInterceptor, s.recoverInterceptor))
	kmsapi.RegisterKeyManagementServiceServer(srv, s)
	return srv
}

// methodName strips the service prefix: "/v2.KeyManagementService/Encrypt"
// becomes "Encrypt".
func methodName(full string) string {
	for i := len(full) - 1; i >= 0; i-- {
		if full[i] == '/' {
			return full[i+1:]
		}
	}
	return full
}

func (s *Service) metricsInterceptor(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	start := time.Now()
	resp, err := handler(ctx, req)
	m := methodName(info.FullMethod)
	s.m.requests.WithLabelValues(m, status.Code(err).String()).Inc()
	s.m.requestDuration.WithLabelValues(m).Observe(time.Since(start).Seconds())
	return resp, err
}

// logInterceptor logs each request with the apiserver's uid, the key_id and
// the outcome: never plaintext, ciphertext or annotations' values.
func (s *Service) logInterceptor(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	start := time.Now()
	resp, err := handler(ctx, req)
	m := methodName(info.FullMethod)
	if m == "Status" && err == nil {
		return resp, err // polled constantly; changes are logged by noteKeyID
	}
	args := []any{"method", m, "code", status.Code(err).String(), "duration", time.Since(start)}
	switch r := req.(type) {
	case *kmsapi.EncryptRequest:
		args = append(args, "uid", r.GetUid())
		if e, ok := resp.(*kmsapi.EncryptResponse); ok && e != nil {
			args = append(args, "key_id", e.GetKeyId())
		}
	case *kmsapi.DecryptRequest:
		args = append(args, "uid", r.GetUid(), "key_id", r.GetKeyId())
	}
	level := hclog.Debug
	if err != nil {
		args = append(args, "error", status.Convert(err).Message())
		level = hclog.Warn
		if status.Code(err) == codes.Internal {
			level = hclog.Error
		}
	}
	s.log.Log(level, "kms request", args...)
	return resp, err
}

// recoverInterceptor turns a panic into codes.Internal so one bad request
// cannot take down the plugin every apiserver depends on.
func (s *Service) recoverInterceptor(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (resp any, err error) {
	defer func() {
		if r := recover(); r != nil {
			s.log.Error("panic in request handler", "method", info.FullMethod, "panic", r, "stack", string(debug.Stack()))
			resp, err = nil, status.Errorf(codes.Internal, "%s: internal error", methodName(info.FullMethod))
		}
	}()
	return handler(ctx, req)
}
