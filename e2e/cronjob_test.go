//go:build e2e

package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kms-v2/kms-plugin/e2e/harness"
	"github.com/kms-v2/kms-plugin/internal/podrun"
)

// loadCronJob is the shipped rotation CronJob's container, as its pod runs
// it.
func loadCronJob(t *testing.T, root string) podrun.Pod {
	t.Helper()
	p, err := podrun.FromCronJobFile(filepath.Join(root, "manifests/rotation-cronjob.yaml"), "kmsctl")
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// testRotationCronJob runs the shipped CronJob's command as its pod would
// run on a kubeadm node (internal/podrun): as its runAsUser, runAsGroup and
// supplementalGroups with every capability dropped and no new privileges,
// with the host files its volumes name bind-mounted at its mount paths and
// every other mount read-only (its readOnlyRootFilesystem), in a private
// mount namespace, and as its ServiceAccount through in-cluster
// config: the harness applied the shipped RBAC and FlowSchema for real,
// took a token from the TokenRequest API and proved the FlowSchema
// classifies it. Every volume is mounted, etcd's CA and client
// certificate and key included: the harness's etcd demands them, as
// kubeadm's does. Two runs: the CronJob's args as written (a young key:
// nothing to rotate, exit 0), then with --force for --if-older-than (a
// full rotation and retire).
//
// What differs from the node, and why: the harness's etcd listens on
// another port than 2379, so --etcd-endpoints is replaced; the
// "kubernetes" EndpointSlice points at the harness's advertise address, so
// --apiservers names the apiserver; the metrics port is left out so a busy
// port cannot fail it.
func testRotationCronJob(ctx context.Context, t *testing.T, c *harness.Cluster, root string) {
	for _, tool := range []string{"unshare", "setpriv"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is needed to run the CronJob as its pod would: %v", tool, err)
		}
	}
	cj := loadCronJob(t, root)
	if got := cj.Spec.ServiceAccountName; got != harness.RotationAccount {
		t.Fatalf("manifests/rotation-cronjob.yaml runs as ServiceAccount %q; the shipped RBAC and FlowSchema are for %q", got, harness.RotationAccount)
	}
	token := c.RotationToken
	host := nodeFiles(t, c, root)
	before, err := c.PrimaryKeyID()
	if err != nil {
		t.Fatal(err)
	}

	report := runCronJob(ctx, t, c, cj, host, token, false)
	if after, _ := c.PrimaryKeyID(); after != before {
		t.Errorf("the CronJob as written rotated a young key: primary %s -> %s", before, after)
	}
	t.Logf("as written: %s", report)

	t.Logf("forced: %s", runCronJob(ctx, t, c, cj, host, token, true))
	after, err := c.PrimaryKeyID()
	if err != nil || after == before {
		t.Fatalf("with --force: primary %s -> %s (%v), want a new one", before, after, err)
	}
	fi, err := os.Stat(c.KeysetPath())
	if err != nil {
		t.Fatal(err)
	}
	if st := fi.Sys().(*syscall.Stat_t); fi.Mode().Perm() != 0o640 || st.Uid != 0 || st.Gid != pluginGID {
		t.Errorf("keyset after the CronJob's rotation: %v %d:%d, want root:%d 0640 (the plugin reads it, only kmsctl writes it)", fi.Mode().Perm(), st.Uid, st.Gid, pluginGID)
	}
	if err := c.WaitForWriteKey(ctx, 0, after); err != nil {
		t.Errorf("the plugin does not serve the CronJob's new primary %s: %v", after, err)
	}
}

// pluginGID is the plugin's group on a node (manifests/sysusers.d).
const pluginGID = 65532

