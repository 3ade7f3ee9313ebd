package plugin

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	kmsapi "k8s.io/kms/apis/v2"

	"github.com/kms-v2/kms-plugin/providers"
)

// APIVersion is the only version string kube-apiserver accepts from Status.
const APIVersion = "v2"

// healthOK is the exact Status.healthz value the apiserver treats as healthy.
const healthOK = "ok"

// Options configure a Service.
type Options struct {
	// Provider does the cryptography; required.
	Provider providers.Provider
	// Logger receives structured logs; nil discards them.
	Logger hclog.Logger
	// Metrics, when set, record requests and provider calls.
	Metrics *Metrics
	// CheckInterval is how often Provider.Check runs in the background.
	CheckInterval time.Duration
	// RefreshInterval is how often key state is reloaded, for providers that
	// implement providers.Refresher.
	RefreshInterval time.Duration
	// MaxStaleness bounds how old the last passing check may be while
	// Status still reports "ok".
	MaxStaleness time.Duration
	// CheckTimeout bounds one background check (default 5 s).
	CheckTimeout time.Duration
}

// Service implements the KMS v2 KeyManagementService over a provider. It is
// safe for concurrent use. Run must be running for health to stay fresh.
type Service struct {
	kmsapi.UnimplementedKeyManagementServiceServer

	opts   Options
	p      providers.Provider
	log    hclog.Logger
	m      *Metrics
	health atomic.Pointer[healthState]
	// lastKeyID is the key_id last reported, to log changes once.
	lastKeyID atomic.Pointer[string]
}

// healthState is the result of the last background check.
type healthState struct {
	checked time.Time
	// okAt is when a check last passed; zero if none has.
	okAt time.Time
	// reason is the short error class of the last failure ("" when ok).
	reason string
}

// New returns a Service. Call Check once before serving, so the first
// Status has a health result, then Run in the background.
func New(opts Options) (*Service, error) {
	if opts.Provider == nil {
		return nil, errors.New("plugin: Options.Provider is required")
	}
	if opts.Logger == nil {
		opts.Logger = hclog.NewNullLogger()
	}
	if opts.Metrics == nil {
		opts.Metrics = NewMetrics(nil)
	}
	if opts.CheckInterval <= 0 {
		opts.CheckInterval = 10 * time.Second
	}
	if opts.RefreshInterval <= 0 {
		opts.RefreshInterval = 5 * time.Second
	}
	if opts.MaxStaleness < opts.CheckInterval {
		opts.MaxStaleness = 3 * opts.CheckInterval
	}
	if opts.CheckTimeout <= 0 {
		opts.CheckTimeout = 5 * time.Second
	}
	s := &Service{opts: opts, p: opts.Provider, log: opts.Logger, m: opts.Metrics}
	s.health.Store(&healthState{reason: "not checked yet"})
	return s, nil
}

// Status reports version, health and the current key_id. It makes no call
// to the backend: health comes from the last background check and the
// key_id from the provider's cached state (the same state Encrypt uses).
func (s *Service) Status(ctx context.Context, _ *kmsapi.StatusRequest) (*kmsapi.StatusResponse, error) {
	keyID, err := s.p.PrimaryKeyID(ctx)
	if err != nil {
		return nil, grpcError("status", err)
	}
	if err := validKeyID(keyID); err != nil {
		return nil, status.Errorf(codes.Internal, "status: provider reported an invalid key_id: %v", err)
	}
	s.noteKeyID(keyID)
	return &kmsapi.StatusResponse{Version: APIVersion, Healthz: s.healthz(time.Now()), KeyId: keyID}, nil
}

// healthz is "ok" while the last check passed within MaxStaleness.
func (s *Service) healthz(now time.Time) string {
	h := s.health.Load()
	switch {
	case h.reason != "":
		return "unhealthy: " + h.reason
	case now.Sub(h.okAt) > s.opts.MaxStaleness:
		return fmt.Sprintf("unhealthy: last successful provider check %s ago", now.Sub(h.okAt).Round(time.Second))
	}
	return healthOK
}

// Healthy reports whether Status would say "ok", and why not.
func (s *Service) Healthy() (bool, string) {
	h := s.healthz(time.Now())
	return h == healthOK, h
}

// Encrypt wraps the apiserver's 32-byte seed with the primary key.
func (s *Service) Encrypt(ctx context.Context, req *kmsapi.EncryptRequest) (*kmsapi.EncryptResponse, error) {
	if n := len(req.GetPlaintext()); n != providers.SeedSize {
		return nil, status.Errorf(codes.InvalidArgument, "encrypt: plaintext is %d bytes; KMS v2 sends a %d-byte seed", n, providers.SeedSize)
	}
	start := time.Now()
	sealed, err := s.p.Encrypt(ctx, req.GetPlaintext())
	s.observe("encrypt", start, err)
	if err != nil {
		return nil, grpcError("encrypt", err)
	}
	// Never hand the apiserver a reply it would reject: it would mark the
	// plugin unhealthy, and a bad key_id would be stored next to objects.
	if err := validKeyID(sealed.KeyID); err != nil {
		return nil, status.Errorf(codes.Internal, "encrypt: provider returned an invalid key_id: %v", err)
	}
	if n := len(sealed.Ciphertext); n == 0 || n > providers.MaxCiphertextSize {
		return nil, status.Errorf(codes.Internal, "encrypt: provider returned %d bytes of ciphertext, want 1..%d", n, providers.MaxCiphertextSize)
	}
	if err := providers.ValidateAnnotations(sealed.Annotations); err != nil {
		return nil, status.Errorf(codes.Internal, "encrypt: provider returned invalid annotations: %v", err)
	}
	return &kmsapi.EncryptResponse{Ciphertext: sealed.Ciphertext, KeyId: sealed.KeyID, Annotations: sealed.Annotations}, nil
}

