package harness

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kms-v2/kms-plugin/rotation/etcdlayout"
)

// KmsctlConfig is the config file kmsctl uses by default: plugin 0's. Every
// plugin's config names the same provider, so any would do.
func (c *Cluster) KmsctlConfig() string { return c.Plugins[0].ConfigPath }

// Kmsctl runs kmsctl with args and returns its stdout. It adds
// `--config <KmsctlConfig>` unless args already carry --config. A non-zero
// exit is an error that includes stderr.
func (c *Cluster) Kmsctl(args ...string) (string, error) {
	return c.KmsctlContext(context.Background(), args...)
}

// KmsctlContext is Kmsctl bounded by ctx.
func (c *Cluster) KmsctlContext(ctx context.Context, args ...string) (string, error) {
	if !hasFlag(args, "--config") {
		args = append(args, "--config", c.KmsctlConfig())
	}
	cmd := exec.CommandContext(ctx, c.bins.kmsctl, args...)
	cmd.Env = append(os.Environ(), c.opts.Env...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	c.kmsctlLog(args, stdout.Bytes(), stderr.Bytes())
	if err != nil {
		return stdout.String(), fmt.Errorf("kmsctl %s: %w\nstderr: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

// Env is what Options.Env adds to every kms-plugin and kmsctl process, for
// tests that run kmsctl themselves.
func (c *Cluster) Env() []string { return c.opts.Env }

// KmsctlPath is the kmsctl binary, for tests that run it themselves.
func (c *Cluster) KmsctlPath() string { return c.bins.kmsctl }

// KubectlPath is the kubectl binary built with the control plane.
func (c *Cluster) KubectlPath() string { return c.bins.kubectl }

func hasFlag(args []string, flag string) bool {
	for _, a := range args {
		if a == flag || strings.HasPrefix(a, flag+"=") {
			return true
		}
	}
	return false
}

// Key is one entry of `kmsctl keys list -o json`.
type Key struct {
	// Provider is the configured provider the version belongs to.
	Provider string    `json:"provider"`
	KeyID    string    `json:"keyID"`
	State    string    `json:"state"`
	Created  time.Time `json:"created"`
}

// Keys lists the provider's key versions through kmsctl.
func (c *Cluster) Keys() ([]Key, error) {
	out, err := c.Kmsctl("keys", "list", "-o", "json")
	if err != nil {
		return nil, err
	}
	var keys []Key
	if err := json.Unmarshal([]byte(out), &keys); err != nil {
		return nil, fmt.Errorf("kmsctl keys list -o json: %w: %q", err, out)
	}
	return keys, nil
}

// PrimaryKeyID returns the key_id kmsctl reports as primary for the first
// configured provider, the one that encrypts.
func (c *Cluster) PrimaryKeyID() (string, error) {
	keys, err := c.Keys()
	if err != nil {
		return "", err
	}
	var primary []string
	for _, k := range keys {
		if k.State == "primary" && k.Provider == keys[0].Provider {
			primary = append(primary, k.KeyID)
		}
	}
	if len(primary) != 1 {
		return "", fmt.Errorf("kmsctl keys list: want exactly one primary key, got %d in %+v", len(primary), keys)
	}
	return primary[0], nil
}

// CreateKey runs `kmsctl keys create` and returns the new key_id.
func (c *Cluster) CreateKey() (string, error) {
	out, err := c.Kmsctl("keys", "create")
	if err != nil {
		return "", err
	}
	id := strings.TrimSpace(out)
	if id == "" || strings.ContainsAny(id, " \n") {
		return "", fmt.Errorf("kmsctl keys create: want a key_id alone on stdout, got %q", out)
	}
	return id, nil
}

// Promote runs `kmsctl keys promote keyID`.
func (c *Cluster) Promote(keyID string) error {
	_, err := c.Kmsctl("keys", "promote", keyID)
	return err
}

// RotateKey creates a key, promotes it, and waits until every apiserver
// encrypts new writes with it. It returns the new key_id.
func (c *Cluster) RotateKey(ctx context.Context) (string, error) {
	id, err := c.CreateKey()
	if err != nil {
		return "", err
	}
	if err := c.Promote(id); err != nil {
		return "", err
	}
	for i := range c.APIServers {
		if err := c.WaitForWriteKey(ctx, i, id); err != nil {
			return "", err
		}
	}
	return id, nil
}

// StatusKeyIDMetric is the apiserver metric that records, per key_id hash,
// when that apiserver's last Status call returned it.
const StatusKeyIDMetric = "apiserver_envelope_encryption_key_id_hash_status_last_timestamp_seconds"

// CanaryNamespace holds the configmaps WaitForWriteKey writes.
const CanaryNamespace = "kms-e2e-canary"

// WaitForWriteKey waits until apiserver i encrypts new writes with keyID.
// An apiserver notices a new key_id only on a Status call: every minute, or
// when /readyz runs its kms-providers check once the last healthy result is
// 20 s old. So this asks /readyz/kms-providers, watches the Status metric for
// the key_id's hash, then proves the switch with a canary write read back
// from etcd. It takes up to about 20 s.
func (c *Cluster) WaitForWriteKey(ctx context.Context, i int, keyID string) error {
	a := c.APIServers[i]
	ctx, cancel := context.WithTimeout(ctx, 90*time.Second)
	defer cancel()
	if err := c.ensureNamespace(ctx, a, CanaryNamespace); err != nil {
		return err
	}
	want := KeyIDHash(keyID)
	name := fmt.Sprintf("canary-%d", i)
	err := Poll(ctx, time.Second, func() error {
		if _, _, err := a.Get(ctx, "/readyz/kms-providers"); err != nil {
			return err
		}
		m, err := a.Metrics(ctx)
		if err != nil {
			return err
		}
		if !m.Has(StatusKeyIDMetric, map[string]string{"key_id_hash": want}) {
			return fmt.Errorf("%s has no series with key_id_hash %s (has %v)", StatusKeyIDMetric, want, m.LabelValues(StatusKeyIDMetric, "key_id_hash"))
		}
		cm := &corev1.ConfigMap{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: CanaryNamespace},
			Data:       map[string]string{"written": time.Now().Format(time.RFC3339Nano)},
		}
		if _, err := a.Client.CoreV1().ConfigMaps(CanaryNamespace).Update(ctx, cm, metav1.UpdateOptions{}); err != nil {
			if _, err := a.Client.CoreV1().ConfigMaps(CanaryNamespace).Create(ctx, cm, metav1.CreateOptions{}); err != nil {
				return fmt.Errorf("canary write: %w", err)
			}
		}
		got, err := c.StoredObject(ctx, c.Layout.Key("configmaps", CanaryNamespace, name))
		if err != nil {
			return err
		}
		if got.Stored.Encoding != etcdlayout.EncodingKMSv2 || got.Stored.KeyID != keyID {
			return fmt.Errorf("canary stored as %s under key_id %q, want kmsv2 under %q", got.Stored.Encoding, got.Stored.KeyID, keyID)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("kube-apiserver-%d did not switch to key_id %q: %w", i, keyID, err)
	}
	return nil
}

// ensureNamespace creates ns through a if it does not exist.
func (c *Cluster) ensureNamespace(ctx context.Context, a *APIServer, ns string) error {
	_, err := a.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("create namespace %s: %w", ns, err)
	}
	return nil
}

// CreateNamespace creates ns (through apiserver 0) unless it exists.
func (c *Cluster) CreateNamespace(ctx context.Context, ns string) error {
	return c.ensureNamespace(ctx, c.APIServers[0], ns)
}
