package harness

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// RotationAccount is the shipped rotation ServiceAccount's name and
// namespace (manifests/rotation-rbac.yaml), which the shipped FlowSchema
// (manifests/rotation-flowcontrol.yaml) matches.
const RotationAccount, RotationNamespace = "kmsctl-rotate", "kube-system"

// rotationIdentity lets kmsctl run as production runs it: it applies the
// shipped RBAC and flow-control objects, gets a token for the rotation
// ServiceAccount from the TokenRequest API (kubectl create token), and
// writes a kubeconfig for apiserver 0 that uses it. It proves its premise:
// a request with that token is answered under the shipped FlowSchema
// (X-Kubernetes-PF-FlowSchema-UID), so kmsctl is neither system:masters
// nor exempt from API Priority and Fairness.
func (c *Cluster) rotationIdentity(ctx context.Context) (kubeconfig, token string, err error) {
	root, err := RepoRoot()
	if err != nil {
		return "", "", err
	}
	for _, f := range []string{"manifests/rotation-rbac.yaml", "manifests/rotation-flowcontrol.yaml"} {
		if out, err := c.kubectl(ctx, "apply", "--server-side", "-f", filepath.Join(root, f)); err != nil {
			return "", "", fmt.Errorf("apply %s: %w\n%s", f, err, out)
		}
	}
	out, err := c.kubectl(ctx, "-n", RotationNamespace, "create", "token", RotationAccount, "--duration=3h")
	if err != nil {
		return "", "", fmt.Errorf("kubectl create token %s: %w\n%s", RotationAccount, err, out)
	}
	token = strings.TrimSpace(out)
	uid, err := c.kubectl(ctx, "get", "flowschema", RotationAccount, "-o", "jsonpath={.metadata.uid}")
	if err != nil || uid == "" {
		return "", "", fmt.Errorf("the shipped FlowSchema %s: %v\n%s", RotationAccount, err, uid)
	}
	if kubeconfig, err = c.tokenKubeconfig(token); err != nil {
		return "", "", err
	}
	if err := checkFlowSchema(ctx, kubeconfig, c.APIServers[0].URL, uid); err != nil {
		return "", "", err
	}
	return kubeconfig, token, nil
}

// kubectl runs kubectl as the cluster admin.
func (c *Cluster) kubectl(ctx context.Context, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, c.KubectlPath(), append([]string{"--kubeconfig", c.APIServers[0].Kubeconfig}, args...)...)
	out, err := cmd.CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

// tokenKubeconfig is the admin kubeconfig with its user replaced by the
// token, written next to it.
func (c *Cluster) tokenKubeconfig(token string) (string, error) {
	admin := c.APIServers[0].Kubeconfig
	cfg, err := clientcmd.LoadFromFile(admin)
	if err != nil {
		return "", err
	}
	for name, a := range cfg.AuthInfos {
		a.ClientCertificate, a.ClientKey = "", ""
		a.ClientCertificateData, a.ClientKeyData = nil, nil
		a.Token = token
		cfg.AuthInfos[name] = a
	}
	path := filepath.Join(filepath.Dir(admin), RotationAccount+".kubeconfig")
	if err := clientcmd.WriteToFile(*cfg, path); err != nil {
		return "", err
	}
	return path, os.Chmod(path, 0o600)
}

// checkFlowSchema sends one request with the kubeconfig and requires the
// FlowSchema uid in its response.
func checkFlowSchema(ctx context.Context, kubeconfig, server, uid string) error {
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return err
	}
	client, err := rest.HTTPClientFor(cfg)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, server+"/api/v1/namespaces/kube-system/secrets?limit=1", nil)
	if err != nil {
		return err
	}
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("list secrets as %s: %s (the shipped RBAC allows it)", RotationAccount, resp.Status)
	}
	if got := resp.Header.Get("X-Kubernetes-PF-FlowSchema-UID"); got != uid {
		return fmt.Errorf("requests of %s matched FlowSchema uid %q, not the shipped %s (%s)", RotationAccount, got, RotationAccount, uid)
	}
	return nil
}
