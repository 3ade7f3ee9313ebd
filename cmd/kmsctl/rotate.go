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
	"strings"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	svmclient "k8s.io/client-go/kubernetes/typed/storagemigration/v1"

	"github.com/kms-v2/kms-plugin/cmd/internal/backends"
	"github.com/kms-v2/kms-plugin/cmd/internal/output"
	"github.com/kms-v2/kms-plugin/config"
	"github.com/kms-v2/kms-plugin/providers"
	"github.com/kms-v2/kms-plugin/rotation"
)

// rotateFlags are the flags of `kmsctl rotate`.
type rotateFlags struct {
	configPath            string
	cluster               clusterFlags
	apiservers            []string
	force, retire, dryRun bool
	keysetDistributed     bool
	ifOlderThan           time.Duration
	concurrency           int
	output                output.Format
	metricsAddr           string
	metricsRemote         bool
	propagationWait       time.Duration
	propagationWaitSet    bool
	passiveWait           time.Duration
	confirmTimeout        time.Duration
	leaseDuration         time.Duration
	leaseWait             time.Duration
	tolerance             float64
	probeInterval         time.Duration
	initialConcurrency    int
	cpuProfile            string
	keepReadable          keepReadable
	hooks                 testHooks
	rewriteWith           string
	migrationTimeout      time.Duration
}

