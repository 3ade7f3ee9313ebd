package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"

	"github.com/hashicorp/go-hclog"
	"github.com/spf13/cobra"
	"k8s.io/client-go/metadata"

	"github.com/kms-v2/kms-plugin/cmd/internal/backends"
	"github.com/kms-v2/kms-plugin/cmd/internal/output"
	"github.com/kms-v2/kms-plugin/rotation"
	"github.com/kms-v2/kms-plugin/rotation/etcdlayout"
)

// Exit codes of census and rotate, for scripts.
const (
	exitObjectsRemain = 2 // objects not stored as the apiserver writes now
	exitRetireRefused = 3 // --retire found the old key still in use
	exitNotSwitched   = 4 // an apiserver did not switch to the new key
	exitLocked        = 5 // another, live rotation holds the lease
	exitNotShared     = 6 // a per-node provider's new version would reach one node only
)

// censusFlags are the flags of `kmsctl census`.
type censusFlags struct {
	cluster    clusterFlags
	current    string
	configPath string
	output     output.Format
	limit      int
	snapshot   string
}

func censusCommand() *cobra.Command {
	var f censusFlags
	cmd := &cobra.Command{
		Use:   "census",
		Short: "Count, read-only from etcd, how every stored object is protected",
		Long: `census proves first that it reads the apiserver's etcd: it reads the
kube-system namespace through the apiserver (--kubeconfig) and the same key
from etcd under --etcd-prefix, and stops unless the resourceVersion equals
the mod revision. It then scans etcd page by page (read only) and counts,
per resource, the objects under each KMS v2 provider name and key_id, the
plaintext ones, those under another encryption provider, and the
undecodable ones, and names those not stored as the apiserver writes now.
How the apiserver writes each resource comes from --encryption-config (the
provider) and --config or --current-key-id (the key_id).
Exit code 2 when any object is not stored as the apiserver writes now.

With --snapshot FILE it reads an etcd snapshot (as written by etcdctl
snapshot save) offline instead: it checks the sha256 etcd appended, proves
the kube-system namespace is under --etcd-prefix, counts the resources
(refusing one with no object), and lists the KMS v2 key versions and
provider names that every object under the prefix needs: what must be
enabled before that snapshot is restored. Objects are judged only when
--encryption-config comes with --config or --current-key-id.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return runCensus(cmd, f) },
	}
	fs := cmd.Flags()
	f.cluster.register(fs, "count")
	fs.StringVar(&f.current, "current-key-id", "", "the key_id the apiserver's plugin writes with (default: the primary of the provider in --config)")
	fs.StringVar(&f.configPath, "config", "", "plugin configuration `FILE`; its provider's primary is the current key_id")
	output.Register(fs, &f.output)
	fs.IntVar(&f.limit, "list-limit", rotation.DefaultStaleListLimit, "how many objects not stored as the apiserver writes now to name per resource")
	fs.StringVar(&f.snapshot, "snapshot", "", "read this etcd snapshot `FILE` (etcdctl snapshot save) offline instead of a live etcd, and list the key versions its objects need")
	return cmd
}

func runCensus(cmd *cobra.Command, f censusFlags) error {
	if f.snapshot != "" {
		return runSnapshotCensus(cmd.Context(), cmd.OutOrStdout(), f)
	}
	if err := f.cluster.validate(); err != nil {
		return err
	}
	ctx := cmd.Context()
	c, err := takeCensus(ctx, f)
	if err != nil {
		return err
	}
	if f.output.IsJSON() {
		if err := output.WriteJSON(cmd.OutOrStdout(), c); err != nil {
			return err
		}
	} else {
		printCensus(cmd.OutOrStdout(), c)
	}
	if n := c.NotCurrent(); n > 0 {
		return &exitError{exitObjectsRemain, fmt.Errorf("%d objects not stored as the apiserver writes now", n)}
	}
	return nil
}

// takeCensus proves the etcd, resolves resources and writers, and counts.
func takeCensus(ctx context.Context, f censusFlags) (*rotation.Census, error) {
	cfg, err := f.cluster.loadEncryptionConfig()
	if err != nil {
		return nil, err
	}
	restCfg, err := f.cluster.restConfig()
	if err != nil {
		return nil, err
	}
	meta, err := metadata.NewForConfig(restCfg)
	if err != nil {
		return nil, fmt.Errorf("metadata client: %w", err)
	}
	e, closeEtcd, err := f.cluster.openEtcd()
	if err != nil {
		return nil, err
	}
	defer closeEtcd()
	proof, err := rotation.ProveEtcd(ctx, e, meta, rotation.KubeSystemNamespace)
	if err != nil {
		return nil, err
	}
	c, res, err := countProven(ctx, f, cfg, e, proof)
	if err != nil {
		return nil, err
	}
	return c, rotation.CheckNotEmpty(ctx, meta, c, res)
}

// countProven is the census of a proven store (a live etcd or a
// snapshot): the resources to count, how the apiserver writes each, and
// the count, with the proof that it read the right store.
func countProven(ctx context.Context, f censusFlags, cfg *rotation.EncryptionConfig, e rotation.Etcd, proof string) (*rotation.Census, []rotation.Resource, error) {
	res, err := f.cluster.resolveResources(ctx, e, cfg)
	if err != nil {
		return nil, nil, err
	}
	writers, err := censusWriters(ctx, f, cfg, res)
	if err != nil {
		return nil, nil, err
	}
	c, err := rotation.TakeCensus(ctx, e, res, writers, rotation.CensusOptions{StaleListLimit: f.limit})
	if err != nil {
		return nil, nil, err
	}
	c.Proof = proof
	return c, res, nil
}

// censusWriters is how the apiserver writes each resource: the provider
// from the EncryptionConfiguration, the key_id from the flags. Without the
// file, nothing is judged (the key_id alone cannot tell a renamed provider).
func censusWriters(ctx context.Context, f censusFlags, cfg *rotation.EncryptionConfig, res []rotation.Resource) (rotation.Writers, error) {
	if cfg == nil {
		if f.current != "" || f.configPath != "" {
			return nil, errors.New("--encryption-config is required to judge objects: the key_id alone cannot tell which provider name the apiserver writes under")
		}
		return nil, nil
	}
	if f.snapshot != "" && f.current == "" && f.configPath == "" {
		// Offline, the current key_id is not implied: count only.
		return nil, nil
	}
	w := rotation.Writers{}
	for _, r := range res {
		wr := cfg.WriterFor(r)
		if wr.Encoding == etcdlayout.EncodingKMSv2 {
			key, err := currentKeyID(ctx, f)
			if err != nil {
				return nil, err
			}
			wr.KeyID = key
		}
		w[r.Name] = wr
	}
	return w, nil
}

// currentKeyID is --current-key-id, else the primary of --config's provider.
func currentKeyID(ctx context.Context, f censusFlags) (string, error) {
	if f.current != "" {
		return f.current, nil
	}
	if f.configPath == "" {
		return "", errors.New("the apiserver writes through a KMS v2 plugin: give --config (its primary is the current key_id) or --current-key-id")
	}
	cfg, err := backends.Load(f.configPath)
	if err != nil {
		return "", err
	}
	// Only the first provider encrypts, so only its primary is current.
	p, err := backends.OpenEntry(ctx, cfg.Providers[0], hclog.NewNullLogger())
	if err != nil {
		return "", err
	}
	defer p.Close()
	return p.PrimaryKeyID(ctx)
}

// printCensus writes the human form of a census.
func printCensus(out io.Writer, c *rotation.Census) {
	fmt.Fprintf(out, "etcd: %s, prefix %s\n", c.Store, c.Prefix)
	if c.Proof != "" {
		fmt.Fprintf(out, "proof: %s\n", c.Proof)
	}
	w := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "RESOURCE\tSTORED AS\tOBJECTS\t")
	for _, rc := range c.Resources {
		printResourceRows(w, rc)
	}
	w.Flush()
	printNamed(out, c)
}

// printResourceRows writes one resource's rows of the census table.
func printResourceRows(w io.Writer, rc rotation.ResourceCensus) {
	mark := func(current bool) string {
		switch {
		case rc.Writer == nil:
			return ""
		case current:
			return "current"
		}
		return "STALE"
	}
	for _, s := range rc.ByProvider {
		fmt.Fprintf(w, "%s\tkms:v2 %s %s\t%d\t%s\n", rc.Resource, s.Provider, s.KeyID, s.Objects, mark(s.Current))
	}
	plainCurrent := rc.Writer != nil && rc.Writer.Encoding == etcdlayout.EncodingPlain
	rows := []struct {
		label   string
		n       int
		current bool
	}{{"(plaintext)", rc.Plaintext, plainCurrent}, {"(other encryption)", rc.Other, false}, {"(undecodable)", rc.Undecodable, false}}
	for _, x := range rows {
		if x.n > 0 {
			fmt.Fprintf(w, "%s\t%s\t%d\t%s\n", rc.Resource, x.label, x.n, mark(x.current))
		}
	}
	fmt.Fprintf(w, "%s\t(total)\t%d\t\n", rc.Resource, rc.Total)
}

// printNamed writes the verdict and the objects a census names.
func printNamed(out io.Writer, c *rotation.Census) {
	judged := false
	for _, rc := range c.Resources {
		judged = judged || rc.Writer != nil
	}
	if !judged {
		fmt.Fprintf(out, "\n%d objects; none judged (that takes --encryption-config, and for KMS v2 --config or --current-key-id)\n", c.Total())
		return
	}
	fmt.Fprintf(out, "\n%d of %d objects not stored as the apiserver writes now\n", c.NotCurrent(), c.Total())
	for _, rc := range c.Resources {
		if rc.Writer != nil {
			fmt.Fprintf(out, "  %s: the apiserver writes %s\n", rc.Resource, rc.Writer)
		}
		for _, o := range append(rc.StaleObjects, rc.UndecodableObjects...) {
			fmt.Fprintf(out, "  %s %s: %s\n", rc.Resource, strings.TrimPrefix(o.Namespace+"/"+o.Name, "/"), o.Stored)
		}
		if more := rc.Stale + rc.Undecodable - len(rc.StaleObjects) - len(rc.UndecodableObjects); more > 0 {
			fmt.Fprintf(out, "  ... and %d more %s\n", more, rc.Resource)
		}
	}
}
