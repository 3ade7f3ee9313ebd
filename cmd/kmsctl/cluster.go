package main

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/spf13/pflag"
	"go.etcd.io/etcd/client/pkg/v3/transport"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/kms-v2/kms-plugin/rotation"
	"github.com/kms-v2/kms-plugin/rotation/etcdlayout"
)

// apiTimeout bounds every apiserver request of census and rotate (the
// rewrite's patches have their own): a hung apiserver fails the run with a
// clear error instead of hanging it.
const apiTimeout = 10 * time.Second

// clusterFlags are the flags that say where the cluster's state is: the
// apiserver, its etcd (read only), how the apiserver lays out and
// encrypts what it stores there, and which resources to look at.
type clusterFlags struct {
	kubeconfig           string
	endpoints            []string
	cacert, cert, keyPEM string
	prefix               string
	encryptionConfig     string
	resources            []string
}

func (f *clusterFlags) register(fs *pflag.FlagSet, verb string) {
	fs.StringVar(&f.kubeconfig, "kubeconfig", "", "kubeconfig `FILE` (default: in-cluster, then $KUBECONFIG, then ~/.kube/config)")
	fs.StringSliceVar(&f.endpoints, "etcd-endpoints", nil, "the apiserver's etcd client `URLs` (comma-separated); read only")
	fs.StringVar(&f.cacert, "etcd-cacert", "", "CA bundle `FILE` that signed etcd's serving certificate")
	fs.StringVar(&f.cert, "etcd-cert", "", "client certificate `FILE` for etcd")
	fs.StringVar(&f.keyPEM, "etcd-key", "", "client key `FILE` for etcd")
	fs.StringVar(&f.prefix, "etcd-prefix", etcdlayout.DefaultPrefix, "the apiserver's --etcd-prefix")
	fs.StringVar(&f.encryptionConfig, "encryption-config", "", "the apiserver's EncryptionConfiguration `FILE` (--encryption-provider-config): the resources it encrypts and which provider writes each")
	fs.StringSliceVar(&f.resources, "resources", nil, "`RESOURCES` to "+verb+", comma-separated: secrets, configmaps, <resource>.<version>.<group> (default: what --encryption-config encrypts, else every resource etcd holds under KMS v2)")
}

// validate checks the flags that need no I/O.
func (f *clusterFlags) validate() error {
	if len(f.resources) > 0 {
		if _, err := rotation.ParseResources(f.resources); err != nil {
			return err
		}
	}
	if _, err := etcdlayout.New(f.prefix); err != nil {
		return fmt.Errorf("--etcd-prefix: %w", err)
	}
	if len(f.endpoints) == 0 {
		return errors.New("--etcd-endpoints is required: kmsctl proves its counts from etcd, read directly")
	}
	if (f.cert == "") != (f.keyPEM == "") {
		return fmt.Errorf("--etcd-cert and --etcd-key go together: give both halves of etcd's client pair (kubeadm: %s)", kubeadmEtcdClient)
	}
	return nil
}

// openEtcd returns the read-only etcd and its layout, and a close func.
func (f *clusterFlags) openEtcd() (rotation.Etcd, func(), error) {
	layout, err := etcdlayout.New(f.prefix)
	if err != nil {
		return rotation.Etcd{}, nil, fmt.Errorf("--etcd-prefix: %w", err)
	}
	cfg := clientv3.Config{Endpoints: f.endpoints, DialTimeout: 5 * time.Second, DialKeepAliveTimeout: 5 * time.Second, Logger: zap.NewNop()}
	if f.cacert != "" || f.cert != "" || f.keyPEM != "" {
		tlsInfo := transport.TLSInfo{TrustedCAFile: f.cacert, CertFile: f.cert, KeyFile: f.keyPEM}
		tc, err := tlsInfo.ClientConfig()
		if err != nil {
			return rotation.Etcd{}, nil, fmt.Errorf("etcd TLS: %w", err)
		}
		cfg.TLS = tc
	}
	cli, err := clientv3.New(cfg)
	if err != nil {
		return rotation.Etcd{}, nil, fmt.Errorf("etcd %s: %w", strings.Join(f.endpoints, ","), err)
	}
	diagnose := func(ctx context.Context) error { return diagnoseEtcds(ctx, f.endpoints, cfg.TLS) }
	store := etcdlayout.EtcdStore{KV: cli.KV, Endpoints: f.endpoints, Diagnose: diagnose}
	return rotation.Etcd{Store: store, Layout: layout}, func() { cli.Close() }, nil
}

// loadEncryptionConfig reads --encryption-config, or returns nil.
func (f *clusterFlags) loadEncryptionConfig() (*rotation.EncryptionConfig, error) {
	if f.encryptionConfig == "" {
		return nil, nil
	}
	return rotation.LoadEncryptionConfig(f.encryptionConfig)
}

// resolveResources parses --resources, or picks the default.
func (f *clusterFlags) resolveResources(ctx context.Context, e rotation.Etcd, cfg *rotation.EncryptionConfig) ([]rotation.Resource, error) {
	if len(f.resources) > 0 {
		return rotation.ParseResources(f.resources)
	}
	return rotation.DefaultResources(ctx, e, cfg)
}

// restConfig loads --kubeconfig with a deadline on every request.
func (f *clusterFlags) restConfig() (*rest.Config, error) {
	c, err := loadKubeconfig(f.kubeconfig)
	if err != nil {
		return nil, err
	}
	c.Timeout = apiTimeout
	return c, nil
}

// loadKubeconfig reads path, or in-cluster config, or the default loading
// rules ($KUBECONFIG, ~/.kube/config).
func loadKubeconfig(path string) (*rest.Config, error) {
	if path == "" {
		if c, err := rest.InClusterConfig(); err == nil {
			return c, nil
		}
	}
	rules := clientcmd.NewDefaultClientConfigLoadingRules()
	rules.ExplicitPath = path
	c, err := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, &clientcmd.ConfigOverrides{}).ClientConfig()
	switch {
	case err == nil:
		return c, nil
	case path != "":
		return nil, fmt.Errorf("--kubeconfig %s: %v", path, oneLine(err))
	case clientcmd.IsEmptyConfig(err):
		// client-go's own text points at KUBERNETES_MASTER, which kmsctl
		// does not read.
		return nil, errors.New("no kubeconfig: not in a pod, $KUBECONFIG unset and ~/.kube/config missing; give --kubeconfig FILE")
	}
	return nil, fmt.Errorf("kubeconfig from $KUBECONFIG or ~/.kube/config: %v; fix it or give --kubeconfig FILE", oneLine(err))
}

// oneLine folds a multi-line error (client-go joins its loading errors
// with newlines) into one line.
func oneLine(err error) string {
	return strings.Join(strings.Fields(err.Error()), " ")
}
