package harness

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kms-v2/kms-plugin/internal/testpki"
	"github.com/kms-v2/kms-plugin/rotation/etcdlayout"
)

// Defaults for Options.
const (
	// DefaultStartTimeout bounds Launch: a warm start takes 15-30 s on two
	// busy cores; the margin absorbs a slow CI neighbour.
	DefaultStartTimeout = 3 * time.Minute
)

// EnvKeep, when set, makes Start keep each cluster's folder (logs, configs,
// etcd data) after the test, to debug a failure.
const EnvKeep = "KMS_E2E_KEEP"

// Options shape a control plane. The zero value is one apiserver encrypting
// secrets and configmaps with a fresh file keyset.
type Options struct {
	// APIServers is how many kube-apiservers share the etcd (default 1).
	// Each gets its own kms-plugin process and socket.
	APIServers int
	// Resources are encrypted with KMS v2 first and identity second
	// (default: those of manifests/encryption-config.yaml).
	Resources []string
	// EtcdPrefix is the apiservers' --etcd-prefix (default
	// etcdlayout.DefaultPrefix, and then the flag is not passed at all).
	EtcdPrefix string
	// ProviderName is the EncryptionConfiguration provider name, part of
	// the etcd value prefix k8s:enc:kms:v2:<name>: (default: the name in
	// manifests/encryption-config.yaml).
	ProviderName string
	// ProviderYAML is the body of the plugin config's `provider:` section,
	// shared by every plugin instance and kmsctl, e.g.
	// "pkcs11:\n  module: /usr/lib/softhsm/libsofthsm2.so\n  ...". Empty
	// means a file keyset in the cluster's shared folder.
	ProviderYAML string
	// PluginSettings are extra top-level plugin config fields, overriding
	// the harness's (e.g. {"refreshInterval": "3s"}).
	PluginSettings map[string]any
	// APIServerArgs are appended to every kube-apiserver's flags (a later
	// flag wins), e.g. "--feature-gates=...".
	APIServerArgs []string
	// Env is added to the environment of every kms-plugin and kmsctl run
	// (e.g. SOFTHSM2_CONF, or an emulator's CA bundle).
	Env []string
	// Setup prepares the provider's key state after the config files exist
	// and before any plugin starts. Nil means `kmsctl keys init` when
	// ProviderYAML is empty, and nothing otherwise (a custom Setup can call
	// c.Kmsctl("keys", "init") itself).
	Setup func(ctx context.Context, c *Cluster) error
	// Logf receives the harness's progress lines (not the processes'
	// output, which goes to log files). Nil discards them.
	Logf func(format string, args ...any)
	// StartTimeout bounds Launch (default DefaultStartTimeout).
	StartTimeout time.Duration
	// KeepDir leaves the cluster's folder on disk after Close, for a human
	// to look at. Start also keeps it when $KMS_E2E_KEEP is set.
	KeepDir bool
	// ControllerManager starts kube-controller-manager after the
	// apiservers, running only the storage version migrator and the
	// garbage collector it needs (StorageVersionMigration tests). Off by
	// default: nothing else needs it.
	ControllerManager bool
}

// Cluster is a running control plane. Fields are set by Launch and must
// not be changed.
type Cluster struct {
	// Dir is the cluster's root folder (short, so socket paths fit).
	Dir string
	// SharedDir holds state every plugin instance shares (the keyset).
	SharedDir string
	// ProviderName is the EncryptionConfiguration provider name.
	ProviderName string
	// Resources are the encrypted resources.
	Resources []string
	// Layout is where the apiservers keep objects in etcd (their
	// --etcd-prefix); StoredObject(s) read under it.
	Layout etcdlayout.Layout
	// Token is the admin bearer token (group system:masters) every
	// apiserver accepts.
	Token string
	// Etcd is the etcd member.
	Etcd *Etcd
	// EtcdPKI is etcd's CA and certificates (see the type).
	EtcdPKI EtcdPKI
	// APIServers are the kube-apiservers, one per plugin.
	APIServers []*APIServer
	// Plugins are the kms-plugin instances; Plugins[i] serves APIServers[i].
	Plugins []*Plugin
	// ControllerManager is set with Options.ControllerManager.
	ControllerManager *ControllerManager
	// RotationKubeconfig is a kubeconfig for APIServers[0] as the shipped
	// rotation ServiceAccount (RBAC and FlowSchema applied, a TokenRequest
	// token): kmsctl runs as it, as the CronJob does, not as system:masters.
	RotationKubeconfig string
	// RotationToken is that kubeconfig's token (valid 3 h), for a test
	// that runs kmsctl with in-cluster config as the CronJob's pod does.
	// Never log it.
	RotationToken string

	opts    Options
	bins    bins
	logf    func(format string, args ...any)
	mu      sync.Mutex
	cleanup []func() error
	closed  bool
	spares  []*Etcd           // StartSpareEtcd's members
	secrets map[string]string // aescbc key name -> base64 secret, stable per cluster
}

