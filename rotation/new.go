package rotation

import (
	"context"
	"fmt"
	"io"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/metadata"
	"k8s.io/client-go/rest"

	"github.com/kms-v2/kms-plugin/providers"
)

// Config is what a Rotation is built from: the clients' credentials, the
// provider, the etcd, and the pacing of the rewrite.
type Config struct {
	// REST is the kubeconfig's apiserver and credentials.
	REST    *rest.Config
	Rotator providers.Rotator
	// DecryptOnly are the providers after the first (only --retire needs
	// them).
	DecryptOnly []DecryptOnly
	Etcd        Etcd
	// APIServers are every apiserver's URL; empty means discover them
	// from the `kubernetes` EndpointSlices (Discover) or wait passively.
	APIServers []string
	Discover   bool
	// Concurrency is the most patches in flight; InitialConcurrency the
	// number at the start (default 1 with the probe, else 4).
	Concurrency, InitialConcurrency int
	// Tolerance is how many times its idle latency the probe may take
	// before the rewrite backs off.
	Tolerance float64
	// ProbeInterval is the time between probes; 0 paces on the patches'
	// own latency.
	ProbeInterval time.Duration
	Logger        hclog.Logger
	// Out receives progress lines (stderr); Registry the run's metrics.
	Out      io.Writer
	Registry prometheus.Registerer
}

// New wires a Rotation: the adaptive limiter and the rewrite's transport,
// the probe client, one client per apiserver, metrics and progress.
func New(ctx context.Context, cfg Config) (*Rotation, error) {
	kube, err := dynamic.NewForConfig(cfg.REST)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	planner, err := NewAPIServer(cfg.REST, cfg.REST.Host, 0)
	if err != nil {
		return nil, err
	}
	apiservers, err := newAPIServers(ctx, cfg, kube)
	if err != nil {
		return nil, err
	}
	limiter := NewLimiter(LimiterConfig{Max: cfg.Concurrency, Initial: initialConcurrency(cfg), Tolerance: cfg.Tolerance})
	metrics := NewMetrics(cfg.Registry, limiter)
	progress := NewProgress(cfg.Out, 2*time.Second, limiter)
	rw, err := newRewriter(cfg, limiter, metrics, progress)
	if err != nil {
		return nil, err
	}
	return &Rotation{
		Rotator: cfg.Rotator, DecryptOnly: cfg.DecryptOnly, Kube: kube, Meta: rw.Client, Rewriter: rw, Etcd: cfg.Etcd,
		Planner: planner, APIServers: apiservers, Logger: cfg.Logger, Out: cfg.Out,
		Progress: progress, Metrics: metrics,
	}, nil
}

// initialConcurrency starts low when the probe paces the rewrite: the idle
// baseline is known before the first patch, so there is no reason to open
// with a burst other clients would feel.
func initialConcurrency(cfg Config) int {
	if cfg.InitialConcurrency == 0 && cfg.ProbeInterval > 0 {
		return 1
	}
	return cfg.InitialConcurrency
}

// newAPIServers builds a client per apiserver, discovering them when asked.
func newAPIServers(ctx context.Context, cfg Config, kube dynamic.Interface) ([]*APIServer, error) {
	urls := cfg.APIServers
	if len(urls) == 0 && cfg.Discover {
		var err error
		if urls, err = DiscoverAPIServers(ctx, kube); err != nil && cfg.Out != nil {
			fmt.Fprintf(cfg.Out, "plan: cannot discover apiservers (%v); will wait passively\n", err)
		}
	}
	var out []*APIServer
	for i, u := range urls {
		a, err := NewAPIServer(cfg.REST, u, i)
		if err != nil {
			return nil, err
		}
		out = append(out, a)
	}
	return out, nil
}

// newRewriter builds the rewrite's clients: a metadata client paced by the
// limiter rather than client-go's token bucket, and a probe client of its
// own that stands for another client.
func newRewriter(cfg Config, l *Limiter, m *Metrics, p *Progress) (*Rewriter, error) {
	rwCfg := rest.CopyConfig(cfg.REST)
	rwCfg.QPS, rwCfg.Burst = 5000, 5000
	rwCfg.Timeout = 60 * time.Second
	rwCfg.Wrap(l.ObserveTransport)
	meta, err := metadata.NewForConfig(rwCfg)
	if err != nil {
		return nil, fmt.Errorf("metadata client: %w", err)
	}
	rw := &Rewriter{Client: meta, Limiter: l, Workers: cfg.Concurrency, Logger: cfg.Logger, Progress: p, Metrics: m, ProbeInterval: cfg.ProbeInterval}
	if cfg.ProbeInterval <= 0 {
		return rw, nil
	}
	// No client-side rate limit: client-go's default 5 QPS would make its
	// wait look like apiserver latency.
	probeCfg := rest.CopyConfig(cfg.REST)
	probeCfg.QPS = -1
	probeCfg.Timeout = 10 * time.Second
	probe, err := dynamic.NewForConfig(probeCfg)
	if err != nil {
		return nil, fmt.Errorf("probe client: %w", err)
	}
	rw.Probe = LeaseProbe(probe)
	return rw, nil
}
