package harness

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/kms-v2/kms-plugin/rotation/etcdlayout"
)

// Etcd is one etcd member: the one every apiserver stores in, or a spare
// (StartSpareEtcd) that holds none of the cluster's objects.
type Etcd struct {
	// Endpoint is the client URL, https://127.0.0.1:PORT; clients need
	// the cluster's EtcdPKI (EtcdFlags gives kmsctl's flags for it).
	Endpoint string
	// Client reads etcd directly, bypassing the apiserver, to see exactly
	// what was stored.
	Client *clientv3.Client

	proc *process
}

// startEtcd starts an empty single-member etcd named name: its data under
// <Dir>/<name>, its log logs/<name>.log. Close stops it.
func (c *Cluster) startEtcd(ctx context.Context, name string) (*Etcd, error) {
	clientPort, err := freePort()
	if err != nil {
		return nil, err
	}
	peerPort, err := freePort()
	if err != nil {
		return nil, err
	}
	dataDir := filepath.Join(c.Dir, name)
	if err := os.MkdirAll(dataDir, 0o700); err != nil {
		return nil, err
	}
	clientURL := fmt.Sprintf("https://127.0.0.1:%d", clientPort)
	// The peer URL stays plain: a single member has no peers to talk to.
	peerURL := fmt.Sprintf("http://127.0.0.1:%d", peerPort)
	e := &Etcd{Endpoint: clientURL}
	tlsConfig, err := c.EtcdPKI.ClientTLS()
	if err != nil {
		return nil, fmt.Errorf("%s client TLS: %w", name, err)
	}
	e.proc = &process{
		name: name,
		path: c.bins.etcd,
		args: []string{
			"--name", "default",
			"--data-dir", dataDir,
			"--listen-client-urls", clientURL,
			"--advertise-client-urls", clientURL,
			"--listen-peer-urls", peerURL,
			"--initial-advertise-peer-urls", peerURL,
			"--initial-cluster", "default=" + peerURL,
			// kubeadm's client side: TLS, and only clients whose
			// certificate etcd's CA signed.
			"--cert-file", c.EtcdPKI.ServerCert,
			"--key-file", c.EtcdPKI.ServerKey,
			"--trusted-ca-file", c.EtcdPKI.CA,
			"--client-cert-auth",
			// Durability is worthless for a throwaway test member, and
			// fsync dominates write latency on a shared CI disk.
			"--unsafe-no-fsync",
		},
		logPath: filepath.Join(c.logDir(), name+".log"),
	}
	if err := e.proc.start(); err != nil {
		return nil, err
	}
	c.onClose(e.Stop)
	health := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: tlsConfig}}
	err = Poll(ctx, 100*time.Millisecond, func() error {
		if done, werr := e.proc.exited(); done {
			return StopPolling(fmt.Errorf("%s exited: %v", name, werr))
		}
		resp, err := health.Get(clientURL + "/health")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("%s /health: %s", name, resp.Status)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("%s not healthy: %w\n%s", name, err, e.proc.tail(20))
	}
	e.Client, err = clientv3.New(clientv3.Config{
		Endpoints:   []string{clientURL},
		DialTimeout: 5 * time.Second,
		TLS:         tlsConfig,
		Logger:      zap.NewNop(), // its retries are not the test's story
	})
	if err != nil {
		return nil, fmt.Errorf("%s client: %w", name, err)
	}
	return e, nil
}

// EtcdFlags are kmsctl's flags for reaching the cluster's etcd as on a
// kubeadm node: --etcd-endpoints and the CA and client certificate.
func (c *Cluster) EtcdFlags() []string {
	return []string{"--etcd-endpoints", c.Etcd.Endpoint,
		"--etcd-cacert", c.EtcdPKI.CA, "--etcd-cert", c.EtcdPKI.ClientCert, "--etcd-key", c.EtcdPKI.ClientKey}
}

// StartSpareEtcd starts a second, empty etcd member in the cluster's folder,
// which no apiserver uses: the wrong etcd a tool may be pointed at, with
// the same certificates, so only its contents tell it apart. Close
// stops it; the cluster's log tails include it.
func (c *Cluster) StartSpareEtcd(ctx context.Context) (*Etcd, error) {
	c.mu.Lock()
	name := fmt.Sprintf("etcd-spare-%d", len(c.spares))
	c.mu.Unlock()
	e, err := c.startEtcd(ctx, name)
	if e != nil {
		c.mu.Lock()
		c.spares = append(c.spares, e)
		c.mu.Unlock()
	}
	return e, err
}

