// Command kmsctl is the operator CLI: key versions (`kmsctl keys`), and the
// rotation orchestrator's front end (`kmsctl rotate`, `kmsctl census`).
// It reads the same configuration file as kms-plugin, so both always manage
// the same backend and key.
package main

import (
	"errors"
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/kms-v2/kms-plugin/cmd/internal/cli"

	"github.com/kms-v2/kms-plugin/providers/secretfile"
)

// version and commit are set at release build time with -ldflags
// "-X main.version=... -X main.commit=..."; unset, `version` falls back to
// what the Go toolchain recorded (cmd/internal/buildinfo).
var version, commit string

func main() {
	// kmsctl is the administrator's tool: run as root it manages a keyset
	// owned by the plugin's user, and keeps that owner.
	secretfile.SetRole(secretfile.Admin)
	root := &cobra.Command{
		Use:           "kmsctl",
		Short:         "Manage KMS v2 plugin keys and rotate them safely",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	for _, c := range subcommands {
		root.AddCommand(c())
	}
	root.AddCommand(cli.VersionCommand(version, commit))
	cli.Strict(root)
	if err := root.Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "kmsctl: "+err.Error())
		os.Exit(exitCode(err))
	}
}

// subcommands lists the top-level commands; each file adds its own.
var subcommands = []func() *cobra.Command{keysCommand, rotateCommand, censusCommand}

// exitError carries a specific exit code (for scripts) with its message.
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string { return e.err.Error() }
func (e *exitError) Unwrap() error { return e.err }

func exitCode(err error) int {
	if e := (*exitError)(nil); errors.As(err, &e) {
		return e.code
	}
	return 1
}
