package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"math"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime/debug"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spf13/cobra"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/metadata"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/kms-v2/kms-plugin/cmd/internal/backends"
	"github.com/kms-v2/kms-plugin/config"
	"github.com/kms-v2/kms-plugin/rotation"
)

// rotateFlags are the flags of `kmsctl rotate`.
type rotateFlags struct {
	configPath, kubeconfig string
	etcd                   etcdFlags
	resources, apiservers  []string
	force, retire, dryRun  bool
	ifOlderThan            time.Duration
	concurrency            int
	output                 string
	metricsAddr            string
	propagationWait        time.Duration
	passiveWait            time.Duration
	confirmTimeout         time.Duration
	crashAfter             string
	leaseDuration          time.Duration
	tolerance              float64
	probeInterval          time.Duration
	initialConcurrency     int
	cpuProfile             string
}

func rotateCommand() *cobra.Command {
	var f rotateFlags
	cmd := &cobra.Command{
		Use:   "rotate",
		Short: "Rotate the key encryption key and re-encrypt every stored object, proven from etcd",
		Long: `rotate first finishes any rotation in progress (objects still under a key
other than the primary are rewritten), then, with --force or when
--if-older-than finds the primary older than that, rotates: creates a new
version (or reuses a pending one), waits until every plugin can decrypt with
it, promotes it, confirms every apiserver switched (metrics and a canary write
read back from etcd), rewrites every object of --resources with a
resourceVersion-only patch, and counts in etcd until nothing is left under an
old key. --retire then disables old versions, only if no object anywhere in
etcd still uses them. Nothing ever destroys a key.

Every step is derived from observed state (the provider's versions, a Lease in
kube-system, etcd), so running it again after a crash finishes the job.
Exit codes: 0 done; 2 objects remain under an old key; 3 --retire refused;
4 an apiserver did not switch; 5 another rotation is running; 1 other errors.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return runRotate(cmd, f) },
	}
	fs := cmd.Flags()
	fs.StringVar(&f.configPath, "config", "", "plugin configuration file (YAML); names the provider and its refresh interval")
	fs.StringVar(&f.kubeconfig, "kubeconfig", "", "kubeconfig (default: in-cluster, then $KUBECONFIG)")
	f.etcd.register(fs)
	fs.StringSliceVar(&f.resources, "resources", []string{"secrets"}, "encrypted resources to rewrite: secrets, configmaps, <resource>.<version>.<group>")
	fs.StringSliceVar(&f.apiservers, "apiservers", nil, "every apiserver's URL, to confirm each one switched (default: the `kubernetes` EndpointSlices)")
	fs.BoolVar(&f.force, "force", false, "rotate to a new key version now")
	fs.DurationVar(&f.ifOlderThan, "if-older-than", 0, "rotate when the primary is older than this, e.g. 720h")
	fs.BoolVar(&f.retire, "retire", false, "disable old key versions once etcd proves nothing uses them")
	fs.IntVar(&f.concurrency, "concurrency", 32, "most patches in flight; the actual number adapts to the apiserver's latency and 429s")
	fs.BoolVar(&f.dryRun, "dry-run", false, "plan and count only; change nothing")
	fs.StringVarP(&f.output, "output", "o", "text", "report format: text or json")
	fs.StringVar(&f.metricsAddr, "metrics-addr", "", "serve Prometheus metrics of the run on this address, e.g. :9090")
	fs.DurationVar(&f.propagationWait, "propagation-wait", 0, "wait between creating and promoting a version (default: twice the config's refreshInterval plus 1s)")
	fs.DurationVar(&f.passiveWait, "passive-wait", 0, "wait after promoting when apiservers cannot be confirmed one by one (default 3+N+5 minutes, N the refresh interval in whole minutes)")
	fs.DurationVar(&f.confirmTimeout, "confirm-timeout", 3*time.Minute, "how long each apiserver may take to switch")
	// 2: in make bench-rotation (2 cores, 10000 secrets) other writers'
	// p99 stayed within 2x idle in every tuning round at about 22-26 s;
	// 3 took about 17 s but reached 2.2x in one round of four, 4 and the
	// former patch-latency pacing more (docs/BENCHMARKS.md). A small GET
	// doubles its latency on a busy apiserver sooner than a write does, so
	// the number is not the writers' own bound.
	fs.Float64Var(&f.tolerance, "latency-tolerance", 2, "how many times its idle latency a probe request (a GET of the rotation lease) may take before the rewrite backs off; lower protects other clients, higher finishes sooner")
	// For tuning the pacing (make bench-rotation): 0 turns the probe off
	// and lets the patches' own latency drive the limit, as before it.
	fs.DurationVar(&f.probeInterval, "probe-interval", rotation.DefaultProbeInterval, "time between the probes (GETs of the rotation lease) whose latency paces the rewrite; 0: pace on the patches' latency")
	_ = fs.MarkHidden("probe-interval")
	fs.IntVar(&f.initialConcurrency, "initial-concurrency", 0, "patches in flight at the start, before the limit adapts (default 1 with the probe, else 4)")
	_ = fs.MarkHidden("initial-concurrency")
	// For the crash-and-resume tests: kill -9 itself after a phase, or after
	// N objects of the rewrite ("rewrite:N").
	fs.StringVar(&f.crashAfter, "crash-after", "", "testing only: SIGKILL this process after the named phase")
	_ = fs.MarkHidden("crash-after")
	fs.DurationVar(&f.leaseDuration, "lease-duration", rotation.DefaultLeaseDuration, "how long the rotation lease outlives a killed run")
	_ = fs.MarkHidden("lease-duration")
	// For tuning the rewrite: where kmsctl's own CPU goes while it runs
	// next to the apiserver on the same cores.
	fs.StringVar(&f.cpuProfile, "cpu-profile", "", "write a Go CPU profile of the run to this file")
	_ = fs.MarkHidden("cpu-profile")
	return cmd
}

func runRotate(cmd *cobra.Command, f rotateFlags) error {
	switch {
	case f.configPath == "":
		return errors.New("--config is required: the plugin configuration file")
	case f.output != "text" && f.output != "json":
		return fmt.Errorf("-o %q: want text or json", f.output)
	case f.force && f.ifOlderThan > 0:
		return errors.New("--force and --if-older-than exclude each other")
	case f.concurrency < 1:
		return fmt.Errorf("--concurrency %d: want at least 1", f.concurrency)
	case f.tolerance <= 1:
		return fmt.Errorf("--latency-tolerance %g: want more than 1", f.tolerance)
	}
	if f.cpuProfile != "" {
		pf, err := os.Create(f.cpuProfile)
		if err != nil {
			return err
		}
		if err := pprof.StartCPUProfile(pf); err != nil {
			return err
		}
		defer func() {
			pprof.StopCPUProfile()
			pf.Close()
		}()
	}
	if os.Getenv("GOMEMLIMIT") == "" {
		// Memory is bounded by design (pages stream through a fixed pool);
		// a soft limit keeps the garbage collector from letting the heap
		// float to twice that, so the job fits a small memory request.
		// Measured with make bench-rotation: 16 MiB cuts the anonymous peak
		// from ~20 to ~13 MiB at the same CPU time as 24 MiB.
		debug.SetMemoryLimit(16 << 20)
	}
	res, err := rotation.ParseResources(f.resources)
	if err != nil {
		return err
	}
	cfg, err := config.Load(f.configPath)
	if err != nil {
		return err
	}
	refresh := time.Duration(cfg.RefreshInterval)
	if f.propagationWait == 0 {
		f.propagationWait = 2*refresh + time.Second
	}
	if f.passiveWait == 0 {
		f.passiveWait = time.Duration(3+int(math.Ceil(refresh.Minutes()))+5) * time.Minute
	}
	stderr := cmd.ErrOrStderr()
	logger := hclog.New(&hclog.LoggerOptions{Name: "kmsctl", Level: hclog.Warn, Output: stderr})

	ctx, stopSignals := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
	defer stopSignals()
	prov, rot, err := backends.OpenRotator(ctx, cfg.Provider, logger)
	if err != nil {
		return err
	}
	defer prov.Close()

	restCfg, err := loadKubeconfig(f.kubeconfig)
	if err != nil {
		return err
	}
	// The dynamic client, not the typed clientset, for the lease, the
	// canaries and the EndpointSlices: the clientset's import registers
	// every API group and about doubles the executable kmsctl maps.
	kube, err := dynamic.NewForConfig(restCfg)
	if err != nil {
		return fmt.Errorf("kubernetes client: %w", err)
	}
	initial := f.initialConcurrency
	if initial == 0 && f.probeInterval > 0 {
		// Start low and let the probe ramp the limit up: the idle
		// baseline is known before the first patch, so there is no reason
		// to open with a burst other clients would feel.
		initial = 1
	}
	limiter := rotation.NewLimiter(rotation.LimiterConfig{Max: f.concurrency, Initial: initial, Tolerance: f.tolerance})
	rwCfg := rest.CopyConfig(restCfg)
	// The limiter, not client-go's token bucket, paces the rewrite.
	rwCfg.QPS, rwCfg.Burst = 5000, 5000
	rwCfg.Timeout = 60 * time.Second
	rwCfg.Wrap(limiter.ObserveTransport)
	meta, err := metadata.NewForConfig(rwCfg)
	if err != nil {
		return fmt.Errorf("metadata client: %w", err)
	}
	store, closeStore, err := f.etcd.open()
	if err != nil {
		return err
	}
	defer closeStore()

	urls := f.apiservers
	if len(urls) == 0 && !f.dryRun {
		urls, err = rotation.DiscoverAPIServers(ctx, kube)
		if err != nil {
			fmt.Fprintf(stderr, "plan: cannot discover apiservers (%v); will wait passively\n", err)
		}
	}
	var apiservers []*rotation.APIServer
	for i, u := range urls {
		a, err := rotation.NewAPIServer(restCfg, u, i)
		if err != nil {
			return err
		}
		apiservers = append(apiservers, a)
	}

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	metrics := rotation.NewMetrics(reg, limiter)
	if f.metricsAddr != "" {
		stop, err := serveMetrics(f.metricsAddr, reg, logger)
		if err != nil {
			return err
		}
		defer stop()
	}
	progress := rotation.NewProgress(stderr, 2*time.Second, limiter)
	host, _ := os.Hostname()
	opts := rotation.Options{
		Resources: res, Force: f.force, IfOlderThan: f.ifOlderThan, Retire: f.retire, DryRun: f.dryRun,
		PropagationWait: f.propagationWait, PassiveWait: f.passiveWait, ConfirmTimeout: f.confirmTimeout,
		Identity:      fmt.Sprintf("kmsctl@%s/%d", host, os.Getpid()),
		LeaseDuration: f.leaseDuration,
	}
	if f.crashAfter != "" {
		opts.AfterPhase = crashHook(ctx, f.crashAfter, progress)
	}
	r := &rotation.Rotation{
		Rotator: rot, Kube: kube, Store: store, APIServers: apiservers, Logger: logger, Out: stderr,
		Progress: progress, Metrics: metrics,
		Rewriter: &rotation.Rewriter{
			Client: meta, Limiter: limiter, Workers: f.concurrency, Logger: logger, Progress: progress, Metrics: metrics,
			ProbeInterval: f.probeInterval,
		},
	}
	if f.probeInterval > 0 {
		// A client of its own, not the limiter-wrapped one: the probe
		// stands for another client. No client-side rate limit: client-go's
		// default 5 QPS would make its wait look like apiserver latency.
		probeCfg := rest.CopyConfig(restCfg)
		probeCfg.QPS = -1
		probeCfg.Timeout = 10 * time.Second
		probeClient, err := dynamic.NewForConfig(probeCfg)
		if err != nil {
			return fmt.Errorf("probe client: %w", err)
		}
		r.Rewriter.Probe = rotation.LeaseProbe(probeClient)
	}
	report, runErr := r.Run(ctx, opts)
	if cause := context.Cause(ctx); runErr != nil && cause != nil && !errors.Is(cause, context.Canceled) {
		runErr = fmt.Errorf("%w (%v)", runErr, cause)
	}
	if f.output == "json" {
		if err := printJSON(cmd.OutOrStdout(), report); err != nil {
			return err
		}
	} else {
		printReport(cmd.OutOrStdout(), report)
	}
	return rotateExit(runErr)
}

// rotateExit maps the orchestrator's errors to exit codes.
func rotateExit(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, rotation.ErrLocked):
		return &exitError{exitLocked, err}
	case errors.Is(err, rotation.ErrNotSwitched):
		return &exitError{exitNotSwitched, err}
	case errors.Is(err, rotation.ErrObjectsRemain):
		return &exitError{exitObjectsRemain, err}
	case errors.Is(err, rotation.ErrRetireRefused):
		return &exitError{exitRetireRefused, err}
	}
	return err
}

// loadKubeconfig reads --kubeconfig, or in-cluster config, or the default
// loading rules ($KUBECONFIG, ~/.kube/config).
func loadKubeconfig(path string) (*rest.Config, error) {
	if path == "" {
		if c, err := rest.InClusterConfig(); err == nil {
			return c, nil
		}
	}
	rules := clientcmd.NewDefaultClientConfigLoadingRules()
	rules.ExplicitPath = path
	c, err := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, &clientcmd.ConfigOverrides{}).ClientConfig()
	if err != nil {
		return nil, fmt.Errorf("kubeconfig: %w", err)
	}
	return c, nil
}

// serveMetrics serves reg on addr until stop is called.
func serveMetrics(addr string, reg *prometheus.Registry, logger hclog.Logger) (func(), error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("--metrics-addr %s: %w", addr, err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			logger.Warn("metrics server", "error", err)
		}
	}()
	return func() { srv.Close() }, nil
}

// crashHook kills the process hard after a phase, or once the rewrite has
// handled N objects ("rewrite:N"): what a node failure or OOM kill does.
func crashHook(ctx context.Context, spec string, p *rotation.Progress) func(string) {
	kill := func() { _ = syscall.Kill(os.Getpid(), syscall.SIGKILL) }
	if n, ok := strings.CutPrefix(spec, "rewrite:"); ok {
		limit, _ := strconv.ParseInt(n, 10, 64)
		go func() {
			for ctx.Err() == nil {
				if c := p.Count(); c >= limit && c > 0 {
					kill()
				}
				time.Sleep(5 * time.Millisecond)
			}
		}()
		return func(string) {}
	}
	return func(phase string) {
		if phase == spec {
			kill()
		}
	}
}

// printReport writes the human summary of a run.
func printReport(out io.Writer, r *rotation.Report) {
	fmt.Fprintf(out, "action: %s\n", r.Action)
	if r.OldKeyID != r.NewKeyID {
		fmt.Fprintf(out, "key: %s -> %s\n", r.OldKeyID, r.NewKeyID)
	} else {
		fmt.Fprintf(out, "key: %s\n", r.NewKeyID)
	}
	for _, a := range r.APIServers {
		state := "switched (" + strings.Join(a.By, "+") + ")"
		if !a.Switched {
			state = "NOT switched: " + a.Error
		}
		fmt.Fprintf(out, "apiserver %s: %s\n", a.URL, state)
	}
	if r.PassiveWait > 0 {
		fmt.Fprintf(out, "apiservers not reachable one by one: waited %s\n", r.PassiveWait)
	}
	for _, name := range sortedStats(r.Rewrite) {
		s := r.Rewrite[name]
		fmt.Fprintf(out, "rewrite %s: %d rewritten, %d unchanged, %d conflicts (written meanwhile), %d skipped (deleted), %d errors in %s\n",
			name, s.Rewritten, s.Unchanged, s.Conflicts, s.Skipped, s.Errors, s.Duration)
	}
	if r.CensusBefore != nil {
		fmt.Fprintf(out, "census before: %d objects, %d not under %s\n", r.CensusBefore.Total(), r.CensusBefore.Stale(), r.CensusBefore.CurrentKeyID)
	}
	if r.CensusAfter != nil {
		fmt.Fprintf(out, "census after (%d passes):\n", r.Passes)
		printCensus(out, r.CensusAfter)
	}
	if len(r.Retired) > 0 {
		fmt.Fprintf(out, "retired: %s\n", strings.Join(r.Retired, ", "))
	}
	if r.RetireRefused != "" {
		fmt.Fprintf(out, "retire refused: %s\n", r.RetireRefused)
	}
	var phases []string
	for _, p := range r.Phases {
		phases = append(phases, p.Phase+" "+p.Duration.String())
	}
	fmt.Fprintf(out, "phases: %s; total %s\n", strings.Join(phases, ", "), r.Duration)
}

func sortedStats(m map[string]*rotation.RewriteStats) []string {
	return slices.Sorted(maps.Keys(m))
}
