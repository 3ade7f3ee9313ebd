package main

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/kms-v2/kms-plugin/rotation"
)

func TestRotateExitCodes(t *testing.T) {
	tests := []struct {
		name string
		err  error
		want int
	}{
		{name: "objects remain", err: fmt.Errorf("3 left: %w", rotation.ErrObjectsRemain), want: exitObjectsRemain},
		{name: "retire refused", err: fmt.Errorf("x: %w", rotation.ErrRetireRefused), want: exitRetireRefused},
		{name: "not switched", err: fmt.Errorf("x: %w", rotation.ErrNotSwitched), want: exitNotSwitched},
		{name: "locked", err: fmt.Errorf("x: %w", rotation.ErrLocked), want: exitLocked},
		{name: "failed migration with objects left", err: fmt.Errorf("StorageVersionMigration x: Failed: %w; 3 objects left: %w", rotation.ErrMigrationFailed, rotation.ErrObjectsRemain), want: exitObjectsRemain},
		{name: "stalled migration", err: fmt.Errorf("x: %w", rotation.ErrMigrationStalled), want: 1},
		{name: "objects remain wins over retire", err: errors.Join(fmt.Errorf("a: %w", rotation.ErrObjectsRemain), fmt.Errorf("b: %w", rotation.ErrRetireRefused)), want: exitObjectsRemain},
		{name: "other", err: errors.New("boom"), want: 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got, want := exitCode(rotateExit(tt.err)), tt.want; got != want {
				t.Errorf("exit code: got %d, want %d", got, want)
			}
		})
	}
	if err := rotateExit(nil); err != nil {
		t.Errorf("nil error: got %v", err)
	}
}

func TestRotateFlagErrors(t *testing.T) {
	tests := []struct {
		name string
		args []string
		want string
	}{
		{name: "no config", args: []string{}, want: "--config is required"},
		{name: "force and age", args: []string{"--config", "x.yaml", "--force", "--if-older-than", "1h"}, want: "exclude each other"},
		{name: "bad output", args: []string{"--config", "x.yaml", "-o", "yaml"}, want: "want table or json"},
		{name: "metrics on every interface", args: []string{"--config", "x.yaml", "--metrics-addr", ":9090"}, want: "--metrics-addr-allow-remote"},
		{name: "metrics address without port", args: []string{"--config", "x.yaml", "--metrics-addr", "127.0.0.1"}, want: "want 127.0.0.1:PORT"},
		{name: "remote metrics allowed", args: []string{"--config", "x.yaml", "--metrics-addr", ":9090", "--metrics-addr-allow-remote"}, want: "--etcd-endpoints is required"},
		{name: "bad resource", args: []string{"--config", "x.yaml", "--resources", "deployments"}, want: "resource \"deployments\""},
		{name: "zero concurrency", args: []string{"--config", "x.yaml", "--concurrency", "0"}, want: "at least 1"},
		{name: "keep-readable without retire", args: []string{"--config", "x.yaml", "--keep-readable", "s.db"}, want: "--keep-readable only guards --retire"},
		{name: "unknown rewrite engine", args: []string{"--config", "x.yaml", "--rewrite-with", "svm"}, want: `--rewrite-with "svm": want kmsctl or storageversionmigration`},
		{name: "zero migration timeout", args: []string{"--config", "x.yaml", "--rewrite-with", "storageversionmigration", "--migration-timeout", "0s"}, want: "--migration-timeout 0s: want more than 0"},
		{name: "etcd key without cert", args: []string{"--config", "x.yaml", "--etcd-endpoints", "https://127.0.0.1:2379", "--etcd-key", "c.key"}, want: "--etcd-cert and --etcd-key go together"},
		{name: "etcd cert without key", args: []string{"--config", "x.yaml", "--etcd-endpoints", "https://127.0.0.1:2379", "--etcd-cert", "c.crt"}, want: "--etcd-cert and --etcd-key go together"},
		{name: "storageversionmigration accepted", args: []string{"--config", "x.yaml", "--rewrite-with", "storageversionmigration"}, want: "--etcd-endpoints is required"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cmd := rotateCommand()
			cmd.SetArgs(tt.args)
			cmd.SilenceUsage, cmd.SilenceErrors = true, true
			err := cmd.Execute()
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("err: got %v, want it to contain %q", err, tt.want)
			}
		})
	}
}

func TestCensusRequiresEtcd(t *testing.T) {
	cmd := censusCommand()
	cmd.SetArgs([]string{"--current-key-id", "file:k/1"})
	cmd.SilenceUsage, cmd.SilenceErrors = true, true
	if err := cmd.Execute(); err == nil || !strings.Contains(err.Error(), "--etcd-endpoints is required") {
		t.Errorf("err: got %v, want --etcd-endpoints is required", err)
	}
}
