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

	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"

	"github.com/kms-v2/kms-plugin/e2e/harness"
)

// cronJob is the shipped rotation CronJob's pod: what it runs, as whom,
// with which host files.
type cronJob struct {
	spec      corev1.PodSpec
	container corev1.Container
}

func loadCronJob(t *testing.T, root string) cronJob {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(root, "manifests/rotation-cronjob.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var cj batchv1.CronJob
	if err := yaml.UnmarshalStrict(b, &cj); err != nil {
		t.Fatalf("manifests/rotation-cronjob.yaml: %v", err)
	}
	spec := cj.Spec.JobTemplate.Spec.Template.Spec
	if len(spec.Containers) != 1 {
		t.Fatalf("manifests/rotation-cronjob.yaml: want one container, got %d", len(spec.Containers))
	}
	return cronJob{spec: spec, container: spec.Containers[0]}
}

// testRotationCronJob runs the shipped CronJob's command as its pod would
// run on a kubeadm node: as its runAsUser, runAsGroup and
// supplementalGroups with every capability dropped and no new privileges,
// with the host files its volumes name bind-mounted at its mount paths (in
// a private mount namespace), and as its ServiceAccount through in-cluster
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
	if got := cj.spec.ServiceAccountName; got != harness.RotationAccount {
		t.Fatalf("manifests/rotation-cronjob.yaml runs as ServiceAccount %q; the shipped RBAC and FlowSchema are for %q", got, harness.RotationAccount)
	}
	token := c.RotationToken
	host := nodeFiles(t, c, root)
	before, err := c.PrimaryKeyID()
	if err != nil {
		t.Fatal(err)
	}

	ca := filepath.Join(filepath.Dir(c.APIServers[0].Kubeconfig), "certs", "apiserver.crt")
	host["ca.crt"] = ca
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
// and returns its JSON report; a non-zero exit fails the test.
func runCronJob(ctx context.Context, t *testing.T, c *harness.Cluster, cj cronJob, host map[string]string, token string, force bool) string {
	t.Helper()
	args := cronJobArgs(t, c, cj.container.Args, force)
	sandbox := t.TempDir()
	script := "set -euo pipefail\nmount -t tmpfs -o mode=0755 tmpfs /run\n" +
		fmt.Sprintf("mkdir -p %[1]s/u %[1]s/w; mount -t overlay overlay -o lowerdir=/etc,upperdir=%[1]s/u,workdir=%[1]s/w /etc\n", sandbox) + saFiles(t, token, host["ca.crt"]) + mounts(t, cj, host) +
		fmt.Sprintf("exec setpriv %s %q %s\n", identity(t, cj), c.KmsctlPath(), shellQuote(args))
	ctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "unshare", "--mount", "--propagation", "private", "bash", "-c", script)
	port := strings.TrimPrefix(c.APIServers[0].URL, "https://127.0.0.1:")
	cmd.Env = append(os.Environ(), "KUBERNETES_SERVICE_HOST=127.0.0.1", "KUBERNETES_SERVICE_PORT="+port)
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

// mounts bind-mounts each hostPath volume's host file at the container's
// mount path, read-only where the manifest says so (/etc is an overlay by
// then, so the mount points made here never reach the machine). A volume
// the harness has no file for fails the test: the pod would not start.
func mounts(t *testing.T, cj cronJob, host map[string]string) string {
	t.Helper()
	var b strings.Builder
	n := 0
	for _, m := range cj.container.VolumeMounts {
		var hp string
		for _, v := range cj.spec.Volumes {
			if v.Name == m.Name && v.HostPath != nil {
				hp = v.HostPath.Path
			}
		}
		src, ok := host[hp]
		if !ok {
			t.Fatalf("manifests/rotation-cronjob.yaml mounts host path %q (volume %s), which this test does not lay out", hp, m.Name)
		}
		n++
		bindMount(&b, src, m.MountPath, m.ReadOnly)
	}
	if n != len(host)-1 { // all but ca.crt, which is the ServiceAccount's
		t.Fatalf("the CronJob mounts %d of the %d host paths it needs (%v)", n, len(host), host)
	}
	return b.String()
}

// bindMount adds to b the lines that bind-mount src at dst, made first as
// a folder or an empty file like src, and read-only if ro.
func bindMount(b *strings.Builder, src, dst string, ro bool) {
	if fi, err := os.Stat(src); err == nil && fi.IsDir() {
		fmt.Fprintf(b, "mkdir -p %q\n", dst)
	} else {
		fmt.Fprintf(b, "mkdir -p %q; touch %q\n", filepath.Dir(dst), dst)
	}
	fmt.Fprintf(b, "mount --bind %q %q\n", src, dst)
	if ro {
		fmt.Fprintf(b, "mount -o remount,bind,ro %q\n", dst)
	}
}

// identity is setpriv's arguments for the pod's user, groups and the
// container's securityContext: capabilities dropped, no new privileges.
func identity(t *testing.T, cj cronJob) string {
	t.Helper()
	sc, csc := cj.spec.SecurityContext, cj.container.SecurityContext
	if sc == nil || sc.RunAsUser == nil || sc.RunAsGroup == nil {
		t.Fatal("manifests/rotation-cronjob.yaml: the pod must set runAsUser and runAsGroup (an explicit user)")
	}
	if csc == nil || csc.Capabilities == nil || len(csc.Capabilities.Drop) != 1 || csc.Capabilities.Drop[0] != "ALL" || len(csc.Capabilities.Add) != 0 {
		t.Fatal("manifests/rotation-cronjob.yaml: the container must drop ALL capabilities and add none")
	}
	groups := "--clear-groups"
	if len(sc.SupplementalGroups) > 0 {
		var gs []string
		for _, g := range sc.SupplementalGroups {
			gs = append(gs, fmt.Sprint(g))
		}
		groups = "--groups=" + strings.Join(gs, ",")
	}
	return fmt.Sprintf("--reuid=%d --regid=%d %s --inh-caps=-all --ambient-caps=-all --bounding-set=-all --no-new-privs", *sc.RunAsUser, *sc.RunAsGroup, groups)
}

func shellQuote(args []string) string {
	q := make([]string, len(args))
	for i, a := range args {
		q[i] = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
	}
	return strings.Join(q, " ")
}
