package harness

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// APIServer is one kube-apiserver on loopback.
type APIServer struct {
	// Index matches the Plugins entry that serves this apiserver.
	Index int
	// URL is https://127.0.0.1:PORT.
	URL string
	// Token is the admin bearer token (system:masters).
	Token string
	// Kubeconfig is a kubeconfig file for this apiserver with the admin
	// token, for kubectl and for tools under test.
	Kubeconfig string
	// EncryptionConfig is the EncryptionConfiguration file it loads;
	// SetEncryptionConfig or Reconfigure change it.
	EncryptionConfig string
	// RESTConfig reaches this apiserver as admin; copy it before changing.
	RESTConfig *rest.Config
	// Client is an admin clientset for this apiserver.
	Client *kubernetes.Clientset
	// ExtraArgs are appended to the harness's flags at the next Start, so
	// a test can restart one apiserver with, say, a feature gate changed.
	ExtraArgs []string

	c        *Cluster
	proc     *process
	httpc    *http.Client
	baseArgs []string
}

// newAPIServer writes apiserver i's files; Start runs it.
func (c *Cluster) newAPIServer(i int) (*APIServer, error) {
	dir := filepath.Join(c.Dir, fmt.Sprintf("a%d", i))
	if err := os.MkdirAll(filepath.Join(dir, "certs"), 0o700); err != nil {
		return nil, err
	}
	saKey, tokens, err := c.apiserverSharedFiles()
	if err != nil {
		return nil, err
	}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	a := &APIServer{
		Index:            i,
		URL:              fmt.Sprintf("https://127.0.0.1:%d", port),
		Token:            c.Token,
		Kubeconfig:       filepath.Join(dir, "kubeconfig"),
		EncryptionConfig: filepath.Join(dir, "encryption-config.yaml"),
		c:                c,
	}
	encCfg, err := c.renderEncryptionConfig(c.Plugins[i].Socket, c.DefaultEncryptionProviders())
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(a.EncryptionConfig, encCfg, 0o600); err != nil {
		return nil, err
	}
	if err := os.WriteFile(a.Kubeconfig, kubeconfig(fmt.Sprintf("kms-e2e-%d", i), a.URL, c.Token), 0o600); err != nil {
		return nil, err
	}
	// The serving certificate is self-signed by the apiserver itself
	// (--cert-dir); the harness trusts loopback instead of plumbing a CA.
	a.RESTConfig = &rest.Config{
		Host:            a.URL,
		BearerToken:     c.Token,
		TLSClientConfig: rest.TLSClientConfig{Insecure: true},
		// Tests create hundreds of objects; client-go's default 5 QPS would
		// turn seconds into minutes.
		QPS:   500,
		Burst: 1000,
		// Registers the values of the Secrets and ConfigMaps tests write.
		WrapTransport: wrapCanary,
	}
	if a.Client, err = kubernetes.NewForConfig(a.RESTConfig); err != nil {
		return nil, err
	}
	a.httpc = &http.Client{
		Timeout:   30 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}, // loopback, self-signed
	}
	args := []string{
		"--etcd-servers", c.Etcd.Endpoint,
		"--etcd-cafile", c.EtcdPKI.CA,
		"--etcd-certfile", c.EtcdPKI.ClientCert,
		"--etcd-keyfile", c.EtcdPKI.ClientKey,
		"--secure-port", fmt.Sprint(port),
		"--bind-address", "127.0.0.1",
		"--cert-dir", filepath.Join(dir, "certs"),
		"--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file", saKey,
		"--service-account-signing-key-file", saKey,
		"--token-auth-file", tokens,
		"--authorization-mode", "RBAC",
		"--service-cluster-ip-range", "10.96.0.0/16",
		"--encryption-provider-config", a.EncryptionConfig,
		"--v", "1",
	}
	if c.opts.EtcdPrefix != "" {
		args = append(args, "--etcd-prefix", c.Layout.Prefix())
	}
	if len(c.Plugins) > 1 {
		// Every apiserver would otherwise fight over the kubernetes
		// Service endpoints, and loopback is not an allowed advertise address.
		args = append(args, "--endpoint-reconciler-type", "none")
	}
	a.baseArgs = append(args, c.opts.APIServerArgs...)
	a.proc = &process{
		name:    fmt.Sprintf("kube-apiserver-%d", i),
		path:    c.bins.apiserver,
		logPath: filepath.Join(c.logDir(), fmt.Sprintf("kube-apiserver-%d.log", i)),
	}
	c.onClose(func() error {
		a.httpc.CloseIdleConnections()
		return a.proc.stop()
	})
	return a, nil
}

