package harness

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"time"
)

// controllers are the only controllers the harness's kube-controller-manager
// runs: the storage version migrator, and the garbage collector whose
// dependency graph the migrator lists objects from (it refuses to start
// without it).
const controllers = "garbage-collector-controller,storage-version-migrator-controller"

// ControllerManager is kube-controller-manager on loopback, talking to
// apiserver 0 as the admin, running only the storage version migrator and
// the garbage collector (Options.ControllerManager). StorageVersionMigration
// is GA and on by default in the pinned v1.37 (feature gate
// StorageVersionMigrator; the apiserver serves storagemigration.k8s.io/v1),
// so it needs no feature gate or --runtime-config.
type ControllerManager struct {
	// URL is https://127.0.0.1:PORT, its secure port (/healthz).
	URL string

	c     *Cluster
	proc  *process
	httpc *http.Client
}

// startControllerManager writes the controller manager's flags, starts it,
// and stops it when the cluster closes (before the apiservers).
func (c *Cluster) startControllerManager(ctx context.Context) error {
	m, err := c.newControllerManager()
	if err != nil {
		return err
	}
	c.ControllerManager = m
	c.onClose(m.Stop)
	c.logf("harness: starting kube-controller-manager (%s)", controllers)
	return m.Start(ctx)
}

// newControllerManager prepares kube-controller-manager; Start runs it.
func (c *Cluster) newControllerManager() (*ControllerManager, error) {
	binDir, err := ControlPlaneBinDir()
	if err != nil {
		return nil, err
	}
	bin := filepath.Join(binDir, "kube-controller-manager")
	if _, err := os.Stat(bin); err != nil {
		return nil, fmt.Errorf("kube-controller-manager: %w (run e2e/tools/build.sh)", err)
	}
	dir := filepath.Join(c.Dir, "kcm")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	m := &ControllerManager{
		URL: fmt.Sprintf("https://127.0.0.1:%d", port),
		c:   c,
		httpc: &http.Client{
			Timeout:   10 * time.Second,
			Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}, // loopback, self-signed
		},
	}
	m.proc = &process{
		name:    "kube-controller-manager",
		path:    bin,
		logPath: filepath.Join(c.logDir(), "kube-controller-manager.log"),
		args: []string{
			"--kubeconfig", c.APIServers[0].Kubeconfig,
			"--controllers", controllers,
			"--leader-elect=false",
			// One identity for every controller: the admin of the kubeconfig.
			"--use-service-account-credentials=false",
			"--bind-address", "127.0.0.1",
			"--secure-port", fmt.Sprint(port),
			"--cert-dir", dir,
			"--v", "1",
		},
	}
	return m, nil
}

// Start runs kube-controller-manager and waits until its /healthz answers
// 200 (at most Options.StartTimeout when ctx has no deadline). The migrator
// starts working once the garbage collector's graph has synced, a few
// seconds later; a migration created meanwhile waits for it.
func (m *ControllerManager) Start(ctx context.Context) error {
	ctx, cancel := m.c.startContext(ctx)
	defer cancel()
	if err := m.proc.start(); err != nil {
		return err
	}
	err := Poll(ctx, 250*time.Millisecond, func() error {
		if done, werr := m.proc.exited(); done {
			return StopPolling(fmt.Errorf("exited: %v", werr))
		}
		return m.healthy(ctx)
	})
	if err != nil {
		return fmt.Errorf("kube-controller-manager not healthy: %w\n%s", err, m.proc.tail(30))
	}
	return nil
}

// healthy asks /healthz (always allowed, no credentials needed).
func (m *ControllerManager) healthy(ctx context.Context) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, m.URL+"/healthz", nil)
	if err != nil {
		return err
	}
	resp, err := m.httpc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<10))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("/healthz: %d: %s", resp.StatusCode, body)
	}
	return nil
}

// Stop sends SIGTERM and waits for kube-controller-manager to exit; a test
// stops it to stall a StorageVersionMigration, and Start runs it again.
func (m *ControllerManager) Stop() error {
	m.httpc.CloseIdleConnections()
	return m.proc.stop()
}

// Running reports whether kube-controller-manager is alive.
func (m *ControllerManager) Running() bool { return m.proc.running() }

// LogTail returns the last n lines of its log.
func (m *ControllerManager) LogTail(n int) string { return m.proc.tail(n) }
