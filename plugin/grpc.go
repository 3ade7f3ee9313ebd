package plugin

import (
	"context"
	"runtime/debug"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/stats"
	"google.golang.org/grpc/status"
	kmsapi "k8s.io/kms/apis/v2"

	"github.com/kms-v2/kms-plugin/providers"
)

// maxRequestSize is the largest request message the plugin reads, sized
// to the KMS v2 API (k8s.io/kms/apis/v2/api.proto), which bounds every
// field kube-apiserver sends. A Decrypt carries a key_id of at most 1 KiB,
// a ciphertext of at most 1 KiB, annotations of at most 32 KiB (keys and
// values) and a uid (a 36-byte UUID); an Encrypt, a 32-byte seed and a
// uid; a Status, nothing. That is under 35 KiB of field bytes; protobuf
// adds a few bytes of framing per field and per annotation, and 64 KiB
// leaves room for it and for a long uid. (Annotations packed into
// thousands of 4-byte keys could frame past it, but the apiserver sends
// back only the annotations this plugin's Encrypt returned, and it
// returns none.)
//
// gRPC's default is 4 MiB, read whole before the service can refuse it:
// 100 clients sending 4 MB Decrypts took the plugin from 21 MiB to 677 MiB
// and wrote 300 MB of logs. Over this limit gRPC answers ResourceExhausted
// from the 5-byte length prefix, before reading or allocating the message.
const maxRequestSize = 64 << 10

// maxStreams caps concurrent requests on one connection (gRPC's default
// is unlimited). kube-apiserver sends every call of one KMS provider on
// one connection, and a stream past the cap waits in its client until one
// ends, it does not fail; so the cap costs the apiserver nothing at any
// realistic concurrency (requests take microseconds to milliseconds), and
// it bounds what one connection can hold to 128 handlers with at most
// maxRequestSize each, 8 MiB. The socket's permissions, not a limit here,
// decide who may open connections at all.
const maxStreams = 128

// flowWindow is the HTTP/2 flow-control window, per stream and per
// connection: how many request bytes a client may have in flight before
// the plugin reads them. Set, it also turns off gRPC's dynamic window,
// which grows toward 16 MiB per connection on a fast link; no request is
// bigger than maxRequestSize, so a larger window buys nothing here.
const flowWindow = maxRequestSize

