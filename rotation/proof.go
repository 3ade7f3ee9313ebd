package rotation

import (
	"context"
	"errors"
	"fmt"
	"strconv"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/metadata"

	"github.com/kms-v2/kms-plugin/rotation/etcdlayout"
)

// ErrWrongEtcd means the etcd read is not the one the apiserver stores in
// (another cluster's, a separate events etcd, a typo), or the apiserver uses
// another --etcd-prefix. A census of it would prove nothing.
var ErrWrongEtcd = errors.New("not the apiserver's etcd")

// Witness is an object read both through the apiserver and straight from
// etcd: when etcd holds its key at the resourceVersion the apiserver
// serves, the etcd and prefix are the apiserver's.
type Witness struct {
	GVR       schema.GroupVersionResource
	Path      string // etcd spelling of the resource
	Namespace string
	Name      string
}

// KubeSystemNamespace is the witness of a read-only census: every cluster
// has it, and reading it needs no write.
var KubeSystemNamespace = Witness{GVR: schema.GroupVersionResource{Version: "v1", Resource: "namespaces"}, Path: "namespaces", Name: metav1.NamespaceSystem}

func (w Witness) String() string {
	if w.Namespace == "" {
		return w.GVR.Resource + "/" + w.Name
	}
	return w.GVR.Resource + " " + w.Namespace + "/" + w.Name
}

// ProveEtcd reads w through the apiserver and from etcd and returns what
// proved the etcd, or an error wrapping ErrWrongEtcd. An object changing
// between the two reads is read again, a few times.
func ProveEtcd(ctx context.Context, e Etcd, meta metadata.Interface, w Witness) (string, error) {
	var last error
	for range 3 {
		var (
			obj *metav1.PartialObjectMetadata
			err error
		)
		if w.Namespace == "" {
			obj, err = meta.Resource(w.GVR).Get(ctx, w.Name, metav1.GetOptions{})
		} else {
			obj, err = meta.Resource(w.GVR).Namespace(w.Namespace).Get(ctx, w.Name, metav1.GetOptions{})
		}
		if err != nil {
			return "", fmt.Errorf("prove the etcd: read %s through the apiserver: %w", w, err)
		}
		proof, _, err := proveRevision(ctx, e, w.String(), e.Layout.Key(w.Path, w.Namespace, w.Name), obj.ResourceVersion)
		if err == nil || !errors.Is(err, errRevisionMoved) {
			return proof, err
		}
		last = err
	}
	return "", last
}

// errRevisionMoved: etcd holds a newer revision than the apiserver served;
// the object changed between the reads.
var errRevisionMoved = errors.New("changed between the reads")

// proveRevision checks that etcd holds key at revision rv, the
// resourceVersion the apiserver gave what, and returns the proof and the
// value it read (so a caller never reads the key twice).
func proveRevision(ctx context.Context, e Etcd, what, key, rv string) (string, etcdlayout.KeyValue, error) {
	kv, ok, err := etcdlayout.Get(ctx, e.Store, key)
	if err != nil {
		return "", kv, fmt.Errorf("prove the etcd: %w", err)
	}
	where := fmt.Sprintf("%s under prefix %s", e.Store.Describe(), e.Layout.Prefix())
	if !ok {
		return "", kv, fmt.Errorf("%s has no key %s, yet the apiserver serves %s (resourceVersion %s): it is not this cluster's etcd, or the apiserver runs with another --etcd-prefix; check --etcd-endpoints and --etcd-prefix: %w",
			where, key, what, rv, ErrWrongEtcd)
	}
	want, _ := strconv.ParseInt(rv, 10, 64)
	switch {
	case kv.ModRevision == want:
		return fmt.Sprintf("%s read through the apiserver at resourceVersion %s is key %s at mod revision %d in %s", what, rv, key, kv.ModRevision, e.Store.Describe()), kv, nil
	case kv.ModRevision > want:
		return "", kv, fmt.Errorf("%s: %w", what, errRevisionMoved)
	}
	return "", kv, fmt.Errorf("%s holds %s at mod revision %d, but the apiserver serves %s at resourceVersion %s: not the etcd this apiserver stores in; check --etcd-endpoints: %w",
		where, key, kv.ModRevision, what, rv, ErrWrongEtcd)
}

// CheckNotEmpty refuses a census in which a resource has no object while
// the apiserver lists at least one: an empty scan is never proof.
func CheckNotEmpty(ctx context.Context, meta metadata.Interface, c *Census, rs []Resource) error {
	for _, r := range rs {
		if rc := c.Resource(r.Name); rc == nil || rc.Total > 0 {
			continue
		}
		list, err := meta.Resource(r.GVR).List(ctx, metav1.ListOptions{Limit: 1})
		if err != nil {
			return fmt.Errorf("check the empty census of %s against the apiserver: %w", r.Name, err)
		}
		if len(list.Items) > 0 {
			return fmt.Errorf("%s holds no %s under %s, yet the apiserver lists some: the census read the wrong etcd or prefix; check --etcd-endpoints and --etcd-prefix: %w",
				c.Store, r.Name, c.Prefix, ErrWrongEtcd)
		}
	}
	return nil
}