// Stop stops the member (SIGTERM, then SIGKILL after a grace period).
func (e *Etcd) Stop() error {
	if e.Client != nil {
		e.Client.Close()
		e.Client = nil
	}
	return e.proc.stop()
}

// Store is a read-only etcdlayout.Store over this member, as kmsctl opens
// one: for tests that take a census themselves.
func (e *Etcd) Store() etcdlayout.EtcdStore {
	return etcdlayout.EtcdStore{KV: e.Client.KV, Endpoints: []string{e.Endpoint}}
}

// StoredObject is one etcd value under the cluster's prefix (Layout), as
// the apiserver wrote it.
type StoredObject struct {
	// Key is the etcd key, e.g. Layout.Key("secrets", "ns", "name").
	Key string
	// Raw is the stored value, for checks that no plaintext leaked. Never
	// log it.
	Raw []byte
	// ModRevision is the etcd revision of the last write.
	ModRevision int64
	// Stored is how the value is protected (encoding, provider kind and
	// name, key_id).
	Stored etcdlayout.Value
	// DEKSourceHash is "sha256:<hex>" of the EncryptedObject's
	// encryptedDEKSource (the plugin's ciphertext of the apiserver's seed),
	// empty for values that are not KMS v2. Objects with equal KeyID and
	// DEKSourceHash share one seed, so an apiserver needs one Decrypt call
	// for all of them. The hash identifies the seed without exposing the
	// ciphertext.
	DEKSourceHash string
}

// SeedID names the (key_id, seed) pair that protects the object, or "" for
// a value that is not KMS v2.
func (o StoredObject) SeedID() string {
	if o.DEKSourceHash == "" {
		return ""
	}
	return o.Stored.KeyID + "|" + o.DEKSourceHash
}

// storedPageSize bounds each etcd range read, as a census on a big cluster
// must.
const storedPageSize = 200

// StoredObjects reads every value under the resource's prefix in the
// cluster's Layout straight from etcd, page by page, and classifies each
// with etcdlayout.Decode. resource is "secrets", "configmaps",
// "<group>/<resource>", or any deeper path such as "secrets/<namespace>";
// "" reads everything under the prefix, for a scan that no plaintext leaked
// anywhere.
func (c *Cluster) StoredObjects(ctx context.Context, resource string) ([]StoredObject, error) {
	prefix := c.Layout.All()
	if r := strings.Trim(resource, "/"); r != "" {
		prefix = c.Layout.ResourcePrefix(r)
	}
	end := clientv3.GetPrefixRangeEnd(prefix)
	var out []StoredObject
	from := prefix
	var rev int64
	for {
		opts := []clientv3.OpOption{clientv3.WithRange(end), clientv3.WithLimit(storedPageSize)}
		if rev != 0 {
			// Every page at the first page's revision: one consistent view.
			opts = append(opts, clientv3.WithRev(rev))
		}
		resp, err := c.Etcd.Client.Get(ctx, from, opts...)
		if err != nil {
			return nil, fmt.Errorf("etcd get %s: %w", prefix, err)
		}
		if rev == 0 {
			rev = resp.Header.Revision
		}
		for _, kv := range resp.Kvs {
			out = append(out, decodeStored(string(kv.Key), kv.Value, kv.ModRevision))
		}
		if !resp.More || len(resp.Kvs) == 0 {
			return out, nil
		}
		from = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
	}
}

// StoredObject reads one value from etcd by its full key, e.g.
// c.Layout.Key("secrets", ns, name).
func (c *Cluster) StoredObject(ctx context.Context, key string) (StoredObject, error) {
	resp, err := c.Etcd.Client.Get(ctx, key)
	if err != nil {
		return StoredObject{}, fmt.Errorf("etcd get %s: %w", key, err)
	}
	if len(resp.Kvs) == 0 {
		return StoredObject{}, fmt.Errorf("etcd get %s: not found", key)
	}
	kv := resp.Kvs[0]
	return decodeStored(key, kv.Value, kv.ModRevision), nil
}

func decodeStored(key string, value []byte, modRev int64) StoredObject {
	o := StoredObject{Key: key, Raw: value, ModRevision: modRev, Stored: etcdlayout.Decode(value)}
	if o.Stored.Encoding == etcdlayout.EncodingKMSv2 {
		if src := etcdlayout.DEKSource(value); len(src) > 0 {
			sum := sha256.Sum256(src)
			o.DEKSourceHash = "sha256:" + hex.EncodeToString(sum[:])
		}
	}
	return o
}
