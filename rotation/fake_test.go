package rotation

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kmstypes "k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2/v2"
	"k8s.io/client-go/metadata"
	"k8s.io/client-go/rest"

	"github.com/kms-v2/kms-plugin/providers"
	"github.com/kms-v2/kms-plugin/rotation/etcdlayout"
)

// kmsValue is what kube-apiserver stores for an object under keyID.
func kmsValue(t testing.TB, keyID string) []byte {
	t.Helper()
	b, err := proto.Marshal(&kmstypes.EncryptedObject{KeyID: keyID, EncryptedDEKSource: []byte("dek"), EncryptedData: []byte("data")})
	if err != nil {
		t.Fatal(err)
	}
	return append([]byte(etcdlayout.KMSv2Prefix+"test:"), b...)
}

// fakeEtcd is an in-memory Store with etcd's revision semantics, shared
// with fakeAPIServer the way etcd is shared with kube-apiserver.
type fakeEtcd struct {
	mu     sync.Mutex
	rev    int64
	kvs    map[string]etcdlayout.KeyValue
	ranges int
}

func (e *fakeEtcd) Describe() string { return "fake etcd" }

// etcd is the fake as the orchestrator reads it, under the default prefix.
func (e *fakeEtcd) etcd() Etcd { return Etcd{Store: e, Layout: etcdlayout.Default()} }

func newFakeEtcd() *fakeEtcd { return &fakeEtcd{rev: 1, kvs: map[string]etcdlayout.KeyValue{}} }

func (e *fakeEtcd) put(key string, value []byte) int64 {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.rev++
	e.kvs[key] = etcdlayout.KeyValue{Key: key, Value: value, ModRevision: e.rev}
	return e.rev
}

