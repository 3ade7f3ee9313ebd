package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"text/tabwriter"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/spf13/cobra"

	"github.com/kms-v2/kms-plugin/cmd/internal/backends"
	"github.com/kms-v2/kms-plugin/cmd/internal/output"
	"github.com/kms-v2/kms-plugin/config"
	"github.com/kms-v2/kms-plugin/providers"
	"github.com/kms-v2/kms-plugin/rotation"
	"github.com/kms-v2/kms-plugin/rotation/etcdlayout"
)

// keysConfig is the --config and --provider flags every `kmsctl keys`
// subcommand shares.
type keysConfig struct{ path, provider string }

func (k *keysConfig) load() (*config.Config, error) {
	if k.path == "" {
		return nil, errors.New("--config is required: the plugin configuration file")
	}
	return backends.Load(k.path)
}

// entry is the provider the flags select: --provider, else the first.
func (k *keysConfig) entry() (config.Entry, error) {
	cfg, err := k.load()
	if err != nil {
		return config.Entry{}, err
	}
	return backends.Entry(cfg, k.provider)
}

func cliLogger() hclog.Logger {
	return hclog.New(&hclog.LoggerOptions{Name: "kmsctl", Level: hclog.Warn, Output: os.Stderr})
}

// withRotator opens the provider for one lifecycle operation, with a
// deadline so a provider that does not answer cannot hang the command.
func (k *keysConfig) withRotator(fn func(context.Context, providers.Rotator) error) error {
	e, err := k.entry()
	if err != nil {
		return err
	}
	return withEntryRotator(e, fn)
}

// withEntryRotator opens entry e for one operation, under a deadline.
func withEntryRotator(e config.Entry, fn func(context.Context, providers.Rotator) error) error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	p, r, err := backends.OpenRotator(ctx, e, cliLogger())
	if err != nil {
		return err
	}
	defer p.Close()
	return fn(ctx, r)
}

func keysCommand() *cobra.Command {
	k := &keysConfig{}
	cmd := &cobra.Command{
		Use:   "keys",
		Short: "List and manage key versions (init, list, create, promote, disable, enable)",
	}
	cmd.PersistentFlags().StringVar(&k.path, "config", "", "plugin configuration `FILE` (YAML)")
	cmd.PersistentFlags().StringVar(&k.provider, "provider", "", "the configured provider to act on, by name (default: the first, which encrypts; list shows every one)")
	cmd.AddCommand(
		keysInitCommand(k),
		keysListCommand(k),
		keysCreateCommand(k),
		lifecycle("promote", "Make an enabled version the primary (plugins follow within their refresh interval)",
			func(ctx context.Context, r providers.Rotator, id string) error { return r.Promote(ctx, id) }, k.withRotator),
		keysDisableCommand(k),
		lifecycle("enable", "Let a disabled version decrypt again",
			func(ctx context.Context, r providers.Rotator, id string) error { return r.Enable(ctx, id) }, k.withRotator),
	)
	return cmd
}

func keysInitCommand(k *keysConfig) *cobra.Command {
	return &cobra.Command{
		Use:   "init",
		Short: "Create the first key version (refuses if one exists)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			e, err := k.entry()
			if err != nil {
				return err
			}
			v, err := backends.Init(context.Background(), e, cliLogger())
			if err != nil {
				return err
			}
			fmt.Fprintln(cmd.OutOrStdout(), v.KeyID)
			return nil
		},
	}
}

func keysListCommand(k *keysConfig) *cobra.Command {
	var format output.Format
	list := &cobra.Command{
		Use:   "list",
		Short: "List every configured provider's key versions with their state and creation time",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			vs, err := k.listVersions()
			if err != nil {
				return err
			}
			return printVersions(cmd, vs, format)
		},
	}
	output.Register(list.Flags(), &format)
	return list
}