// nodeFiles lays out this cluster's files as a kubeadm node has them for
// the CronJob's hostPath volumes: host path -> file here. The plugin config
// is the shipped one, unchanged: its keyset path, /etc/kms-plugin/keyset.json,
// is the cluster's shared keyset once its folder is mounted there. The
// folder and keyset get the node's shapes: root:65532 0750 and 0640.
func nodeFiles(t *testing.T, c *harness.Cluster, root string) map[string]string {
	t.Helper()
	shipped, err := os.ReadFile(filepath.Join(root, "manifests/plugin-config.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(c.SharedDir, "config.yaml"), shipped, 0o640); err != nil {
		t.Fatal(err)
	}
	for path, mode := range map[string]os.FileMode{c.SharedDir: 0o750, c.KeysetPath(): 0o640, filepath.Join(c.SharedDir, "config.yaml"): 0o640} {
		if err := os.Chown(path, 0, pluginGID); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(path, mode); err != nil {
			t.Fatal(err)
		}
	}
	pki := c.EtcdPKI
	return map[string]string{
		"/etc/kms-plugin": c.SharedDir,
		"/etc/kubernetes/enc/encryption-config.yaml": c.APIServers[0].EncryptionConfig,
		pki.NodePath(pki.CA):                         pki.CA,
		pki.NodePath(pki.ClientCert):                 pki.ClientCert,
		pki.NodePath(pki.ClientKey):                  pki.ClientKey,
	}
}

// runCronJob runs the CronJob's container once (see testRotationCronJob)
// and returns its JSON report; a non-zero exit fails the test. Its root
// filesystem is read-only, as the manifest asks: kmsctl may write only to
// its read-write volume.
func runCronJob(ctx context.Context, t *testing.T, c *harness.Cluster, cj podrun.Pod, host map[string]string, token string, force bool) string {
	t.Helper()
	cj.Container.Args = cronJobArgs(t, c, cj.Container.Args, force)
	container, err := cj.Script(host)
	if err != nil {
		t.Fatalf("manifests/rotation-cronjob.yaml: %v", err)
	}
	sandbox := t.TempDir()
	script := "set -euo pipefail\nmount -t tmpfs -o mode=0755 tmpfs /run\n" +
		podrun.OverlayLines("/etc", sandbox) + saFiles(t, token, c.APIServers[0].ServingCert()) + container
	ctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "unshare", "--mount", "--propagation", "private", "bash", "-c", script)
	port := strings.TrimPrefix(c.APIServers[0].URL, "https://127.0.0.1:")
	// The image's PATH finds kmsctl; here the build's.
	cmd.Env = append(os.Environ(), "KUBERNETES_SERVICE_HOST=127.0.0.1", "KUBERNETES_SERVICE_PORT="+port,
		"PATH="+filepath.Dir(c.KmsctlPath())+":"+os.Getenv("PATH"))
	out, err := cmd.Output()
	if err != nil {
		stderr := ""
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			stderr = string(ee.Stderr)
		}
		t.Fatalf("the CronJob's kmsctl (force %v): %v\nstdout: %s\nstderr: %s", force, err, out, stderr)
	}
	var report struct {
		ExitCode int `json:"exitCode"`
	}
	if err := json.Unmarshal(out, &report); err != nil {
		t.Fatalf("the CronJob's kmsctl (-o=json) printed no JSON report: %v\n%s", err, out)
	}
	return string(out)
}

// cronJobArgs are the container's args with the harness's etcd and
// apiserver in place of the node's (see testRotationCronJob); force
// replaces --if-older-than with --force, as an operator's forced rekey does.
func cronJobArgs(t *testing.T, c *harness.Cluster, args []string, force bool) []string {
	t.Helper()
	var out []string
	for _, a := range args {
		name, _, _ := strings.Cut(a, "=")
		switch name {
		case "--metrics-addr":
			continue
		case "--if-older-than":
			if force {
				a = "--force"
			}
		case "--etcd-endpoints":
			a = "--etcd-endpoints=" + c.Etcd.Endpoint
		}
		out = append(out, a)
	}
	return append(out, "--apiservers="+c.APIServers[0].URL)
}

// saFiles writes the in-cluster ServiceAccount files kubelet would project.
// The CA is the apiserver's self-signed serving certificate bundle.
func saFiles(t *testing.T, token, ca string) string {
	t.Helper()
	return "d=/var/run/secrets/kubernetes.io/serviceaccount; mkdir -p $d\n" +
		fmt.Sprintf("printf %%s %q > $d/token\nprintf kube-system > $d/namespace\ncp %q $d/ca.crt\n", token, ca)
}
