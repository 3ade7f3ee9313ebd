package plugin

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	kmsapi "k8s.io/kms/apis/v2"

	"github.com/kms-v2/kms-plugin/providers"
	"github.com/kms-v2/kms-plugin/providers/multi"
)

// APIVersion is the only version string kube-apiserver accepts from Status.
const APIVersion = "v2"

// healthOK is the exact Status.healthz value the apiserver treats as healthy.
const healthOK = "ok"

// Options configure a Service.
type Options struct {
	// Entries are the configured providers in order: the first encrypts
	// and its health is Status's; every entry decrypts what it owns.
	Entries []multi.Entry
	// Provider is the one-entry shorthand of Entries (named "provider"),
	// for callers with a single backend.
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
	// Socket, when set, is checked every CheckInterval (see Socket.Check)
	// before the providers; while it is not served at its path, health is
	// unhealthy whatever the providers say.
	Socket *Socket
}

// Service implements the KMS v2 KeyManagementService over a provider. It is
// safe for concurrent use. Run must be running for health to stay fresh.
type Service struct {
	kmsapi.UnimplementedKeyManagementServiceServer

	opts Options
	p    *multi.Provider
	log  hclog.Logger
	m    *Metrics
	// health holds each entry's last check, in entry order.
	health []atomic.Pointer[healthState]
	// socketProblem is why the last socket check failed ("" when it passed).
	socketProblem atomic.Pointer[string]
	// lastKeyID is the key_id last reported, to log changes once.
	lastKeyID atomic.Pointer[string]
	// clientLogs and failureLogs bound request log lines: those about
	// bad requests, and those about the plugin's or backend's failures.
	clientLogs, failureLogs *logBudget
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
	if len(opts.Entries) == 0 && opts.Provider != nil {
		opts.Entries = []multi.Entry{{Name: "provider", Scope: providers.ScopeShared, Provider: opts.Provider}}
	}
	router, err := multi.New(context.Background(), opts.Entries)
	if err != nil {
		return nil, fmt.Errorf("plugin: %w", err)
	}
	if opts.Logger == nil {
		opts.Logger = hclog.NewNullLogger()
	}
	if opts.Metrics == nil {
		opts.Metrics = NewMetrics(nil)
	}
	if opts.CheckInterval <= 0 {
		opts.CheckInterval = 5 * time.Second
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
	s := &Service{opts: opts, p: router, log: opts.Logger, m: opts.Metrics}
	s.m.watch(opts.Entries)
	dropped := s.m.logsDropped.WithLabelValues(reasonRateLimited)
	s.clientLogs = newLogBudget(clientLogRate, clientLogBurst, dropped)
	s.failureLogs = newLogBudget(failureLogRate, failureLogBurst, dropped)
	s.health = make([]atomic.Pointer[healthState], len(opts.Entries))
	for i := range s.health {
		s.health[i].Store(&healthState{reason: "not checked yet"})
	}
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

// healthz is "ok" while the encrypting entry's last check passed within
// MaxStaleness. A decrypt-only entry's outage does not count: the
// apiserver answers an unhealthy Status by failing its own /readyz, which
// would take every apiserver out of service for an outage that only fails
// reads of objects still under the old provider. Those show in the
// plugin's /healthz?verbose, its metrics and its logs.
//
// A socket not served at its path is unhealthy too: new connections,
// the apiserver's included after a restart, cannot reach the plugin.
func (s *Service) healthz(now time.Time) string {
	if p := s.socketProblem.Load(); p != nil && *p != "" {
		return "unhealthy: " + *p
	}
	return s.entryHealth(0, now)
}

// entryHealth is entry i's health in Status's words.
func (s *Service) entryHealth(i int, now time.Time) string {
	h := s.health[i].Load()
	switch {
	case h.reason != "":
		return "unhealthy: provider " + s.opts.Entries[i].Name + ": " + h.reason
	case now.Sub(h.okAt) > s.opts.MaxStaleness:
		return fmt.Sprintf("unhealthy: provider %s: last successful check %s ago", s.opts.Entries[i].Name, now.Sub(h.okAt).Round(time.Second))
	}
	return healthOK
}

// EntryHealth describes one entry for /healthz?verbose.
type EntryHealth struct {
	Name string
	// Encrypts is true for the first entry, the only one that encrypts.
	Encrypts bool
	// Health is "ok" or "unhealthy: ..." as Status would say it.
	Health string
}

// Entries reports every entry's health, in order.
func (s *Service) Entries() []EntryHealth {
	now := time.Now()
	out := make([]EntryHealth, len(s.opts.Entries))
	for i, e := range s.opts.Entries {
		out[i] = EntryHealth{Name: e.Name, Encrypts: i == 0, Health: s.entryHealth(i, now)}
	}
	return out
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
	s.observe(s.p.Encrypter().Name, opEncrypt, start, err)
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
	e, err := s.p.Route(req.GetKeyId())
	if err != nil {
		s.observe(unrouted, opDecrypt, start, err)
		return nil, grpcError("decrypt", err)
	}
	pt, err := e.Provider.Decrypt(ctx, providers.Sealed{KeyID: req.GetKeyId(), Ciphertext: req.GetCiphertext(), Annotations: req.GetAnnotations()})
	s.observe(e.Name, opDecrypt, start, err)
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

// unrouted is the provider label of a Decrypt whose key_id no entry owns.
const unrouted = "none"

func (s *Service) observe(provider, op string, start time.Time, err error) {
	s.m.providerOps.WithLabelValues(provider, op).Observe(time.Since(start).Seconds())
	if err != nil {
		s.m.providerErrors.WithLabelValues(provider, op, classify(err).label).Inc()
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

// Check checks the socket (see Options.Socket), then runs every entry's
// check (and key state refresh) now, side by side, and records the
// results for Status.
func (s *Service) Check(ctx context.Context) {
	s.checkSocket()
	var wg sync.WaitGroup
	for i := range s.opts.Entries {
		wg.Go(func() { s.checkEntry(ctx, i) })
	}
	wg.Wait()
	ok, _ := s.Healthy()
	s.m.healthy.Set(boolGauge(ok))
	if id, err := s.p.PrimaryKeyID(ctx); err == nil {
		s.noteKeyID(id)
	}
}

// checkSocket runs the socket's check first, so a lost socket shows in
// health within one check interval even while a provider check hangs.
func (s *Service) checkSocket() {
	if s.opts.Socket == nil {
		return
	}
	problem := ""
	if err := s.opts.Socket.Check(); err != nil {
		problem = err.Error()
	}
	s.socketProblem.Store(&problem)
}

// checkEntry checks entry i and logs a change of its health once.
func (s *Service) checkEntry(ctx context.Context, i int) {
	e := s.opts.Entries[i]
	ctx, cancel := context.WithTimeout(ctx, s.opts.CheckTimeout)
	defer cancel()
	start := time.Now()
	err := e.Provider.Check(ctx)
	s.observe(e.Name, opCheck, start, err)
	prev := s.health[i].Load()
	next := &healthState{checked: time.Now(), okAt: prev.okAt}
	if err != nil {
		next.reason = classify(err).label
	} else {
		next.okAt = next.checked
	}
	s.health[i].Store(next)
	s.m.providerHealthy.WithLabelValues(e.Name).Set(boolGauge(err == nil))
	switch {
	case err != nil && prev.reason == "" && i == 0:
		s.log.Warn("provider check failed; Status now reports unhealthy", "provider", e.Name, "class", next.reason, "error", err)
	case err != nil && prev.reason == "":
		s.log.Warn("decrypt-only provider check failed; Status stays ok, reads of objects still under it fail", "provider", e.Name, "class", next.reason, "error", err)
	case err == nil && prev.reason != "" && !prev.checked.IsZero():
		s.log.Info("provider check passed again", "provider", e.Name, "previous", prev.reason)
	}
}

func boolGauge(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// refresh reloads every entry's key state once, for providers that
// support it.
func (s *Service) refresh(ctx context.Context) {
	for _, e := range s.opts.Entries {
		s.refreshEntry(ctx, e)
	}
	if id, err := s.p.PrimaryKeyID(ctx); err == nil {
		s.noteKeyID(id)
	}
}

func (s *Service) refreshEntry(ctx context.Context, e multi.Entry) {
	r, ok := e.Provider.(providers.Refresher)
	if !ok {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, s.opts.CheckTimeout)
	defer cancel()
	start := time.Now()
	err := r.Refresh(ctx)
	s.observe(e.Name, opRefresh, start, err)
	if err != nil {
		s.m.reloads.WithLabelValues(e.Name, "error").Inc()
		s.log.Warn("key state refresh failed; keeping the last good state", "provider", e.Name, "class", classify(err).label, "error", err)
		return
	}
	s.m.reloads.WithLabelValues(e.Name, "ok").Inc()
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