// apiserverSharedFiles writes, once, what every apiserver must share: the
// service-account key (so a token minted by one verifies on the others) and
// the static token file with the admin token.
func (c *Cluster) apiserverSharedFiles() (saKey, tokens string, err error) {
	saKey = filepath.Join(c.SharedDir, "sa.key")
	tokens = filepath.Join(c.SharedDir, "tokens.csv")
	if _, err := os.Stat(saKey); err == nil {
		return saKey, tokens, nil
	}
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return "", "", err
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return "", "", err
	}
	// One PEM file serves as both the signing key and, through its public
	// half, the verification key.
	if err := os.WriteFile(saKey, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600); err != nil {
		return "", "", err
	}
	line := fmt.Sprintf("%s,kms-e2e-admin,kms-e2e-admin,\"system:masters\"\n", c.Token)
	if err := os.WriteFile(tokens, []byte(line), 0o600); err != nil {
		return "", "", err
	}
	return saKey, tokens, nil
}

// ServingCert is the apiserver's self-signed serving certificate (written
// under --cert-dir): the CA bundle in-cluster clients trust, and a CA that
// signed nothing else.
func (a *APIServer) ServingCert() string {
	return filepath.Join(filepath.Dir(a.Kubeconfig), "certs", "apiserver.crt")
}

func kubeconfig(name, server, token string) []byte {
	return fmt.Appendf(nil, `apiVersion: v1
kind: Config
clusters:
  - name: %[1]s
    cluster:
      server: %[2]s
      insecure-skip-tls-verify: true
users:
  - name: %[1]s-admin
    user:
      token: %[3]s
contexts:
  - name: %[1]s
    context:
      cluster: %[1]s
      user: %[1]s-admin
current-context: %[1]s
`, name, server, token)
}

// Start runs the apiserver and waits until /readyz answers 200, at most
// Options.StartTimeout when ctx has no deadline of its own: an apiserver
// that cannot get ready (say, it can no longer decrypt what it must list)
// fails the test instead of hanging it.
func (a *APIServer) Start(ctx context.Context) error {
	ctx, cancel := a.c.startContext(ctx)
	defer cancel()
	a.proc.args = append(append([]string(nil), a.baseArgs...), a.ExtraArgs...)
	if err := a.proc.start(); err != nil {
		return err
	}
	err := Poll(ctx, 250*time.Millisecond, func() error {
		if done, werr := a.proc.exited(); done {
			return StopPolling(fmt.Errorf("exited: %v", werr))
		}
		code, body, err := a.Get(ctx, "/readyz")
		if err != nil {
			return err
		}
		if code != http.StatusOK {
			return fmt.Errorf("/readyz: %d: %s", code, failedChecks(body))
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("%s not ready: %w\n%s", a.proc.name, err, a.proc.tail(30))
	}
	return nil
}

// failedChecks keeps the failing lines of a verbose health answer.
func failedChecks(body string) string {
	var bad []string
	for _, l := range strings.Split(body, "\n") {
		if strings.HasPrefix(l, "[-]") {
			bad = append(bad, l)
		}
	}
	if len(bad) == 0 {
		return strings.TrimSpace(body)
	}
	return strings.Join(bad, "; ")
}

// Stop sends SIGTERM and waits for the apiserver to exit.
func (a *APIServer) Stop() error {
	a.httpc.CloseIdleConnections()
	return a.proc.stop()
}

// Restart stops and starts the apiserver with the same flags, port and
// certificates. Its seed cache is gone afterwards, and it makes a new seed.
func (a *APIServer) Restart(ctx context.Context) error {
	if err := a.Stop(); err != nil {
		return err
	}
	return a.Start(ctx)
}

// Running reports whether the apiserver process is alive.
func (a *APIServer) Running() bool { return a.proc.running() }

// LogTail returns the last n lines of the apiserver's log.
func (a *APIServer) LogTail(n int) string { return a.proc.tail(n) }

// Get sends an authenticated GET for path (e.g. "/readyz/kms-providers")
// and returns the status code and body; a non-2xx status is not an error.
func (a *APIServer) Get(ctx context.Context, path string) (int, string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, a.URL+path, nil)
	if err != nil {
		return 0, "", err
	}
	req.Header.Set("Authorization", "Bearer "+a.Token)
	resp, err := a.httpc.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body), err
}

// Metrics scrapes the apiserver's /metrics with the admin token.
func (a *APIServer) Metrics(ctx context.Context) (Metrics, error) {
	return scrape(ctx, a.httpc, a.URL+"/metrics", a.Token)
}

// APIServerMetrics scrapes apiserver i's /metrics.
func (c *Cluster) APIServerMetrics(ctx context.Context, i int) (Metrics, error) {
	return c.APIServers[i].Metrics(ctx)
}
