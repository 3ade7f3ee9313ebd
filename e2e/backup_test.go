//go:build e2e

package e2e

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/kms-v2/kms-plugin/e2e/harness"
	"github.com/kms-v2/kms-plugin/rotation"
)

// TestBackup takes an etcd snapshot with etcdctl before a rotation, then
// checks on the real control plane that the snapshot census names the old
// key version while the live census does not, that --keep-readable keeps
// the old version enabled (exit 3 from rotate --retire and keys disable),
// and that without it the retire goes ahead.
func TestBackup(t *testing.T) {
	c := harness.Start(t, harness.Options{})
	ctx := t.Context()
	populate(ctx, t, c, "backup", 6, 3)
	old := mustPrimary(t, c)
	snap := filepath.Join(t.TempDir(), "before-rotation.db")
	if err := c.SaveSnapshot(ctx, snap); err != nil {
		t.Fatal(err)
	}
	rep := rotate(ctx, t, c, 0, "--force", "--resources", "secrets,configmaps")
	if rep.NewKeyID == old {
		t.Fatalf("rotate kept key %s", old)
	}

	if got := snapshotCensus(ctx, t, c, snap); !slices.Contains(got.KeyIDs, old) || slices.Contains(got.KeyIDs, rep.NewKeyID) || !slices.Equal(got.Providers, []string{c.ProviderName}) {
		t.Errorf("snapshot census: key_ids %v, providers %v; want %s (not %s) under provider %s", got.KeyIDs, got.Providers, old, rep.NewKeyID, c.ProviderName)
	}
	if live := liveKeyIDs(ctx, t, c); slices.Contains(live, old) {
		t.Errorf("live census still names %s after the rotation: %v", old, live)
	}

	r := runKmsctl(ctx, t, c, rotateArgs(c, "--retire", "--resources", "secrets,configmaps", "--keep-readable", snap)...)
	if r.code != 3 || !strings.Contains(r.stdout, "snapshot "+snap+" still needs key_id "+old) {
		t.Errorf("rotate --retire --keep-readable: exit %d, want 3 naming the snapshot and %s\nstdout: %s\nstderr: %s", r.code, old, r.stdout, r.stderr)
	}
	r = runKmsctl(ctx, t, c, "keys", "disable", old, "--config", c.KmsctlConfig(), "--keep-readable", snap)
	if r.code != 3 || !strings.Contains(r.stderr, "still needs key_id "+old) || strings.Count(strings.TrimSpace(r.stderr), "\n") != 0 {
		t.Errorf("keys disable --keep-readable: exit %d, want 3 with one line naming %s\nstderr: %s", r.code, old, r.stderr)
	}
	if got := keyState(t, c, old); got != "enabled" {
		t.Fatalf("old key after the refusals: %s, want enabled", got)
	}

	rep = rotate(ctx, t, c, 0, "--retire", "--resources", "secrets,configmaps")
	if !slices.Contains(rep.Retired, old) || keyState(t, c, old) != "disabled" {
		t.Errorf("rotate --retire without --keep-readable: retired %v, old key %s; want %s disabled", rep.Retired, keyState(t, c, old), old)
	}
	testBadSnapshot(ctx, t, c, snap)
}

// snapshotCensus runs `kmsctl census --snapshot` and decodes its JSON.
func snapshotCensus(ctx context.Context, t *testing.T, c *harness.Cluster, snap string) (out struct{ KeyIDs, Providers []string }) {
	t.Helper()
	r := runKmsctl(ctx, t, c, "census", "--snapshot", snap, "--resources", "secrets,configmaps", "-o", "json")
	if r.code != 0 {
		t.Fatalf("census --snapshot: exit %d\n%s", r.code, r.stderr)
	}
	if err := json.Unmarshal([]byte(r.stdout), &out); err != nil {
		t.Fatalf("census --snapshot -o json: %v\n%s", err, r.stdout)
	}
	return out
}

// liveKeyIDs runs the live `kmsctl census` and lists the key_ids it counts.
func liveKeyIDs(ctx context.Context, t *testing.T, c *harness.Cluster) []string {
	t.Helper()
	args := append([]string{"census", "--kubeconfig", c.APIServers[0].Kubeconfig}, c.EtcdFlags()...)
	r := runKmsctl(ctx, t, c, append(args, "--resources", "secrets,configmaps", "-o", "json")...)
	if r.code != 0 {
		t.Fatalf("census: exit %d\n%s", r.code, r.stderr)
	}
	var cs rotation.Census
	if err := json.Unmarshal([]byte(r.stdout), &cs); err != nil {
		t.Fatalf("census -o json: %v\n%s", err, r.stdout)
	}
	var ids []string
	for _, rc := range cs.Resources {
		for _, s := range rc.ByProvider {
			ids = append(ids, s.KeyID)
		}
	}
	return ids
}

// testBadSnapshot: a truncated copy of the real snapshot is refused in
// one line that says how to get a good one.
func testBadSnapshot(ctx context.Context, t *testing.T, c *harness.Cluster, snap string) {
	b, err := os.ReadFile(snap)
	if err != nil {
		t.Fatal(err)
	}
	cut := filepath.Join(t.TempDir(), "cut.db")
	if err := os.WriteFile(cut, b[:len(b)/2], 0o600); err != nil {
		t.Fatal(err)
	}
	r := runKmsctl(ctx, t, c, "census", "--snapshot", cut)
	if msg := strings.TrimSpace(r.stderr); r.code != 1 || !strings.Contains(msg, "etcdctl snapshot save") || strings.Contains(msg, "\n") || r.stdout != "" {
		t.Errorf("census of a truncated snapshot: exit %d, stderr %q, stdout %q; want exit 1, one line with the fix, no census", r.code, msg, r.stdout)
	}
}