func rotateCommand() *cobra.Command {
	var f rotateFlags
	cmd := &cobra.Command{
		Use:   "rotate",
		Short: "Rotate the key encryption key and re-encrypt every stored object, proven from etcd",
		Long: `rotate first proves it reads the apiserver's etcd (a canary written
through the apiserver must be in etcd under --etcd-prefix at the revision
the write returned) and learns how the apiserver writes each resource now.
It then finishes anything unfinished (objects under another key_id or
provider name, plaintext, or another encryption provider are rewritten),
and, with --force or when --if-older-than finds the primary older than that,
rotates: creates a new version (or reuses a pending one), waits until every
plugin can decrypt with it, promotes it, confirms every apiserver switched
(metrics and a canary read back from etcd), rewrites every object of
--resources with a resourceVersion-only patch, and counts in etcd until
nothing is left. --retire then disables old versions, only if no object
anywhere under the prefix still uses them and no etcd snapshot given with
--keep-readable needs them (those are read before anything changes).
Nothing ever destroys a key.

Every step is derived from observed state (the provider's versions, a Lease in
kube-system, etcd), so running it again after a crash finishes the job; a
rerun on the same host takes over the lease of a run that provably died.
Exit codes: 0 done; 2 objects remain; 3 --retire refused; 4 an apiserver did
not switch; 5 another, live rotation holds the lease; 6 the encrypting
provider keeps keys per node and --keyset-distributed was not given on more
than one apiserver; 1 other errors (among them a StorageVersionMigration
unchanged for --migration-timeout).

--rewrite-with storageversionmigration hands each rewrite pass to the
platform: one StorageVersionMigration per resource, which
kube-controller-manager's storage-version-migrator-controller runs; plan,
confirmation, census, further passes and retire stay kmsctl's. A migration
that fails or is deleted is followed by a census (exit 2 if objects remain,
the error naming the migration); a rerun replaces it.

With several providers in --config (providers:), the first is the one
rotated and every object not under its primary is rewritten; --retire then
also disables the versions of the others (their primaries stay) once no
object anywhere in etcd uses them, and says which can leave the config.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			f.propagationWaitSet = cmd.Flags().Changed("propagation-wait")
			return runRotate(cmd, f)
		},
	}
	f.register(cmd.Flags())
	return cmd
}

func (f *rotateFlags) register(fs *pflag.FlagSet) {
	fs.StringVar(&f.configPath, "config", "", "plugin configuration `FILE` (YAML); names the provider and its refresh interval")
	f.cluster.register(fs, "rewrite")
	fs.StringSliceVar(&f.apiservers, "apiservers", nil, "every apiserver's base `URLs`, comma-separated, to confirm each one switched (default: the \"kubernetes\" EndpointSlices)")
	fs.BoolVar(&f.force, "force", false, "rotate to a new key version now")
	fs.DurationVar(&f.ifOlderThan, "if-older-than", 0, "rotate when the primary is older than this, e.g. 720h")
	fs.BoolVar(&f.retire, "retire", false, "disable old key versions, and the versions of decrypt-only providers, once etcd proves nothing uses them")
	fs.BoolVar(&f.keysetDistributed, "keyset-distributed", false, "the encrypting provider keeps keys per node (a keyset file, a TPM) and every node's copy is kept the same; without it a new version is refused on more than one apiserver")
	f.keepReadable.register(fs)
	fs.IntVar(&f.concurrency, "concurrency", 32, "most patches in flight; the actual number adapts to the apiserver's latency and 429s")
	fs.BoolVar(&f.dryRun, "dry-run", false, "plan and count only; change nothing but kmsctl's own canaries")
	output.Register(fs, &f.output)
	fs.StringVar(&f.metricsAddr, "metrics-addr", "", "serve Prometheus metrics of the run on this loopback `ADDR`, e.g. 127.0.0.1:9090 (unauthenticated; see --metrics-addr-allow-remote)")
	fs.BoolVar(&f.metricsRemote, "metrics-addr-allow-remote", false, "let --metrics-addr be a non-loopback address, such as :9090 (every interface); the metrics name resources and key_ids and are served without authentication")
	fs.DurationVar(&f.propagationWait, "propagation-wait", 0, "wait between creating and promoting a version (default: none for shared key state, whose plugins look a new key_id up on first sight; twice the config's refreshInterval plus 1s for per-node key state)")
	fs.DurationVar(&f.passiveWait, "passive-wait", 0, "wait after promoting when apiservers cannot be confirmed one by one (default 3+N+5 minutes, N the refresh interval in whole minutes)")
	fs.DurationVar(&f.confirmTimeout, "confirm-timeout", 3*time.Minute, "how long each apiserver may take to switch")
	fs.DurationVar(&f.leaseWait, "lease-wait", 15*time.Minute, "how long to wait for another run's lease to expire; a run that renews it meanwhile is alive (exit 5)")
	// 2: in make bench-rotation (2 cores, 10000 secrets) other writers'
	// p99 stayed within 2x idle in every tuning round (docs/BENCHMARKS.md).
	fs.Float64Var(&f.tolerance, "latency-tolerance", 2, "how many times its idle latency a probe request (a GET of the rotation lease) may take before the rewrite backs off; lower protects other clients, higher finishes sooner")
	fs.DurationVar(&f.probeInterval, "probe-interval", rotation.DefaultProbeInterval, "time between the probes whose latency paces the rewrite; 0: pace on the patches' latency")
	_ = fs.MarkHidden("probe-interval")
	fs.IntVar(&f.initialConcurrency, "initial-concurrency", 0, "patches in flight at the start, before the limit adapts (default 1 with the probe, else 4)")
	_ = fs.MarkHidden("initial-concurrency")
	fs.DurationVar(&f.leaseDuration, "lease-duration", rotation.DefaultLeaseDuration, "how long the rotation lease outlives a killed run")
	_ = fs.MarkHidden("lease-duration")
	fs.StringVar(&f.cpuProfile, "cpu-profile", "", "write a Go CPU profile of the run to this file")
	_ = fs.MarkHidden("cpu-profile")
	fs.StringVar(&f.rewriteWith, "rewrite-with", rewriteKmsctl, "the rewrite engine: kmsctl (its own paced patches) or storageversionmigration (the platform's, run by kube-controller-manager)")
	fs.DurationVar(&f.migrationTimeout, "migration-timeout", rotation.DefaultMigrationTimeout, "with --rewrite-with storageversionmigration: stop when a migration's status has not changed for this long (kube-controller-manager writes it when a migration starts and ends)")
	f.hooks.register(fs)
}

// Rewrite engines --rewrite-with accepts.
const (
	rewriteKmsctl = "kmsctl"
	rewriteSVM    = "storageversionmigration"
)

// newRotation wires the run with the rewrite engine --rewrite-with names:
// kmsctl's own Rewriter, or a MigrationEngine.
func (f *rotateFlags) newRotation(ctx context.Context, cfg rotation.Config) (*rotation.Rotation, error) {
	r, err := rotation.New(ctx, cfg)
	if err != nil || f.rewriteWith != rewriteSVM {
		return r, err
	}
	c, err := svmclient.NewForConfig(cfg.REST)
	if err != nil {
		return nil, fmt.Errorf("StorageVersionMigration client: %w", err)
	}
	r.Engine = &rotation.MigrationEngine{Client: c, Progress: r.Progress, Out: cfg.Out, StallTimeout: f.migrationTimeout}
	return r, nil
}

// validate checks the flags that need no I/O.
func (f *rotateFlags) validate() error {
	if f.configPath == "" {
		return errors.New("--config is required: the plugin configuration file")
	}
	if f.metricsAddr != "" && !f.metricsRemote {
		if err := config.CheckLoopback(f.metricsAddr); errors.Is(err, config.ErrNotLoopback) {
			return fmt.Errorf("--metrics-addr %w; or add --metrics-addr-allow-remote", err)
		} else if err != nil {
			return fmt.Errorf("--metrics-addr %w", err)
		}
	}
	switch {
	case f.force && f.ifOlderThan > 0:
		return errors.New("--force and --if-older-than exclude each other")
	case f.concurrency < 1:
		return fmt.Errorf("--concurrency %d: want at least 1", f.concurrency)
	case f.tolerance <= 1:
		return fmt.Errorf("--latency-tolerance %g: want more than 1", f.tolerance)
	case f.propagationWait < 0:
		return fmt.Errorf("--propagation-wait %s: want 0 or more", f.propagationWait)
	case f.leaseWait < 0:
		return fmt.Errorf("--lease-wait %s: want 0 or more", f.leaseWait)
	case f.rewriteWith != rewriteKmsctl && f.rewriteWith != rewriteSVM:
		return fmt.Errorf("--rewrite-with %q: want %s or %s", f.rewriteWith, rewriteKmsctl, rewriteSVM)
	case f.migrationTimeout <= 0:
		return fmt.Errorf("--migration-timeout %s: want more than 0", f.migrationTimeout)
	case len(f.keepReadable.paths) > 0 && !f.retire:
		return errors.New("--keep-readable only guards --retire: add --retire, or drop --keep-readable")
	}
	return f.cluster.validate()
}

func runRotate(cmd *cobra.Command, f rotateFlags) error {
	if err := f.validate(); err != nil {
		return err
	}
	stopProfile, err := startCPUProfile(f.cpuProfile)
	if err != nil {
		return err
	}
	defer stopProfile()
	if os.Getenv("GOMEMLIMIT") == "" {
		// Memory is bounded by design (pages stream through a fixed pool);
		// a soft limit keeps the garbage collector from letting the heap
		// float to twice that, so the job fits a small memory request.
		// Measured with make bench-rotation: 16 MiB cuts the anonymous peak
		// from ~20 to ~13 MiB at the same CPU time as 24 MiB.
		debug.SetMemoryLimit(16 << 20)
	}
	ctx, stopSignals := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
	defer stopSignals()
	report, runErr := rotate(ctx, cmd.ErrOrStderr(), f)
	if cause := context.Cause(ctx); runErr != nil && cause != nil && !errors.Is(cause, context.Canceled) {
		runErr = fmt.Errorf("%w (%v)", runErr, cause)
	}
	runErr = rotateExit(runErr)
	if report == nil {
		report = &rotation.Report{}
	}
	if runErr != nil {
		report.Error, report.ExitCode = runErr.Error(), exitCode(runErr)
	}
	if f.output.IsJSON() {
		if err := output.WriteJSON(cmd.OutOrStdout(), report); err != nil {
			return err
		}
	} else if report.Action != "" {
		printReport(cmd.OutOrStdout(), report)
	}
	return runErr
}

// rotate builds the run from the flags and runs it. The report is nil when
// the run could not start.
func rotate(ctx context.Context, stderr io.Writer, f rotateFlags) (*rotation.Report, error) {
	cfg, err := backends.Load(f.configPath)
	if err != nil {
		return nil, err
	}
	first := cfg.Providers[0]
	encCfg, err := f.cluster.loadEncryptionConfig()
	if err != nil {
		return nil, err
	}
	keep, err := f.keepReadable.read(ctx, f.cluster.prefix)
	if err != nil {
		return nil, err
	}
	restCfg, err := f.cluster.restConfig()
	if err != nil {
		return nil, err
	}
	logger := hclog.New(&hclog.LoggerOptions{Name: "kmsctl", Level: hclog.Warn, Output: stderr})
	prov, rot, err := backends.OpenRotator(ctx, first, logger)
	if err != nil {
		return nil, err
	}
	defer prov.Close()
	decryptOnly, closeOld, err := f.openDecryptOnly(ctx, cfg, logger)
	if err != nil {
		return nil, err
	}
	defer closeOld()
	e, closeEtcd, err := f.cluster.openEtcd()
	if err != nil {
		return nil, err
	}
	defer closeEtcd()
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	r, err := f.newRotation(ctx, rotation.Config{
		REST: restCfg, Rotator: rot, DecryptOnly: decryptOnly, Etcd: e, APIServers: f.apiservers, Discover: !f.dryRun,
		Concurrency: f.concurrency, InitialConcurrency: f.initialConcurrency, Tolerance: f.tolerance,
		ProbeInterval: f.probeInterval, Logger: logger, Out: stderr, Registry: reg,
	})
	if err != nil {
		return nil, err
	}
	if f.metricsAddr != "" {
		stop, err := serveMetrics(f.metricsAddr, reg, logger)
		if err != nil {
			return nil, err
		}
		defer stop()
	}
	opts, err := f.options(ctx, first.KeyState, time.Duration(cfg.RefreshInterval), e, encCfg, stderr)
	if err != nil {
		return nil, err
	}
	opts.KeepReadable = keep
	opts.AfterPhase = f.hooks.afterPhase(ctx, r.Progress)
	return r.Run(ctx, opts)
}

// options turns the flags into the run's options.
func (f *rotateFlags) options(ctx context.Context, scope providers.Scope, refresh time.Duration, e rotation.Etcd, encCfg *rotation.EncryptionConfig, stderr io.Writer) (rotation.Options, error) {
	res, err := f.cluster.resolveResources(ctx, e, encCfg)
	if err != nil {
		return rotation.Options{}, err
	}
	holder, err := rotation.CurrentHolder()
	if err != nil && holder.Host == "" {
		return rotation.Options{}, err
	}
	if err != nil {
		// Still a usable identity; only a crash of this run cannot be
		// proven later, so a rerun waits for the lease to expire.
		fmt.Fprintf(stderr, "lease: holder identity is partial (%v); a crash of this run cannot be proven later\n", err)
	}
	switch {
	case f.propagationWaitSet:
	case scope == providers.ScopeShared:
		f.propagationWait = 0
	default:
		f.propagationWait = 2*refresh + time.Second
	}
	if f.passiveWait == 0 {
		f.passiveWait = time.Duration(3+int(math.Ceil(refresh.Minutes()))+5) * time.Minute
	}
	return rotation.Options{
		Resources: res, EncryptionConfig: encCfg,
		Force: f.force, IfOlderThan: f.ifOlderThan, Retire: f.retire, DryRun: f.dryRun,
		PropagationWait: f.propagationWait, Scope: scope, KeysetDistributed: f.keysetDistributed, PassiveWait: f.passiveWait, ConfirmTimeout: f.confirmTimeout,
		Lock: rotation.LockOptions{Holder: holder, Duration: f.leaseDuration, Wait: f.leaseWait, Out: stderr},
	}, nil
}

// openDecryptOnly opens the providers after the first, which only
// --retire needs: it counts their objects and disables their versions.
func (f *rotateFlags) openDecryptOnly(ctx context.Context, cfg *config.Config, logger hclog.Logger) ([]rotation.DecryptOnly, func(), error) {
	var out []rotation.DecryptOnly
	var opened []providers.Provider
	closeAll := func() {
		for _, p := range opened {
			p.Close()
		}
	}
	if !f.retire {
		return nil, closeAll, nil
	}
	for _, e := range cfg.Providers[1:] {
		p, err := backends.OpenEntry(ctx, e, logger)
		if err != nil {
			closeAll()
			return nil, nil, fmt.Errorf("%w (--retire counts and retires every decrypt-only provider)", err)
		}
		opened = append(opened, p)
		r, _ := p.(providers.Rotator)
		out = append(out, rotation.DecryptOnly{Name: e.Name, Owns: p.Owns, Rotator: r})
	}
	return out, closeAll, nil
}

// startCPUProfile writes a Go CPU profile of the run to path, if set.
func startCPUProfile(path string) (func(), error) {
	if path == "" {
		return func() {}, nil
	}
	pf, err := os.Create(path)
	if err != nil {
		return nil, err
	}
	if err := pprof.StartCPUProfile(pf); err != nil {
		pf.Close()
		return nil, err
	}
	return func() {
		pprof.StopCPUProfile()
		pf.Close()
	}, nil
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
	case errors.Is(err, rotation.ErrNotDistributed):
		return &exitError{exitNotShared, err}
	}
	return err
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

// printReport writes the human summary of a run.
func printReport(out io.Writer, r *rotation.Report) {
	fmt.Fprintf(out, "action: %s\n", r.Action)
	if r.OldKeyID != r.NewKeyID {
		fmt.Fprintf(out, "key: %s -> %s\n", r.OldKeyID, r.NewKeyID)
	} else {
		fmt.Fprintf(out, "key: %s\n", r.NewKeyID)
	}
	if r.Proof != "" {
		fmt.Fprintf(out, "etcd proof: %s\n", r.Proof)
	}
	if r.LeaseTakenOver != "" {
		fmt.Fprintf(out, "lease taken over from the dead run %s\n", r.LeaseTakenOver)
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
		fmt.Fprintf(out, "census before: %d objects, %d not stored as the apiserver wrote then\n", r.CensusBefore.Total(), r.CensusBefore.NotCurrent())
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