// EtcdPKI is etcd's CA and certificates in kubeadm's layout: etcd serves
// TLS and demands a client certificate signed by its own CA, as on a
// kubeadm node, so kmsctl's --etcd-cacert, --etcd-cert and --etcd-key are
// exercised by every test that reads etcd, and the rotation CronJob's etcd
// mounts are the files it really needs.
type EtcdPKI = testpki.EtcdPKI

// bins are the executables a cluster runs.
type bins struct {
	apiserver, etcd, kubectl, plugin, kmsctl string
}

// Launch starts a control plane: etcd, the provider setup, one plugin per
// apiserver, then the apiservers, and waits until every apiserver is ready.
// On error everything already started is stopped again. The caller must
// Close the returned cluster.
func Launch(ctx context.Context, opts Options) (_ *Cluster, err error) {
	if opts.APIServers <= 0 {
		opts.APIServers = 1
	}
	shipped, err := LoadShipped()
	if err != nil {
		return nil, fmt.Errorf("the shipped configuration: %w", err)
	}
	if len(opts.Resources) == 0 {
		opts.Resources = shipped.Resources
	}
	if opts.ProviderName == "" {
		opts.ProviderName = shipped.KMS.Name
	}
	if opts.StartTimeout == 0 {
		opts.StartTimeout = DefaultStartTimeout
	}
	layout := etcdlayout.Default()
	if opts.EtcdPrefix != "" {
		if layout, err = etcdlayout.New(opts.EtcdPrefix); err != nil {
			return nil, fmt.Errorf("Options.EtcdPrefix: %w", err)
		}
	}
	logf := opts.Logf
	if logf == nil {
		logf = func(string, ...any) {}
	}
	ctx, cancel := context.WithTimeout(ctx, opts.StartTimeout)
	defer cancel()

	cpDir, err := ControlPlaneBinDir()
	if err != nil {
		return nil, err
	}
	pluginDir, err := PluginBinDir()
	if err != nil {
		return nil, err
	}
	// os.MkdirTemp, not t.TempDir: a test's temp path is long, and a Unix
	// socket path must stay under 108 bytes.
	dir, err := os.MkdirTemp("", "kms")
	if err != nil {
		return nil, err
	}
	c := &Cluster{
		Dir:          dir,
		SharedDir:    filepath.Join(dir, "shared"),
		ProviderName: opts.ProviderName,
		Resources:    opts.Resources,
		Layout:       layout,
		Token:        randomHex(16),
		opts:         opts,
		logf:         logf,
		bins: bins{
			apiserver: filepath.Join(cpDir, "kube-apiserver"),
			etcd:      filepath.Join(cpDir, "etcd"),
			kubectl:   filepath.Join(cpDir, "kubectl"),
			plugin:    filepath.Join(pluginDir, "kms-plugin"),
			kmsctl:    filepath.Join(pluginDir, "kmsctl"),
		},
	}
	c.onClose(func() error {
		if opts.KeepDir {
			return nil
		}
		return os.RemoveAll(dir)
	})
	c.onClose(c.checkLeaks) // after every process stopped, before the folder goes
	defer func() {
		if err != nil {
			err = fmt.Errorf("%w\n%s", err, c.LogTails(30))
			_ = c.Close()
		}
	}()
	for _, d := range []string{c.SharedDir, c.logDir()} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, err
		}
	}
	start := time.Now()

	if c.EtcdPKI, err = testpki.WriteEtcd(filepath.Join(dir, "pki")); err != nil {
		return nil, fmt.Errorf("etcd certificates: %w", err)
	}
	if err := registerKeyFiles(c.EtcdPKI.Keys()); err != nil {
		return nil, err
	}
	logf("harness: starting etcd")
	if c.Etcd, err = c.startEtcd(ctx, "etcd"); err != nil {
		return nil, err
	}

	for i := 0; i < opts.APIServers; i++ {
		p, err := c.newPlugin(i)
		if err != nil {
			return nil, err
		}
		c.Plugins = append(c.Plugins, p)
	}
	setup := opts.Setup
	if setup == nil && opts.ProviderYAML == "" {
		setup = func(ctx context.Context, c *Cluster) error {
			_, err := c.Kmsctl("keys", "init")
			return err
		}
	}
	if setup != nil {
		logf("harness: setting up the provider's keys")
		if err := setup(ctx, c); err != nil {
			return nil, fmt.Errorf("provider setup: %w", err)
		}
	}
	logf("harness: starting %d kms-plugin instance(s)", len(c.Plugins))
	for _, p := range c.Plugins {
		if err := p.Start(ctx); err != nil {
			return nil, err
		}
	}

	for i := 0; i < opts.APIServers; i++ {
		a, err := c.newAPIServer(i)
		if err != nil {
			return nil, err
		}
		c.APIServers = append(c.APIServers, a)
	}
	logf("harness: starting %d kube-apiserver(s); this takes 10-30 s", len(c.APIServers))
	// Start them together: most of the wait is each apiserver's own
	// post-start hooks, which overlap well even on two cores.
	errs := make([]error, len(c.APIServers))
	var wg sync.WaitGroup
	for i, a := range c.APIServers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = a.Start(ctx)
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	if opts.ControllerManager {
		if err := c.startControllerManager(ctx); err != nil {
			return nil, err
		}
	}
	if c.RotationKubeconfig, c.RotationToken, err = c.rotationIdentity(ctx); err != nil {
		return nil, fmt.Errorf("harness: the rotation ServiceAccount: %w", err)
	}
	logf("harness: control plane ready in %s (folder %s)", time.Since(start).Round(100*time.Millisecond), dir)
	c.onClose(c.saveMetrics) // first, while everything still runs
	return c, nil
}