func (e *fakeEtcd) Range(_ context.Context, from, end string, limit int64) ([]etcdlayout.KeyValue, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.ranges++
	var keys []string
	for k := range e.kvs {
		if k >= from && k < end {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	if int64(len(keys)) > limit {
		keys = keys[:limit]
	}
	out := make([]etcdlayout.KeyValue, len(keys))
	for i, k := range keys {
		out[i] = e.kvs[k]
	}
	return out, nil
}

// fakeAPIServer serves the metadata-only LIST and the resourceVersion merge
// patch of namespaced core resources over HTTP, with kube-apiserver's
// staleness rule: a patch rewrites (new revision, current key) only an
// object whose key differs from the current one, and answers 409 when the
// resourceVersion is not the object's.
type fakeAPIServer struct {
	etcd    *fakeEtcd
	mu      sync.Mutex
	current string
	// onPatch, when set, may answer instead (status code, Retry-After).
	onPatch func(key string) (int, string)
	patches int
	lists   int
	// canaryStore, when set, is where canaries are written instead of etcd.
	canaryStore *fakeEtcd
	srv         *httptest.Server
}

func newFakeAPIServer(t testing.TB, e *fakeEtcd, current string) *fakeAPIServer {
	f := &fakeAPIServer{etcd: e, current: current}
	f.srv = httptest.NewServer(http.HandlerFunc(f.serve))
	t.Cleanup(f.srv.Close)
	return f
}

func (f *fakeAPIServer) setCurrent(k string) {
	f.mu.Lock()
	f.current = k
	f.mu.Unlock()
}

func (f *fakeAPIServer) metadata(t testing.TB, l *Limiter) metadata.Interface {
	cfg := &rest.Config{Host: f.srv.URL, QPS: -1}
	if l != nil {
		cfg.Wrap(l.ObserveTransport)
	}
	c, err := metadata.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func writeStatus(w http.ResponseWriter, code int, reason metav1.StatusReason) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(metav1.Status{TypeMeta: metav1.TypeMeta{Kind: "Status", APIVersion: "v1"}, Status: metav1.StatusFailure, Code: int32(code), Reason: reason})
}

func (f *fakeAPIServer) serve(w http.ResponseWriter, r *http.Request) {
	parts := strings.Split(strings.Trim(r.URL.Path, "/"), "/")
	switch {
	case r.URL.Path == "/metrics" || strings.HasPrefix(r.URL.Path, "/readyz"):
		w.WriteHeader(http.StatusOK) // no key_id metric: only canaries tell
	case len(parts) == 6 && parts[3] == "kube-system" && strings.HasPrefix(parts[5], "kmsctl-canary-"):
		f.canary(w, r, parts[4], parts[5])
	case r.Method == http.MethodPost && len(parts) == 5 && parts[3] == "kube-system":
		f.canary(w, r, parts[4], "")
	case r.Method == http.MethodGet && len(parts) == 3: // api/v1/<resource>
		f.list(w, r, parts[2])
	case r.Method == http.MethodPatch && len(parts) == 6: // api/v1/namespaces/<ns>/<resource>/<name>
		f.patch(w, r, "/registry/"+parts[4]+"/"+parts[3]+"/"+parts[5])
	default:
		writeStatus(w, http.StatusNotFound, metav1.StatusReasonNotFound)
	}
}

func (f *fakeAPIServer) list(w http.ResponseWriter, r *http.Request, resource string) {
	f.mu.Lock()
	f.lists++
	f.mu.Unlock()
	limit, _ := strconv.ParseInt(r.URL.Query().Get("limit"), 10, 64)
	if limit == 0 {
		limit = 1 << 30
	}
	prefix := "/registry/" + resource + "/"
	from := prefix
	if c := r.URL.Query().Get("continue"); c != "" {
		from = c
	}
	page, _ := f.etcd.Range(r.Context(), from, clientv3.GetPrefixRangeEnd(prefix), limit+1)
	list := metav1.PartialObjectMetadataList{TypeMeta: metav1.TypeMeta{Kind: "PartialObjectMetadataList", APIVersion: "meta.k8s.io/v1"}}
	for i, kv := range page {
		if int64(i) == limit {
			list.Continue = kv.Key
			break
		}
		k, _ := etcdlayout.Default().ParseKey(kv.Key, resource)
		list.Items = append(list.Items, metav1.PartialObjectMetadata{
			TypeMeta:   metav1.TypeMeta{Kind: "PartialObjectMetadata", APIVersion: "meta.k8s.io/v1"},
			ObjectMeta: metav1.ObjectMeta{Namespace: k.Namespace, Name: k.Name, ResourceVersion: strconv.FormatInt(kv.ModRevision, 10)},
		})
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(list)
}

func (f *fakeAPIServer) patch(w http.ResponseWriter, r *http.Request, key string) {
	f.mu.Lock()
	f.patches++
	current, hook := f.current, f.onPatch
	f.mu.Unlock()
	if hook != nil {
		if code, retry := hook(key); code != 0 {
			if retry != "" {
				w.Header().Set("Retry-After", retry)
			}
			writeStatus(w, code, "")
			return
		}
	}
	var body struct {
		Metadata struct {
			ResourceVersion string `json:"resourceVersion"`
		} `json:"metadata"`
	}
	if err := json.NewDecoder(r.Body).Decode(&body); err != nil {
		writeStatus(w, http.StatusBadRequest, metav1.StatusReasonBadRequest)
		return
	}
	f.etcd.mu.Lock()
	kv, ok := f.etcd.kvs[key]
	f.etcd.mu.Unlock()
	if !ok {
		writeStatus(w, http.StatusNotFound, metav1.StatusReasonNotFound)
		return
	}
	if body.Metadata.ResourceVersion != strconv.FormatInt(kv.ModRevision, 10) {
		writeStatus(w, http.StatusConflict, metav1.StatusReasonConflict)
		return
	}
	rev := kv.ModRevision
	if !etcdlayout.KMSv2Writer("test", current).Current(etcdlayout.Decode(kv.Value)) {
		rev = f.etcd.put(key, kmsValueRaw(current))
	}
	parts := strings.Split(key, "/")
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(metav1.PartialObjectMetadata{
		TypeMeta:   metav1.TypeMeta{Kind: "PartialObjectMetadata", APIVersion: "meta.k8s.io/v1"},
		ObjectMeta: metav1.ObjectMeta{Namespace: parts[3], Name: parts[4], ResourceVersion: strconv.FormatInt(rev, 10)},
	})
}

// canary serves kmsctl's canaries in kube-system: GET, create (POST) and
// update (PUT), stored in the fake etcd under the current key as the
// apiserver would.
func (f *fakeAPIServer) canary(w http.ResponseWriter, r *http.Request, resource, name string) {
	var obj map[string]any
	if r.Method == http.MethodPost || r.Method == http.MethodPut {
		if err := json.NewDecoder(r.Body).Decode(&obj); err != nil {
			writeStatus(w, http.StatusBadRequest, metav1.StatusReasonBadRequest)
			return
		}
		name = obj["metadata"].(map[string]any)["name"].(string)
	}
	key := "/registry/" + resource + "/kube-system/" + name
	f.mu.Lock()
	current, store := f.current, f.etcd
	if f.canaryStore != nil {
		store = f.canaryStore
	}
	f.mu.Unlock()
	store.mu.Lock()
	kv, exists := store.kvs[key]
	store.mu.Unlock()
	switch {
	case r.Method == http.MethodGet && !exists:
		writeStatus(w, http.StatusNotFound, metav1.StatusReasonNotFound)
		return
	case r.Method == http.MethodGet:
		obj = map[string]any{"apiVersion": "v1", "kind": "Secret", "metadata": map[string]any{"name": name, "namespace": "kube-system", "resourceVersion": strconv.FormatInt(kv.ModRevision, 10)}}
	case r.Method == http.MethodDelete:
		store.mu.Lock()
		delete(store.kvs, key)
		store.mu.Unlock()
		writeStatus(w, http.StatusOK, "")
		return
	default:
		rev := store.put(key, kmsValueRaw(current))
		obj["metadata"].(map[string]any)["resourceVersion"] = strconv.FormatInt(rev, 10)
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(obj)
}

func kmsValueRaw(keyID string) []byte {
	b, _ := proto.Marshal(&kmstypes.EncryptedObject{KeyID: keyID, EncryptedDEKSource: []byte("dek"), EncryptedData: []byte("data")})
	return append([]byte(etcdlayout.KMSv2Prefix+"test:"), b...)
}

// fakeRotator is an in-memory providers.Rotator following the contract's
// refusals; promote also moves the fake apiserver to the new key, as the
// plugins and apiservers do on their own in a real cluster.
type fakeRotator struct {
	mu        sync.Mutex
	versions  []providers.KeyVersion
	next      int
	onPromote func(string)
	created   int
}

func newFakeRotator(primaryAge time.Duration) *fakeRotator {
	return &fakeRotator{versions: []providers.KeyVersion{{KeyID: "file:k/1", State: providers.StatePrimary, Created: time.Now().Add(-primaryAge)}}, next: 2}
}

func (f *fakeRotator) Versions(context.Context) ([]providers.KeyVersion, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]providers.KeyVersion(nil), f.versions...), nil
}

func (f *fakeRotator) CreateVersion(context.Context) (providers.KeyVersion, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	v := providers.KeyVersion{KeyID: fmt.Sprintf("file:k/%d", f.next), State: providers.StateEnabled, Created: time.Now()}
	f.next++
	f.created++
	f.versions = append(f.versions, v)
	return v, nil
}

func (f *fakeRotator) Promote(_ context.Context, id string) error {
	f.mu.Lock()
	found := false
	for i := range f.versions {
		switch {
		case f.versions[i].KeyID == id && f.versions[i].State == providers.StateDisabled:
			f.mu.Unlock()
			return fmt.Errorf("promote %s: %w", id, providers.ErrKeyDisabled)
		case f.versions[i].KeyID == id:
			f.versions[i].State, found = providers.StatePrimary, true
		case f.versions[i].State == providers.StatePrimary:
			f.versions[i].State = providers.StateEnabled
		}
	}
	hook := f.onPromote
	f.mu.Unlock()
	if !found {
		return fmt.Errorf("promote %s: %w", id, providers.ErrKeyNotFound)
	}
	if hook != nil {
		hook(id)
	}
	return nil
}

func (f *fakeRotator) setState(id string, s providers.KeyState) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	for i := range f.versions {
		if f.versions[i].KeyID == id {
			if f.versions[i].State == providers.StatePrimary {
				return fmt.Errorf("disable %s: primary", id)
			}
			f.versions[i].State = s
			return nil
		}
	}
	return providers.ErrKeyNotFound
}

func (f *fakeRotator) Disable(_ context.Context, id string) error {
	return f.setState(id, providers.StateDisabled)
}

func (f *fakeRotator) Enable(_ context.Context, id string) error {
	return f.setState(id, providers.StateEnabled)
}

func (f *fakeRotator) state(id string) providers.KeyState {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, v := range f.versions {
		if v.KeyID == id {
			return v.State
		}
	}
	return ""
}
