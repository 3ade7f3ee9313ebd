//go:build e2e

package e2e

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kms-v2/kms-plugin/e2e/harness"
	"github.com/kms-v2/kms-plugin/internal/podrun"
	"github.com/kms-v2/kms-plugin/internal/readme"
)

// nodeEtcdEndpoint is etcd's client URL on a kubeadm node, as the README's
// commands name it.
const nodeEtcdEndpoint = "https://127.0.0.1:2379"

// testReadmeClusterSteps runs the README's "Install on kubeadm" steps 4
// and 5 as a user pastes them (manifests/readme_install_test.go runs step
// 1): the kustomize base applied for real with the admin's kubeconfig, then
// the first rotation from a "node": a private mount namespace where this
// cluster's files sit at kubeadm's paths (the shipped plugin config and
// keyset under /etc/kms-plugin, the EncryptionConfiguration, etcd's CA and
// client certificate and key, admin.conf). Only etcd's port and an
// --apiservers flag are changed (see testRotationCronJob for why). Before
// it, objects are stored under a key that is no longer primary, as on a
// cluster that has just turned encryption on or promoted a key; the step
// must exit 0 with every stored secret and configmap under the primary.
func testReadmeClusterSteps(ctx context.Context, t *testing.T, c *harness.Cluster, k kubectl, root string) {
	readmePath := filepath.Join(root, "README.md")
	apply := readmeBlockOf(t, readmePath, "install-cluster")
	runReadmeBlock(ctx, t, "step 4", apply, root, "KUBECONFIG="+c.APIServers[0].Kubeconfig,
		"PATH="+filepath.Dir(c.KubectlPath())+":"+os.Getenv("PATH"))
	for _, obj := range []string{"cronjob/kmsctl-rotate", "configmap/kms-plugin-dashboard", "prometheusrule/kms-plugin", "serviceaccount/kmsctl-rotate"} {
		if out, err := k.run(ctx, nil, "-n", "kube-system", "get", obj, "-o", "name"); err != nil {
			t.Errorf("after the README's step 4, %s is missing: %v\n%s", obj, err, out)
		}
	}

	populate(ctx, t, c, "readme-steps", 20, 10)
	primary, err := c.RotateKey(ctx)
	if err != nil {
		t.Fatal(err)
	}
	stale := 0
	for _, rc := range census(ctx, t, c, primary, "secrets", "configmaps").Resources {
		stale += rc.Stale
	}
	if stale < 30 {
		t.Fatalf("before the README's step 5: %d objects under an old key, want the 30 just made at least", stale)
	}
	rotate := readmeBlockOf(t, readmePath, "install-rotate")
	if !strings.Contains(rotate, nodeEtcdEndpoint) {
		t.Fatalf("the README's step 5 no longer names etcd at %s; update this test with it", nodeEtcdEndpoint)
	}
	rotate = strings.ReplaceAll(rotate, nodeEtcdEndpoint, c.Etcd.Endpoint)
	rotate = strings.TrimRight(rotate, "\n") + " --apiservers " + c.APIServers[0].URL + "\n"
	host := nodeFiles(t, c, root)
	host["/etc/kubernetes/admin.conf"] = c.APIServers[0].Kubeconfig
	sandbox := t.TempDir()
	script := podrun.OverlayLines("/etc", sandbox) + bindMounts(host) + "set -x\n" + rotate
	runReadmeBlock(ctx, t, "step 5", script, root, "PATH="+filepath.Dir(c.KmsctlPath())+":"+os.Getenv("PATH"))

	requireAllUnder(ctx, t, c, primary, "secrets", "configmaps")
}

// readmeBlockOf is the README block marked name, or fails the test.
func readmeBlockOf(t *testing.T, path, name string) string {
	t.Helper()
	block, err := readme.Block(path, name)
	if err != nil {
		t.Fatal(err)
	}
	return block
}

// runReadmeBlock runs script with bash -euo pipefail in a private mount
// namespace, from dir, with env added; a non-zero exit fails the test.
func runReadmeBlock(ctx context.Context, t *testing.T, step, script, dir string, env ...string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "unshare", "--mount", "--propagation", "private", "bash", "-euo", "pipefail", "-c", script)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("README %s: %v\n%s", step, err, out)
	}
	t.Logf("README %s:\n%s", step, out)
}

// bindMounts is a script that bind-mounts each file or folder at its node
// path (node path -> file here); /etc must be an overlay by then, so the
// mount points it makes never reach the machine.
func bindMounts(host map[string]string) string {
	var b strings.Builder
	for node, src := range host {
		b.WriteString(podrun.BindLines(src, node, false))
	}
	return b.String()
}
