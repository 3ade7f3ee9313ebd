// Command kms-plugin is the KMS v2 plugin daemon kube-apiserver talks to
// over a Unix socket. `kms-plugin serve --config FILE` is its only job; this
// file is wiring: flags, config, logger, signals.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/spf13/cobra"

	"github.com/kms-v2/kms-plugin/cmd/internal/backends"
	"github.com/kms-v2/kms-plugin/cmd/internal/buildinfo"
	"github.com/kms-v2/kms-plugin/cmd/internal/cli"
	"github.com/kms-v2/kms-plugin/config"
	"github.com/kms-v2/kms-plugin/plugin"
)

// version and commit are set at release build time with -ldflags
// "-X main.version=... -X main.commit=..."; unset, `version` falls back to
// what the Go toolchain recorded (cmd/internal/buildinfo).
var version, commit string

func main() {
	root := &cobra.Command{
		Use:           "kms-plugin",
		Short:         "Kubernetes KMS v2 plugin",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.AddCommand(serveCommand(), doctorCommand(), cli.VersionCommand(version, commit))
	cli.Strict(root)
	if err := root.Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "kms-plugin: "+err.Error())
		os.Exit(1)
	}
}

func serveCommand() *cobra.Command {
	var configPath string
	cmd := &cobra.Command{
		Use:   "serve --config FILE",
		Short: "Serve KMS v2 on the Unix socket named in the config",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if configPath == "" {
				return errors.New("--config is required: the plugin configuration file")
			}
			cfg, err := backends.Load(configPath)
			if err != nil {
				return err
			}
			ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
			defer stop()
			return serve(ctx, cfg)
		},
	}
	cmd.Flags().StringVar(&configPath, "config", "", "plugin configuration `FILE` (YAML)")
	return cmd
}

func newLogger(c config.Log) hclog.Logger {
	return hclog.New(&hclog.LoggerOptions{
		Name:       "kms-plugin",
		Level:      hclog.LevelFromString(c.Level),
		JSONFormat: c.Format == "json",
		Output:     os.Stderr,
	})
}

// serve runs the plugin until ctx ends. Every resource it takes is released
// on every error path, so a failed start leaves no socket behind.
func serve(ctx context.Context, cfg *config.Config) error {
	log := newLogger(cfg.Log)
	prov, err := backends.Open(ctx, cfg, log)
	if err != nil {
		return err
	}
	defer prov.Close()
	for i, e := range prov.Entries() {
		role := "decrypts"
		if i == 0 {
			role = "encrypts"
		}
		log.Info("provider", "provider", e.Name, "role", role, "key_state", e.Scope)
	}

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	metrics := plugin.NewMetrics(reg)
	bi := buildinfo.Get(version, commit)
	metrics.SetBuildInfo(bi.Version, bi.Commit, bi.GoVersion, bi.FIPSMode)
	sock, err := plugin.NewSocket(plugin.SocketConfig{
		Path:    cfg.Socket,
		Group:   cfg.SocketGroup,
		Peers:   allowedPeers(cfg.AllowedPeers),
		Logger:  log,
		Metrics: metrics,
	})
	if err != nil {
		return err
	}
	// Removes the socket only while it is still this plugin's (and is a
	// no-op after the gRPC server closed it).
	defer sock.Close()
	svc, err := plugin.New(plugin.Options{
		Entries:         prov.Entries(),
		Logger:          log,
		Metrics:         metrics,
		CheckInterval:   time.Duration(cfg.CheckInterval),
		RefreshInterval: time.Duration(cfg.RefreshInterval),
		MaxStaleness:    time.Duration(cfg.MaxStaleness),
		Socket:          sock,
	})
	if err != nil {
		return err
	}

	// The check runs before the first request so Status is truthful at once.
	svc.Check(ctx)
	bg, cancelBG := context.WithCancel(ctx)
	defer cancelBG()
	go svc.Run(bg)

	if cfg.AllowedPeers != nil {
		log.Info("socket serves only allowed peers", "uids", cfg.AllowedPeers.UIDs, "gids", cfg.AllowedPeers.GIDs)
	}
	if cfg.Health != "" {
		// Optional: a port it cannot bind is logged and retried, never a
		// reason not to serve the socket.
		healthDone := make(chan struct{})
		go func() { defer close(healthDone); svc.ServeHealth(bg, cfg.Health, reg) }()
		defer func() { cancelBG(); <-healthDone }()
	}
	if cfg.Metrics != nil {
		// Optional too, and bound like the health listener: /metrics only,
		// for a cluster Prometheus (config.Validate has checked the address).
		metricsDone := make(chan struct{})
		go func() { defer close(metricsDone); svc.ServeMetrics(bg, cfg.Metrics.Address, reg) }()
		defer func() { cancelBG(); <-metricsDone }()
	}

	gs := plugin.NewGRPCServer(svc)
	served := make(chan error, 1)
	go func() { served <- gs.Serve(sock) }()
	log.Info("serving KMS v2", "socket", cfg.Socket, "version", bi.Version, "commit", bi.Commit, "fips140", bi.FIPSMode)

	select {
	case err := <-served:
		gs.Stop()
		if errors.Is(err, plugin.ErrSocketTaken) {
			return err // names the path and what took it
		}
		return fmt.Errorf("grpc server stopped: %w", err)
	case <-ctx.Done():
	}
	log.Info("shutting down")
	done := make(chan struct{})
	go func() { gs.GracefulStop(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		gs.Stop()
	}
	// GracefulStop closed the listener, which removed the socket file if
	// it was still this plugin's.
	log.Info("stopped")
	return nil
}

// allowedPeers converts the config's peer rule; config.Validate has
// checked every id is in range.
func allowedPeers(p *config.Peers) plugin.Peers {
	if p == nil {
		return plugin.Peers{}
	}
	var out plugin.Peers
	for _, id := range p.UIDs {
		out.UIDs = append(out.UIDs, uint32(id)) //nolint:gosec // G115: config.Validate keeps ids in 0..4294967294
	}
	for _, id := range p.GIDs {
		out.GIDs = append(out.GIDs, uint32(id)) //nolint:gosec // G115: config.Validate keeps ids in 0..4294967294
	}
	return out
}
