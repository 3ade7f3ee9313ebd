package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"text/tabwriter"

	"github.com/spf13/pflag"

	"github.com/kms-v2/kms-plugin/cmd/internal/output"
	"github.com/kms-v2/kms-plugin/rotation"
	"github.com/kms-v2/kms-plugin/rotation/etcdlayout"
)

// snapshotCensus is `kmsctl census --snapshot`: the census of the
// resources, plus what every object under the prefix needs to be read
// once the snapshot is restored.
type snapshotCensus struct {
	Snapshot string `json:"snapshot"`
	// Revision is the newest etcd revision in the snapshot.
	Revision int64 `json:"revision"`
	// KeyIDs and Providers are the key versions and the KMS v2 provider
	// names a restore needs, for scripts; Needs has their counts.
	KeyIDs    []string        `json:"keyIDs"`
	Providers []string        `json:"providers"`
	Needs     *rotation.Needs `json:"needs"`
	*rotation.Census
}

// validateSnapshot checks census's flags with --snapshot: the file is read
// offline, so flags that reach a live cluster are mistakes, not defaults.
func (f *censusFlags) validateSnapshot() error {
	c := f.cluster
	if len(c.endpoints) > 0 || c.kubeconfig != "" || c.cacert != "" || c.cert != "" || c.keyPEM != "" {
		return errors.New("--snapshot reads a file offline: drop --etcd-endpoints, the --etcd TLS flags and --kubeconfig, or drop --snapshot for a live census")
	}
	if len(c.resources) > 0 {
		if _, err := rotation.ParseResources(c.resources); err != nil {
			return err
		}
	}
	if _, err := etcdlayout.New(c.prefix); err != nil {
		return fmt.Errorf("--etcd-prefix: %w", err)
	}
	return nil
}

// takeSnapshotCensus proves the snapshot holds an apiserver's objects under
// the prefix, counts the resources, and refuses an empty count.
func takeSnapshotCensus(ctx context.Context, f censusFlags) (*snapshotCensus, error) {
	cfg, err := f.cluster.loadEncryptionConfig()
	if err != nil {
		return nil, err
	}
	layout, err := etcdlayout.New(f.cluster.prefix)
	if err != nil {
		return nil, fmt.Errorf("--etcd-prefix: %w", err)
	}
	snap, err := etcdlayout.OpenSnapshot(f.snapshot)
	if err != nil {
		return nil, err
	}
	defer snap.Close()
	e := rotation.Etcd{Store: snap, Layout: layout}
	proof, err := rotation.ProveSnapshot(ctx, e)
	if err != nil {
		return nil, err
	}
	c, _, err := countProven(ctx, f, cfg, e, proof)
	if err != nil {
		return nil, err
	}
	if err := rotation.CheckSnapshotNotEmpty(c); err != nil {
		return nil, err
	}
	needs, err := rotation.KeysNeeded(ctx, e)
	if err != nil {
		return nil, err
	}
	return &snapshotCensus{Snapshot: f.snapshot, Revision: snap.Revision(), KeyIDs: needs.KeyIDs(), Providers: needs.Providers(), Needs: needs, Census: c}, nil
}

// runSnapshotCensus is runCensus for --snapshot.
func runSnapshotCensus(ctx context.Context, out io.Writer, f censusFlags) error {
	if err := f.validateSnapshot(); err != nil {
		return err
	}
	sc, err := takeSnapshotCensus(ctx, f)
	if err != nil {
		return err
	}
	if f.output.IsJSON() {
		if err := output.WriteJSON(out, sc); err != nil {
			return err
		}
	} else {
		fmt.Fprintf(out, "snapshot: %s at revision %d, sha256 verified\n", sc.Snapshot, sc.Revision)
		printCensus(out, sc.Census)
		printNeeds(out, sc.Prefix, sc.Needs)
	}
	if n := sc.NotCurrent(); n > 0 {
		return &exitError{exitObjectsRemain, fmt.Errorf("%d objects in the snapshot not stored as the apiserver writes now", n)}
	}
	return nil
}

// printNeeds writes the human form of what a restore of the snapshot needs.
func printNeeds(out io.Writer, prefix string, n *rotation.Needs) {
	fmt.Fprintf(out, "\nto read its %d objects under %s/ a restore needs:\n", n.Objects, prefix)
	if len(n.Keys) == 0 {
		fmt.Fprintln(out, "  no KMS v2 key version (no object is stored through a KMS v2 plugin)")
	} else {
		w := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
		fmt.Fprintln(w, "  PROVIDER\tKEY ID\tOBJECTS")
		for _, k := range n.Keys {
			fmt.Fprintf(w, "  %s\t%s\t%d\n", k.Provider, k.KeyID, k.Objects)
		}
		w.Flush()
	}
	fmt.Fprintf(out, "  plaintext %d, other encryption %d, undecodable %d\n", n.Plaintext, n.Other, n.Undecodable)
	if n.Undecodable > 0 {
		fmt.Fprintln(out, "  undecodable values might need any key version: keep every version enabled while this snapshot may be restored")
	}
}

// keepReadable is the --keep-readable flag of `keys disable` and `rotate`.
type keepReadable struct{ paths []string }

func (k *keepReadable) register(fs *pflag.FlagSet) {
	fs.StringSliceVar(&k.paths, "keep-readable", nil, "etcd snapshot `FILES` (repeat the flag or separate with commas) that must stay restorable: refuse (exit 3) to disable a key version any of them needs (see `kmsctl census --snapshot`)")
}

// read reads every snapshot, proving each holds an apiserver's objects
// under prefix: before any key changes, so a bad file changes nothing.
func (k *keepReadable) read(ctx context.Context, prefix string) (rotation.KeepReadable, error) {
	if len(k.paths) == 0 {
		return nil, nil
	}
	layout, err := etcdlayout.New(prefix)
	if err != nil {
		return nil, fmt.Errorf("--etcd-prefix: %w", err)
	}
	return rotation.ReadKeepReadable(ctx, k.paths, layout)
}
