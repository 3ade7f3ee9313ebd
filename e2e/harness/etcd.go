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
	"google.golang.org/protobuf/proto"
	kmstypes "k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2/v2"

	"github.com/kms-v2/kms-plugin/rotation"
)

// Etcd is the single etcd member every apiserver stores in.
type Etcd struct {
	// Endpoint is the client URL, http://127.0.0.1:PORT.
	Endpoint string
	// Client reads etcd directly, bypassing the apiserver, to see exactly
	// what was stored.
	Client *clientv3.Client

	proc *process
}

func (c *Cluster) startEtcd(ctx context.Context) (*Etcd, error) {
	clientPort, err := freePort()
	if err != nil {
		return nil, err
	}
	peerPort, err := freePort()
	if err != nil {
		return nil, err
	}
	dataDir := filepath.Join(c.Dir, "etcd")
	if err := os.MkdirAll(dataDir, 0o700); err != nil {
		return nil, err
	}
	clientURL := fmt.Sprintf("http://127.0.0.1:%d", clientPort)
	peerURL := fmt.Sprintf("http://127.0.0.1:%d", peerPort)
	e := &Etcd{Endpoint: clientURL}
	e.proc = &process{
		name: "etcd",
		path: c.bins.etcd,
		args: []string{
			"--name", "default",
			"--data-dir", dataDir,
			"--listen-client-urls", clientURL,
			"--advertise-client-urls", clientURL,
			"--listen-peer-urls", peerURL,
			"--initial-advertise-peer-urls", peerURL,
			"--initial-cluster", "default=" + peerURL,
			// Durability is worthless for a throwaway test member, and
			// fsync dominates write latency on a shared CI disk.
			"--unsafe-no-fsync",
		},
		logPath: filepath.Join(c.logDir(), "etcd.log"),
	}
	if err := e.proc.start(); err != nil {
		return nil, err
	}
	c.onClose(func() error {
		if e.Client != nil {
			e.Client.Close()
		}
		return e.proc.stop()
	})
	err = Poll(ctx, 100*time.Millisecond, func() error {
		if done, werr := e.proc.exited(); done {
			return StopPolling(fmt.Errorf("etcd exited: %v", werr))
		}
		resp, err := http.Get(clientURL + "/health")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("etcd /health: %s", resp.Status)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("etcd not healthy: %w", err)
	}
	e.Client, err = clientv3.New(clientv3.Config{
		Endpoints:   []string{clientURL},
		DialTimeout: 5 * time.Second,
		Logger:      zap.NewNop(), // its retries are not the test's story
	})
	if err != nil {
		return nil, fmt.Errorf("etcd client: %w", err)
	}
	return e, nil
}

// StoredObject is one etcd value under /registry, as the apiserver wrote it.
type StoredObject struct {
	// Key is the etcd key, e.g. /registry/secrets/ns/name.
	Key string
	// Raw is the stored value, for checks that no plaintext leaked. Never
	// log it.
	Raw []byte
	// ModRevision is the etcd revision of the last write.
	ModRevision int64
	// Stored is how the value is protected (encoding, provider, key_id).
	Stored rotation.StoredValue
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

// StoredObjects reads every value under /registry/<resource>/ straight from
// etcd, page by page, and classifies each with rotation.DecodeStoredValue.
// resource is "secrets", "configmaps", or "<group>/<resource>"; "" reads
// everything under /registry/, for a scan that no plaintext leaked anywhere.
func (c *Cluster) StoredObjects(ctx context.Context, resource string) ([]StoredObject, error) {
	prefix := "/registry/"
	if r := strings.Trim(resource, "/"); r != "" {
		prefix += r + "/"
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

// StoredObject reads one value from etcd by its key (e.g.
// /registry/secrets/ns/name).
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
	o := StoredObject{Key: key, Raw: value, ModRevision: modRev, Stored: rotation.DecodeStoredValue(value)}
	if o.Stored.Encoding == rotation.EncodingKMSv2 {
		o.DEKSourceHash = dekSourceHash(value)
	}
	return o
}

// dekSourceHash hashes the encryptedDEKSource of a KMS v2 value that
// DecodeStoredValue already accepted.
func dekSourceHash(value []byte) string {
	rest := value[len(rotation.KMSv2Prefix):]
	i := strings.IndexByte(string(rest), ':')
	var obj kmstypes.EncryptedObject
	if i < 0 || proto.Unmarshal(rest[i+1:], &obj) != nil {
		return ""
	}
	sum := sha256.Sum256(obj.GetEncryptedDEKSource())
	return "sha256:" + hex.EncodeToString(sum[:])
}