// Start is Launch for tests: it fails the test on error, registers Close
// with t.Cleanup, and on failure logs the tail of every process's log.
func Start(t testing.TB, opts Options) *Cluster {
	t.Helper()
	if opts.Logf == nil {
		opts.Logf = t.Logf
	}
	if os.Getenv(EnvKeep) != "" {
		opts.KeepDir = true
	}
	c, err := Launch(context.Background(), opts)
	if err != nil {
		t.Fatalf("harness: start control plane: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("harness: logs of the control plane at failure:\n%s", c.LogTails(40))
		}
		if err := c.Close(); err != nil {
			t.Errorf("harness: stop control plane: %v", err)
		}
	})
	return c
}

// onClose pushes f on the cleanup stack; Close runs it in reverse order.
func (c *Cluster) onClose(f func() error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.cleanup = append(c.cleanup, f)
}

// Close stops every process (apiservers first, then plugins, then etcd) and
// removes the cluster's folder. It reports processes that had died on their
// own or did not stop on SIGTERM, and data races the race-built plugin
// found. Calling it again does nothing.
func (c *Cluster) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	stack := c.cleanup
	c.cleanup = nil
	c.mu.Unlock()
	var errs []error
	for i := len(stack) - 1; i >= 0; i-- {
		if err := stack[i](); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// LogTails returns the last n lines of every process's log, each under a
// header, for failure messages.
func (c *Cluster) LogTails(n int) string {
	var b strings.Builder
	for _, p := range c.processes() {
		fmt.Fprintf(&b, "----- %s (%s), last %d lines -----\n%s\n", p.name, p.logPath, n, p.tail(n))
	}
	return b.String()
}

// processes lists every process the cluster has, started or not.
func (c *Cluster) processes() []*process {
	var ps []*process
	if c.Etcd != nil {
		ps = append(ps, c.Etcd.proc)
	}
	c.mu.Lock()
	for _, e := range c.spares {
		ps = append(ps, e.proc)
	}
	c.mu.Unlock()
	for _, p := range c.Plugins {
		ps = append(ps, p.proc)
	}
	for _, a := range c.APIServers {
		ps = append(ps, a.proc)
	}
	if c.ControllerManager != nil {
		ps = append(ps, c.ControllerManager.proc)
	}
	return ps
}

// startContext bounds a (re)start by Options.StartTimeout unless ctx
// already has a deadline.
func (c *Cluster) startContext(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return ctx, func() {}
	}
	d := c.opts.StartTimeout
	if d <= 0 {
		d = DefaultStartTimeout
	}
	return context.WithTimeout(ctx, d)
}

func (c *Cluster) logDir() string { return filepath.Join(c.Dir, "logs") }

// randomHex returns n random bytes in hex, for tokens and names.
func randomHex(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(err) // crypto/rand never fails on Linux; if it does, nothing else works either
	}
	return hex.EncodeToString(b)
}