// NewGRPCServer returns a gRPC server with the service registered behind
// panic recovery, metrics and request logging interceptors, and with the
// request size, stream and window limits above. k8s.io/kms's own NewGRPCService
// adds none of these, which is why the plugin builds its own.
func NewGRPCServer(s *Service) *grpc.Server {
	srv := grpc.NewServer(
		grpc.MaxRecvMsgSize(maxRequestSize),
		grpc.MaxConcurrentStreams(maxStreams),
		grpc.InitialWindowSize(flowWindow),
		grpc.InitialConnWindowSize(flowWindow),
		grpc.StatsHandler(refusedRequests{s}),
		grpc.ChainUnaryInterceptor(s.metricsInterceptor, s.logInterceptor, s.recoverInterceptor),
	)
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

// rpcTag follows one request from gRPC's stats handler to the
// interceptors.
type rpcTag struct {
	method string
	// seen is set once the interceptors run: they count and log it.
	seen atomic.Bool
}

type rpcTagKey struct{}

// refusedRequests counts and logs the requests gRPC refuses before the
// service sees them (a message over maxRequestSize, or one that does not
// decode): the interceptors never run for those, and a flood of them
// would otherwise show in neither metrics nor logs.
type refusedRequests struct{ s *Service }

// TagRPC marks the request so HandleRPC can tell whether the interceptors
// saw it.
func (h refusedRequests) TagRPC(ctx context.Context, info *stats.RPCTagInfo) context.Context {
	return context.WithValue(ctx, rpcTagKey{}, &rpcTag{method: methodName(info.FullMethodName)})
}

// HandleRPC counts and logs a request that ended in an error the
// interceptors never saw.
func (h refusedRequests) HandleRPC(ctx context.Context, st stats.RPCStats) {
	end, ok := st.(*stats.End)
	if !ok || end.Error == nil {
		return
	}
	tag, _ := ctx.Value(rpcTagKey{}).(*rpcTag)
	if tag == nil || tag.seen.Load() {
		return
	}
	code := status.Code(end.Error)
	// Only registered methods reach here, so the label stays bounded.
	h.s.m.requests.WithLabelValues(tag.method, code.String()).Inc()
	// Whatever the code (an undecodable message is Internal), the request
	// was at fault: its line is on the client budget.
	h.s.logLine(hclog.Warn, h.s.clientLogs, "kms request refused before decoding",
		[]any{"method", tag.method, "code", code.String(), "error", status.Convert(end.Error).Message()})
}

// TagConn is a no-op: only requests are tracked.
func (refusedRequests) TagConn(ctx context.Context, _ *stats.ConnTagInfo) context.Context {
	return ctx
}

// HandleConn is a no-op: only requests are tracked.
func (refusedRequests) HandleConn(context.Context, stats.ConnStats) {}

func (s *Service) metricsInterceptor(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if tag, _ := ctx.Value(rpcTagKey{}).(*rpcTag); tag != nil {
		tag.seen.Store(true)
	}
	start := time.Now()
	resp, err := handler(ctx, req)
	m := methodName(info.FullMethod)
	s.m.requests.WithLabelValues(m, status.Code(err).String()).Inc()
	s.m.requestDuration.WithLabelValues(m).Observe(time.Since(start).Seconds())
	return resp, err
}

// logInterceptor logs each request with the apiserver's uid, the key_id and
// the outcome: never plaintext, ciphertext or annotations' values. The uid
// and an oversized key_id are clipped to logClip bytes, and failures are
// rate-limited (see logLine).
func (s *Service) logInterceptor(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	start := time.Now()
	resp, err := handler(ctx, req)
	m := methodName(info.FullMethod)
	if m == "Status" && err == nil {
		return resp, nil // polled constantly; changes are logged by noteKeyID
	}
	code := status.Code(err)
	args := []any{"method", m, "code", code.String(), "duration_seconds", time.Since(start).Seconds()}
	switch r := req.(type) {
	case *kmsapi.EncryptRequest:
		args = append(args, "uid", clip(r.GetUid(), logClip))
		if e, ok := resp.(*kmsapi.EncryptResponse); ok && e != nil {
			args = append(args, "key_id", e.GetKeyId())
		}
	case *kmsapi.DecryptRequest:
		args = append(args, "uid", clip(r.GetUid(), logClip), "key_id", requestKeyID(r.GetKeyId()))
	}
	if err != nil {
		args = append(args, "error", status.Convert(err).Message())
	}
	level, budget := s.logClass(code)
	s.logLine(level, budget, "kms request", args)
	return resp, err
}

// requestKeyID is a request's key_id as logged: whole up to the API's
// 1024 bytes (a key_id is public, and operators match it), clipped past
// that (the request is refused for it anyway).
func requestKeyID(id string) string {
	if len(id) > providers.MaxKeyIDSize {
		return clip(id, logClip)
	}
	return id
}

// logClass is the level and budget of a line about a request that ended
// with code: DEBUG and unbudgeted when it succeeded; otherwise WARN (ERROR
// for Internal) on the client or the failure budget.
func (s *Service) logClass(code codes.Code) (hclog.Level, *logBudget) {
	switch {
	case code == codes.OK:
		return hclog.Debug, nil
	case clientCaused(code):
		return hclog.Warn, s.clientLogs
	case code == codes.Internal:
		return hclog.Error, s.failureLogs
	}
	return hclog.Warn, s.failureLogs
}

// logLine writes a line at level unless budget (nil: none) is spent. A
// line over its budget is dropped and counted; the next one written
// carries how many were dropped before it.
func (s *Service) logLine(level hclog.Level, budget *logBudget, msg string, args []any) {
	if level < s.log.GetLevel() {
		return // would not be written: spends no budget
	}
	if budget != nil {
		ok, dropped := budget.take()
		if !ok {
			return
		}
		if dropped > 0 {
			args = append(args, "dropped_before", dropped)
		}
	}
	s.log.Log(level, msg, args...)
}

// recoverInterceptor turns a panic into codes.Internal so one bad request
// cannot take down the plugin every apiserver depends on. The panic's line
// (with its stack) is within the failure budget: a request that panics
// every time must not turn into a stack trace per request.
func (s *Service) recoverInterceptor(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (resp any, err error) {
	defer func() {
		if r := recover(); r != nil {
			s.logLine(hclog.Error, s.failureLogs, "panic in request handler",
				[]any{"method", info.FullMethod, "panic", r, "stack", string(debug.Stack())})
			resp, err = nil, status.Errorf(codes.Internal, "%s: internal error", methodName(info.FullMethod))
		}
	}()
	return handler(ctx, req)
}
