package harness

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// EtcdctlPath is the etcdctl built with the control plane, next to etcd.
func (c *Cluster) EtcdctlPath() string { return filepath.Join(filepath.Dir(c.bins.etcd), "etcdctl") }

// SaveSnapshot takes a backup of the cluster's etcd into path with
// `etcdctl snapshot save`, the command docs/backup-restore.md gives
// operators, so tests read the very file a backup job writes.
func (c *Cluster) SaveSnapshot(ctx context.Context, path string) error {
	cmd := exec.CommandContext(ctx, c.EtcdctlPath(), "--endpoints", c.Etcd.Endpoint,
		"--cacert", c.EtcdPKI.CA, "--cert", c.EtcdPKI.ClientCert, "--key", c.EtcdPKI.ClientKey, "snapshot", "save", path)
	cmd.Env = append(os.Environ(), "ETCDCTL_API=3")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("etcdctl snapshot save %s: %w\n%s", path, err, strings.TrimSpace(string(out)))
	}
	return nil
}
