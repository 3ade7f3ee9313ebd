package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"go.etcd.io/etcd/client/pkg/v3/transport"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/kms-v2/kms-plugin/cmd/internal/backends"
	"github.com/kms-v2/kms-plugin/config"
	"github.com/kms-v2/kms-plugin/rotation"
)

// Exit codes of census and rotate, for scripts.
const (
	exitObjectsRemain = 2 // objects under a key other than the current one
	exitRetireRefused = 3 // --retire found the old key still in use
	exitNotSwitched   = 4 // an apiserver did not switch to the new key
	exitLocked        = 5 // another rotation holds the lease
)

// etcdFlags are the flags that reach etcd read-only.
type etcdFlags struct {
	endpoints            []string
	cacert, cert, keyPEM string
}

func (f *etcdFlags) register(fs *pflag.FlagSet) {
	fs.StringSliceVar(&f.endpoints, "etcd-endpoints", nil, "etcd client URLs (comma-separated); read only, for the census")
	fs.StringVar(&f.cacert, "etcd-cacert", "", "CA bundle that signed etcd's serving certificate")
	fs.StringVar(&f.cert, "etcd-cert", "", "client certificate for etcd")
	fs.StringVar(&f.keyPEM, "etcd-key", "", "client key for etcd")
}

// open returns a read-only store, or nil when no endpoint was given.
func (f *etcdFlags) open() (rotation.Store, func(), error) {
	if len(f.endpoints) == 0 {
		return nil, func() {}, nil
	}
	cfg := clientv3.Config{Endpoints: f.endpoints, DialTimeout: 10 * time.Second, Logger: zap.NewNop()}
	if f.cacert != "" || f.cert != "" || f.keyPEM != "" {
		tlsInfo := transport.TLSInfo{TrustedCAFile: f.cacert, CertFile: f.cert, KeyFile: f.keyPEM}
		tc, err := tlsInfo.ClientConfig()
		if err != nil {
			return nil, nil, fmt.Errorf("etcd TLS: %w", err)
		}
		cfg.TLS = tc
	}
	cli, err := clientv3.New(cfg)
	if err != nil {
		return nil, nil, fmt.Errorf("etcd %s: %w", strings.Join(f.endpoints, ","), err)
	}
	return rotation.EtcdStore{KV: cli.KV}, func() { cli.Close() }, nil
}

// primaryFromConfig asks the configured provider for its primary key_id,
// the key a census judges objects against.
func primaryFromConfig(ctx context.Context, path string) (string, error) {
	cfg, err := config.Load(path)
	if err != nil {
		return "", err
	}
	p, err := backends.Open(ctx, cfg.Provider, hclog.NewNullLogger())
	if err != nil {
		return "", err
	}
	defer p.Close()
	return p.PrimaryKeyID(ctx)
}

func censusCommand() *cobra.Command {
	var (
		etcd       etcdFlags
		resources  []string
		current    string
		configPath string
		output     string
		limit      int
	)
	cmd := &cobra.Command{
		Use:   "census",
		Short: "Count, read-only from etcd, which key protects every stored object",
		Long: `census scans etcd page by page (read only) and counts, per resource, the
objects under each KMS v2 key_id, the unencrypted ones and the undecodable
ones, and names objects still under a key other than the current one.
The current key comes from --current-key-id or from the provider named in
--config. Exit code 2 when any object is under another key.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if output != "table" && output != "json" {
				return fmt.Errorf("-o %q: want table or json", output)
			}
			if len(etcd.endpoints) == 0 {
				return errors.New("--etcd-endpoints is required: the census reads etcd directly")
			}
			res, err := rotation.ParseResources(resources)
			if err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), 30*time.Minute)
			defer cancel()
			if current == "" && configPath != "" {
				if current, err = primaryFromConfig(ctx, configPath); err != nil {
					return err
				}
			}
			store, closeStore, err := etcd.open()
			if err != nil {
				return err
			}
			defer closeStore()
			c, err := rotation.TakeCensus(ctx, store, res, current, rotation.CensusOptions{StaleListLimit: limit})
			if err != nil {
				return err
			}
			if output == "json" {
				if err := printJSON(cmd.OutOrStdout(), c); err != nil {
					return err
				}
			} else {
				printCensus(cmd.OutOrStdout(), c)
			}
			if current != "" && c.Stale() > 0 {
				return &exitError{exitObjectsRemain, fmt.Errorf("%d objects under a key other than %s", c.Stale(), current)}
			}
			return nil
		},
	}
	etcd.register(cmd.Flags())
	cmd.Flags().StringSliceVar(&resources, "resources", []string{"secrets"}, "encrypted resources to count: secrets, configmaps, <resource>.<version>.<group>")
	cmd.Flags().StringVar(&current, "current-key-id", "", "key_id objects should be under")
	cmd.Flags().StringVar(&configPath, "config", "", "plugin configuration file; its provider's primary is the current key")
	cmd.Flags().StringVarP(&output, "output", "o", "table", "output format: table or json")
	cmd.Flags().IntVar(&limit, "list-limit", rotation.DefaultStaleListLimit, "how many objects under an old key to name per resource")
	return cmd
}

// printCensus writes the human form of a census.
func printCensus(out io.Writer, c *rotation.Census) {
	w := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "RESOURCE\tKEY ID\tOBJECTS\t")
	for _, rc := range c.Resources {
		for _, k := range slices.Sorted(maps.Keys(rc.ByKeyID)) {
			mark := ""
			if c.CurrentKeyID != "" {
				if k == c.CurrentKeyID {
					mark = "current"
				} else {
					mark = "OLD"
				}
			}
			fmt.Fprintf(w, "%s\t%s\t%d\t%s\n", rc.Resource, k, rc.ByKeyID[k], mark)
		}
		for _, x := range []struct {
			label string
			n     int
		}{{"(unencrypted)", rc.Unencrypted}, {"(other encryption)", rc.OtherEncryption}, {"(undecodable)", rc.Undecodable}} {
			if x.n > 0 {
				fmt.Fprintf(w, "%s\t%s\t%d\t\n", rc.Resource, x.label, x.n)
			}
		}
		fmt.Fprintf(w, "%s\t(total)\t%d\t\n", rc.Resource, rc.Total)
	}
	w.Flush()
	if c.CurrentKeyID == "" {
		fmt.Fprintf(out, "\n%d objects; no current key given (--current-key-id or --config), so none judged stale\n", c.Total())
		return
	}
	fmt.Fprintf(out, "\n%d of %d objects under a key other than %s\n", c.Stale(), c.Total(), c.CurrentKeyID)
	for _, rc := range c.Resources {
		for _, o := range rc.StaleObjects {
			name := o.Name
			if o.Namespace != "" {
				name = o.Namespace + "/" + name
			}
			fmt.Fprintf(out, "  %s %s under %s\n", rc.Resource, name, o.KeyID)
		}
		if more := rc.Stale - len(rc.StaleObjects); more > 0 && len(rc.StaleObjects) > 0 {
			fmt.Fprintf(out, "  ... and %d more %s\n", more, rc.Resource)
		}
	}
}