func keysCreateCommand(k *keysConfig) *cobra.Command {
	return &cobra.Command{
		Use:   "create",
		Short: "Add a key version, enabled but not primary; prints its key_id",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return k.withRotator(func(ctx context.Context, r providers.Rotator) error {
				v, err := r.CreateVersion(ctx)
				if err != nil {
					return err
				}
				fmt.Fprintln(cmd.OutOrStdout(), v.KeyID)
				return nil
			})
		},
	}
}

// lifecycle builds a `kmsctl keys VERB KEYID` command.
func lifecycle(verb, short string, op func(context.Context, providers.Rotator, string) error, with func(func(context.Context, providers.Rotator) error) error) *cobra.Command {
	return &cobra.Command{
		Use:   verb + " KEYID",
		Short: short,
		Args: func(_ *cobra.Command, args []string) error {
			if len(args) != 1 {
				return fmt.Errorf("%s takes exactly one KEYID (see `kmsctl keys list`)", verb)
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			return with(func(ctx context.Context, r providers.Rotator) error {
				if err := op(ctx, r, args[0]); err != nil {
					return err
				}
				fmt.Fprintf(cmd.ErrOrStderr(), "%s: %s\n", verb+"d", args[0])
				return nil
			})
		},
	}
}

// keysDisableCommand is `kmsctl keys disable KEYID`, which refuses, before
// it opens the provider, when a --keep-readable snapshot still needs KEYID.
func keysDisableCommand(k *keysConfig) *cobra.Command {
	var (
		flags  keepReadable
		prefix string
		keep   rotation.KeepReadable
	)
	cmd := lifecycle("disable", "Stop a non-primary version from decrypting (check `kmsctl census` first)",
		func(ctx context.Context, r providers.Rotator, id string) error {
			if why := keep.Blocker(func(keyID string) bool { return keyID == id }); why != "" {
				return &exitError{exitRetireRefused, fmt.Errorf("disable %s refused: %s", id, why)}
			}
			return r.Disable(ctx, id)
		}, k.withRotator)
	cmd.Long = `disable stops a non-primary key version from decrypting; objects
still under it become unreadable, so check ` + "`kmsctl census`" + ` first.
With --keep-readable it first reads each etcd snapshot offline (under
--etcd-prefix) and refuses, with exit code 3 and the version unchanged,
when any of them still needs KEYID.`
	flags.register(cmd.Flags())
	cmd.Flags().StringVar(&prefix, "etcd-prefix", etcdlayout.DefaultPrefix, "the apiserver's --etcd-prefix, where --keep-readable looks in each snapshot")
	cmd.PreRunE = func(cmd *cobra.Command, _ []string) error {
		var err error
		keep, err = flags.read(cmd.Context(), prefix)
		return err
	}
	return cmd
}

// listedVersion is one row of `keys list`: a version and its provider.
type listedVersion struct {
	Provider string `json:"provider"`
	providers.KeyVersion
}

// listVersions lists the versions of --provider, or of every provider in
// config order.
func (k *keysConfig) listVersions() ([]listedVersion, error) {
	cfg, err := k.load()
	if err != nil {
		return nil, err
	}
	entries := cfg.Providers
	if k.provider != "" {
		e, err := backends.Entry(cfg, k.provider)
		if err != nil {
			return nil, err
		}
		entries = []config.Entry{e}
	}
	out := []listedVersion{}
	for _, e := range entries {
		err := withEntryRotator(e, func(ctx context.Context, r providers.Rotator) error {
			vs, err := r.Versions(ctx)
			for _, v := range vs {
				out = append(out, listedVersion{Provider: e.Name, KeyVersion: v})
			}
			return err
		})
		if err != nil {
			return nil, err
		}
	}
	return out, nil
}

func printVersions(cmd *cobra.Command, vs []listedVersion, format output.Format) error {
	if format.IsJSON() {
		return output.WriteJSON(cmd.OutOrStdout(), vs)
	}
	w := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "PROVIDER\tKEY ID\tSTATE\tCREATED")
	for _, v := range vs {
		created := "-"
		if !v.Created.IsZero() {
			created = v.Created.UTC().Format(time.RFC3339)
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\n", v.Provider, v.KeyID, v.State, created)
	}
	return w.Flush()
}