// Decrypt unwraps a seed with the version named by the request's key_id.
func (s *Service) Decrypt(ctx context.Context, req *kmsapi.DecryptRequest) (*kmsapi.DecryptResponse, error) {
	if err := validKeyID(req.GetKeyId()); err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "decrypt: %v", err)
	}
	if n := len(req.GetCiphertext()); n == 0 || n > providers.MaxCiphertextSize {
		return nil, status.Errorf(codes.InvalidArgument, "decrypt: ciphertext is %d bytes, want 1..%d", n, providers.MaxCiphertextSize)
	}
	if err := providers.ValidateAnnotations(req.GetAnnotations()); err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "decrypt: %v", err)
	}
	start := time.Now()
	pt, err := s.p.Decrypt(ctx, providers.Sealed{KeyID: req.GetKeyId(), Ciphertext: req.GetCiphertext(), Annotations: req.GetAnnotations()})
	s.observe("decrypt", start, err)
	if err != nil {
		return nil, grpcError("decrypt", err)
	}
	if len(pt) != providers.SeedSize {
		return nil, status.Errorf(codes.Internal, "decrypt: provider returned %d bytes, want a %d-byte seed", len(pt), providers.SeedSize)
	}
	return &kmsapi.DecryptResponse{Plaintext: pt}, nil
}

func validKeyID(id string) error {
	if id == "" {
		return errors.New("key_id is empty")
	}
	if len(id) > providers.MaxKeyIDSize {
		return fmt.Errorf("key_id is %d bytes, at most %d allowed", len(id), providers.MaxKeyIDSize)
	}
	return nil
}

func (s *Service) observe(op string, start time.Time, err error) {
	s.m.providerOps.WithLabelValues(op).Observe(time.Since(start).Seconds())
	if err != nil {
		s.m.providerErrors.WithLabelValues(op, classify(err).label).Inc()
	}
}

// noteKeyID logs and records a change of the reported key_id.
func (s *Service) noteKeyID(id string) {
	if prev := s.lastKeyID.Load(); prev != nil && *prev == id {
		return
	}
	prev := s.lastKeyID.Swap(&id)
	s.m.setPrimary(providers.HashKeyID(id))
	if prev == nil {
		s.log.Info("serving key", "key_id", id)
	} else if *prev != id {
		s.log.Info("primary key changed", "old_key_id", *prev, "new_key_id", id)
	}
}

// Check runs one provider check (and a key state refresh) now and records
// the result for Status.
func (s *Service) Check(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, s.opts.CheckTimeout)
	defer cancel()
	start := time.Now()
	err := s.p.Check(ctx)
	s.observe("check", start, err)
	prev := s.health.Load()
	next := &healthState{checked: time.Now(), okAt: prev.okAt}
	if err != nil {
		next.reason = classify(err).label
		if prev.reason == "" {
			s.log.Warn("provider check failed; Status now reports unhealthy", "class", next.reason, "error", err)
		}
	} else {
		next.okAt = next.checked
		if prev.reason != "" && !prev.checked.IsZero() {
			s.log.Info("provider check passed again; Status reports ok", "previous", prev.reason)
		}
	}
	s.health.Store(next)
	ok, _ := s.Healthy()
	if ok {
		s.m.healthy.Set(1)
	} else {
		s.m.healthy.Set(0)
	}
	if id, err := s.p.PrimaryKeyID(ctx); err == nil {
		s.noteKeyID(id)
	}
}

// refresh reloads key state once, for providers that support it.
func (s *Service) refresh(ctx context.Context) {
	r, ok := s.p.(providers.Refresher)
	if !ok {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, s.opts.CheckTimeout)
	defer cancel()
	start := time.Now()
	err := r.Refresh(ctx)
	s.observe("refresh", start, err)
	if err != nil {
		s.m.reloads.WithLabelValues("error").Inc()
		s.log.Warn("key state refresh failed; keeping the last good state", "class", classify(err).label, "error", err)
		return
	}
	s.m.reloads.WithLabelValues("ok").Inc()
	if id, err := s.p.PrimaryKeyID(ctx); err == nil {
		s.noteKeyID(id)
	}
}

// Run checks health and refreshes key state in the background until ctx
// ends. Its first check comes after CheckInterval: callers run Check once
// themselves before serving, so Status is truthful from the first request.
func (s *Service) Run(ctx context.Context) {
	check := time.NewTicker(s.opts.CheckInterval)
	defer check.Stop()
	refresh := time.NewTicker(s.opts.RefreshInterval)
	defer refresh.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-check.C:
			s.Check(ctx)
		case <-refresh.C:
			s.refresh(ctx)
		}
	}
}
