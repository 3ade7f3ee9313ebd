package rotation

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic/fake"
	"k8s.io/client-go/rest"
	k8stesting "k8s.io/client-go/testing"

	"github.com/kms-v2/kms-plugin/providers"
	"github.com/kms-v2/kms-plugin/rotation/etcdlayout"
)

// cluster is the fake world a Run sees: etcd, one apiserver that follows the
// provider's primary, the provider, and a clientset for the lease.
type cluster struct {
	etcd *fakeEtcd
	api  *fakeAPIServer
	rot  *fakeRotator
	kube *fake.FakeDynamicClient
}

func newCluster(t *testing.T, primaryAge time.Duration, secrets, configmaps int) *cluster {
	c := &cluster{etcd: newFakeEtcd(), rot: newFakeRotator(primaryAge), kube: fake.NewSimpleDynamicClient(runtime.NewScheme())}
	seed(t, c.etcd, "secrets", "file:k/1", secrets)
	seed(t, c.etcd, "configmaps", "file:k/1", configmaps)
	c.api = newFakeAPIServer(t, c.etcd, "file:k/1")
	c.rot.onPromote = c.api.setCurrent
	return c
}

func (c *cluster) rotation(t *testing.T) *Rotation {
	l := NewLimiter(LimiterConfig{Max: 8})
	planner, err := NewAPIServer(&rest.Config{Host: c.api.srv.URL}, c.api.srv.URL, 0)
	if err != nil {
		t.Fatal(err)
	}
	return &Rotation{
		Rotator: c.rot, Kube: c.kube, Meta: c.api.metadata(t, nil), Etcd: c.etcd.etcd(), Planner: planner,
		Rewriter: &Rewriter{Client: c.api.metadata(t, l), Limiter: l, Workers: 8, PageSize: 10, Attempts: 2},
	}
}

func (c *cluster) census(t *testing.T, current string, names ...string) *Census {
	var rs []Resource
	for _, n := range names {
		rs = append(rs, mustResource(t, n))
	}
	w := Writers{}
	for _, r := range rs {
		w[r.Name] = etcdlayout.KMSv2Writer("test", current)
	}
	cs, err := TakeCensus(context.Background(), c.etcd.etcd(), rs, w, CensusOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return cs
}

func opts(t *testing.T, names ...string) Options {
	var rs []Resource
	for _, n := range names {
		rs = append(rs, mustResource(t, n))
	}
	return Options{Resources: rs, Lock: LockOptions{Holder: Holder{Host: "test-" + t.Name()}}, MaxPasses: 3}
}

func TestRunForcedRotationRetiresOldKey(t *testing.T) {
	c := newCluster(t, time.Hour, 40, 15)
	o := opts(t, "secrets", "configmaps")
	o.Force, o.Retire = true, true
	rep, err := c.rotation(t).Run(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := rep.NewKeyID, "file:k/2"; got != want {
		t.Errorf("new key: got %s, want %s", got, want)
	}
	if got, want := c.census(t, "file:k/2", "secrets", "configmaps").Stale(), 0; got != want {
		t.Errorf("stale after: got %d, want %d", got, want)
	}
	if got, want := c.rot.state("file:k/1"), providers.StateDisabled; got != want {
		t.Errorf("old key: got %s, want %s", got, want)
	}
	if got, want := rep.Rewrite["secrets"].Rewritten, int64(40); got != want {
		t.Errorf("secrets rewritten: got %d, want %d", got, want)
	}
	lease, err := c.kube.Resource(LeaseGVR).Namespace(DefaultLeaseNamespace).Get(context.Background(), DefaultLeaseName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got := lease.GetAnnotations()[TargetAnnotation]; got != "" {
		t.Errorf("lease target after a finished rotation: got %q, want none", got)
	}
}

func TestRunRetireRefusesWhileOldKeyReferenced(t *testing.T) {
	c := newCluster(t, time.Hour, 20, 5)
	o := opts(t, "secrets") // configmaps stay under file:k/1
	o.Force, o.Retire = true, true
	rep, err := c.rotation(t).Run(context.Background(), o)
	if !errors.Is(err, ErrRetireRefused) {
		t.Fatalf("err: got %v, want ErrRetireRefused", err)
	}
	if got, want := c.rot.state("file:k/1"), providers.StateEnabled; got != want {
		t.Errorf("old key: got %s, want %s", got, want)
	}
	if got, want := rep.References["file:k/1"], 5; got != want {
		t.Errorf("references reported: got %d, want %d", got, want)
	}
	if !strings.Contains(rep.RetireRefused, "5 objects") {
		t.Errorf("refusal %q does not give the count", rep.RetireRefused)
	}
}

func TestRunChangesNothing(t *testing.T) {
	tests := []struct {
		name       string
		primaryAge time.Duration
		change     func(*Options)
		wantAction Action
	}{
		{name: "young primary", primaryAge: time.Hour, change: func(o *Options) { o.IfOlderThan = 720 * time.Hour; o.Retire = true }, wantAction: "skipped"},
		{name: "dry run of a forced rotation", primaryAge: time.Hour, change: func(o *Options) { o.Force, o.DryRun = true, true }, wantAction: "dry run"},
		{name: "dry run of an old primary", primaryAge: 1000 * time.Hour, change: func(o *Options) { o.IfOlderThan, o.DryRun = 720*time.Hour, true }, wantAction: "dry run"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := newCluster(t, tt.primaryAge, 10, 0)
			revs := objectRevisions(c.etcd)
			o := opts(t, "secrets")
			tt.change(&o)
			rep, err := c.rotation(t).Run(context.Background(), o)
			if err != nil {
				t.Fatal(err)
			}
			if got, want := rep.Action, tt.wantAction; got != want {
				t.Errorf("action: got %q, want %q", got, want)
			}
			if got, want := fmt.Sprint(objectRevisions(c.etcd)), fmt.Sprint(revs); got != want {
				t.Errorf("objects' revisions: got %s, want %s (nothing but canaries written)", got, want)
			}
			if got, want := c.rot.created, 0; got != want {
				t.Errorf("versions created: got %d, want %d", got, want)
			}
			if got, want := c.api.patches, 0; got != want {
				t.Errorf("patches: got %d, want %d", got, want)
			}
		})
	}
}

func TestRunResumes(t *testing.T) {
	tests := []struct {
		name string
		// crash leaves the state a killed run would.
		crash       func(t *testing.T, c *cluster)
		wantPatches int
	}{
		{
			name: "after create: the recorded pending version is promoted, not a new one",
			crash: func(t *testing.T, c *cluster) {
				v, _ := c.rot.CreateVersion(context.Background())
				setLeaseTarget(t, c, v.KeyID)
			},
			wantPatches: 30,
		},
		{
			name: "after promote: only the rewrite is left",
			crash: func(t *testing.T, c *cluster) {
				v, _ := c.rot.CreateVersion(context.Background())
				setLeaseTarget(t, c, v.KeyID)
				c.rot.Promote(context.Background(), v.KeyID)
			},
			wantPatches: 30,
		},
		{
			name: "mid rewrite: only the stale objects are patched",
			crash: func(t *testing.T, c *cluster) {
				v, _ := c.rot.CreateVersion(context.Background())
				setLeaseTarget(t, c, v.KeyID)
				c.rot.Promote(context.Background(), v.KeyID)
				for i := range 25 {
					c.etcd.put(fmt.Sprintf("/registry/secrets/ns%d/obj-%04d", i%3, i), kmsValue(t, v.KeyID))
				}
			},
			wantPatches: 5,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := newCluster(t, time.Hour, 30, 0)
			tt.crash(t, c)
			c.rot.created = 0
			o := opts(t, "secrets")
			o.Retire = true
			rep, err := c.rotation(t).Run(context.Background(), o)
			if err != nil {
				t.Fatal(err)
			}
			if got, want := c.rot.created, 0; got != want {
				t.Errorf("versions created by the rerun: got %d, want %d", got, want)
			}
			if got, want := c.census(t, "file:k/2", "secrets").Stale(), 0; got != want {
				t.Errorf("stale after: got %d, want %d", got, want)
			}
			if got, want := c.api.patches, tt.wantPatches; got != want {
				t.Errorf("patches: got %d, want %d", got, want)
			}
			if got, want := rep.Retired, []string{"file:k/1"}; fmt.Sprint(got) != fmt.Sprint(want) {
				t.Errorf("retired: got %v, want %v", got, want)
			}
		})
	}
}

func setLeaseTarget(t *testing.T, c *cluster, keyID string) {
	t.Helper()
	old := time.Now().Add(-time.Minute).UTC().Format(metav1.RFC3339Micro)
	lease := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "coordination.k8s.io/v1",
		"kind":       "Lease",
		"metadata": map[string]any{
			"name": DefaultLeaseName, "namespace": DefaultLeaseNamespace,
			"annotations": map[string]any{TargetAnnotation: keyID},
		},
		"spec": map[string]any{"holderIdentity": "killed-run", "leaseDurationSeconds": int64(30), "renewTime": old},
	}}
	_, err := c.kube.Resource(LeaseGVR).Namespace(DefaultLeaseNamespace).Create(context.Background(), lease, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
}

func TestRunRefusesWhileAnotherRunHoldsTheLease(t *testing.T) {
	c := newCluster(t, time.Hour, 5, 0)
	if _, err := Acquire(context.Background(), c.kube, LockOptions{Holder: Holder{Host: "other"}, Duration: time.Minute}); err != nil {
		t.Fatal(err)
	}
	o := opts(t, "secrets")
	o.Force = true
	_, err := c.rotation(t).Run(context.Background(), o)
	if !errors.Is(err, ErrLocked) {
		t.Fatalf("err: got %v, want ErrLocked", err)
	}
	if got, want := c.rot.created, 0; got != want {
		t.Errorf("versions created: got %d, want %d", got, want)
	}
}

func TestRunReportsObjectsLeftBehind(t *testing.T) {
	c := newCluster(t, time.Hour, 10, 0)
	c.api.onPatch = func(key string) (int, string) {
		if strings.HasSuffix(key, "obj-0007") {
			return http.StatusInternalServerError, ""
		}
		return 0, ""
	}
	o := opts(t, "secrets")
	o.Force, o.Retire = true, true
	rep, err := c.rotation(t).Run(context.Background(), o)
	if !errors.Is(err, ErrObjectsRemain) || !errors.Is(err, ErrRetireRefused) {
		t.Fatalf("err: got %v, want ErrObjectsRemain and ErrRetireRefused", err)
	}
	if got, want := rep.Remaining, 1; got != want {
		t.Errorf("remaining: got %d, want %d", got, want)
	}
	if got, want := rep.Passes, 3; got != want {
		t.Errorf("passes: got %d, want %d", got, want)
	}
	if got, want := c.rot.state("file:k/1"), providers.StateEnabled; got != want {
		t.Errorf("old key: got %s, want %s", got, want)
	}
}

// objectRevisions maps every key outside kube-system (where kmsctl writes
// its canaries) to its mod revision.
func objectRevisions(e *fakeEtcd) map[string]int64 {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := map[string]int64{}
	for k, kv := range e.kvs {
		if !strings.Contains(k, "/kube-system/") {
			out[k] = kv.ModRevision
		}
	}
	return out
}

func TestLatestKeyIDHashes(t *testing.T) {
	tests := []struct {
		name    string
		metrics string
		want    string
		wantErr error
	}{
		{
			name: "newest timestamp wins",
			metrics: `# TYPE apiserver_envelope_encryption_key_id_hash_status_last_timestamp_seconds gauge
apiserver_envelope_encryption_key_id_hash_status_last_timestamp_seconds{apiserver_id_hash="x",key_id_hash="sha256:old",provider_name="p"} 100
apiserver_envelope_encryption_key_id_hash_status_last_timestamp_seconds{apiserver_id_hash="x",key_id_hash="sha256:new",provider_name="p"} 200
`,
			want: "map[p:sha256:new]",
		},
		{name: "metric missing", metrics: "# TYPE other gauge\nother 1\n", wantErr: errNoMetric},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := latestKeyIDHashes([]byte(tt.metrics))
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("err: got %v, want %v", err, tt.wantErr)
			}
			if tt.wantErr == nil && fmt.Sprint(got) != tt.want {
				t.Errorf("got %v, want %s", got, tt.want)
			}
		})
	}
}

func TestConfirmWaitsForTheSwitch(t *testing.T) {
	var nudges atomic.Int64
	newHash := providers.HashKeyID("file:k/2")
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/readyz/kms-providers":
			nudges.Add(1)
		case "/metrics":
			hash := providers.HashKeyID("file:k/1")
			if nudges.Load() >= 3 {
				hash = newHash
			}
			fmt.Fprintf(w, "# TYPE %s gauge\n%s{key_id_hash=%q,provider_name=\"p\"} %d\n", keyIDStatusMetric, keyIDStatusMetric, hash, time.Now().Unix())
		}
	}))
	defer srv.Close()
	a, err := NewAPIServer(&rest.Config{}, srv.URL, 0)
	if err != nil {
		t.Fatal(err)
	}
	got := a.Confirm(context.Background(), Etcd{}, etcdlayout.KMSv2Writer("p", "file:k/2"), Resource{}, 10*time.Millisecond, 5*time.Second)
	if !got.Switched {
		t.Fatalf("not switched: %s", got.Error)
	}
	if got, want := got.Attempts, 3; got != want {
		t.Errorf("attempts: got %d, want %d", got, want)
	}
	if never := a.Confirm(context.Background(), Etcd{}, etcdlayout.KMSv2Writer("p", "file:k/3"), Resource{}, 10*time.Millisecond, 100*time.Millisecond); never.Switched {
		t.Errorf("switched to a key the apiserver never reported")
	}
}

func TestDiscoverAPIServers(t *testing.T) {
	slice := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "discovery.k8s.io/v1",
		"kind":       "EndpointSlice",
		"metadata": map[string]any{
			"name": "kubernetes", "namespace": "default",
			"labels": map[string]any{"kubernetes.io/service-name": "kubernetes"},
		},
		"addressType": "IPv4",
		"endpoints": []any{
			map[string]any{"addresses": []any{"10.0.0.2"}, "conditions": map[string]any{"ready": true}},
			map[string]any{"addresses": []any{"10.0.0.1"}},
			map[string]any{"addresses": []any{"10.0.0.3"}, "conditions": map[string]any{"ready": false}},
		},
		"ports": []any{map[string]any{"name": "https", "port": int64(6443)}},
	}}
	kube := fake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(),
		map[schema.GroupVersionResource]string{endpointSlicesGVR: "EndpointSliceList"}, slice)
	got, err := DiscoverAPIServers(context.Background(), kube)
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"https://10.0.0.1:6443", "https://10.0.0.2:6443"}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("got %v, want %v (not ready endpoints left out)", got, want)
	}
}

func TestRunAdoptsStaleEncodingsWithoutForce(t *testing.T) {
	c := newCluster(t, time.Hour, 0, 0)
	c.etcd.put("/registry/secrets/ns/plain", []byte("k8s\x00plain"))
	c.etcd.put("/registry/secrets/ns/aescbc", []byte("k8s:enc:aescbc:v1:key1:xx"))
	c.etcd.put("/registry/secrets/ns/renamed", kmsValueNamed(t, "old-name", "file:k/1"))
	c.etcd.put("/registry/secrets/ns/current", kmsValue(t, "file:k/1"))
	o := opts(t, "secrets")
	o.Retire = true
	rep, err := c.rotation(t).Run(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := rep.Action, ActionFinished; got != want {
		t.Errorf("action: got %q, want %q", got, want)
	}
	if got, want := c.rot.created, 0; got != want {
		t.Errorf("versions created: got %d, want %d (adoption needs no new key)", got, want)
	}
	rc := c.census(t, "file:k/1", "secrets").Resources[0]
	if got, want := rc.Objects("test", "file:k/1"), 4; got != want || rc.Stale != 0 {
		t.Errorf("under the current provider: got %d (stale %d), want %d (census %+v)", got, rc.Stale, want, rc)
	}
	if got, want := rep.Rewrite["secrets"].Rewritten, int64(3); got != want {
		t.Errorf("rewritten: got %d, want %d", got, want)
	}
}

func TestRunRefusesTheWrongEtcd(t *testing.T) {
	c := newCluster(t, time.Hour, 30, 0)
	rot := c.rotation(t)
	other := newFakeEtcd() // another cluster's etcd: the apiserver never writes here
	for i := range 5 {
		other.put(fmt.Sprintf("/registry/configmaps/x/%d", i), kmsValue(t, "file:k/1"))
	}
	rot.Etcd = other.etcd()
	o := opts(t, "secrets")
	o.Force, o.Retire = true, true
	_, err := rot.Run(context.Background(), o)
	if !errors.Is(err, ErrWrongEtcd) {
		t.Fatalf("err: got %v, want ErrWrongEtcd", err)
	}
	if !strings.Contains(err.Error(), "fake etcd") || !strings.Contains(err.Error(), "/registry") {
		t.Errorf("error %q does not name the etcd and the prefix", err)
	}
	if got, want := c.rot.created, 0; got != want {
		t.Errorf("versions created: got %d, want %d", got, want)
	}
	if got, want := c.rot.state("file:k/1"), providers.StatePrimary; got != want {
		t.Errorf("old key: got %s, want %s", got, want)
	}
}

func TestRunRefusesAnEmptyScanOfAListedResource(t *testing.T) {
	c := newCluster(t, time.Hour, 30, 0)
	rot := c.rotation(t)
	// The apiserver lists secrets, but the etcd read holds none under the
	// prefix: only the canary, as if objects lived in another etcd.
	empty := newFakeEtcd()
	c.api.canaryStore = empty
	rot.Etcd = empty.etcd()
	o := opts(t, "secrets")
	o.Force = true
	_, err := rot.Run(context.Background(), o)
	if !errors.Is(err, ErrWrongEtcd) || !strings.Contains(err.Error(), "lists some") {
		t.Fatalf("err: got %v, want ErrWrongEtcd for an empty scan of a listed resource", err)
	}
	if got, want := c.rot.created, 0; got != want {
		t.Errorf("versions created: got %d, want %d", got, want)
	}
}

// A run killed right after the create phase (what --crash-after create
// does) must already have recorded its target, or the rerun leaves the new
// version pending and does nothing.
func TestRunRecordsTheTargetWithinCreate(t *testing.T) {
	c := newCluster(t, time.Hour, 5, 0)
	o := opts(t, "secrets")
	o.Force = true
	var atCreate string
	o.AfterPhase = func(phase string) {
		if phase != PhaseCreate {
			return
		}
		lease, err := c.kube.Resource(LeaseGVR).Namespace(DefaultLeaseNamespace).Get(context.Background(), DefaultLeaseName, metav1.GetOptions{})
		if err != nil {
			t.Errorf("lease at the end of create: %v", err)
			return
		}
		atCreate = lease.GetAnnotations()[TargetAnnotation]
	}
	if _, err := c.rotation(t).Run(context.Background(), o); err != nil {
		t.Fatal(err)
	}
	if got, want := atCreate, "file:k/2"; got != want {
		t.Errorf("lease target when create ended: got %q, want %q", got, want)
	}
}

// A run whose lease is taken while it rewrites stops, says it lost the
// lease (not "context canceled"), and retires nothing.
func TestRunStopsWhenTheLeaseIsLost(t *testing.T) {
	c := newCluster(t, time.Hour, 40, 0)
	o := opts(t, "secrets")
	o.Force, o.Retire = true, true
	o.Lock.Duration = 300 * time.Millisecond
	// Once another run has taken the lease, every renewal conflicts.
	var taken atomic.Bool
	c.kube.PrependReactor("update", "leases", func(k8stesting.Action) (bool, runtime.Object, error) {
		if !taken.Load() {
			return false, nil, nil
		}
		return true, nil, apierrors.NewConflict(LeaseGVR.GroupResource(), DefaultLeaseName, errors.New("taken by another run"))
	})
	o.AfterPhase = func(phase string) {
		if phase == PhaseRewrite {
			taken.Store(true)
			time.Sleep(time.Second) // several renewals: the run sees the lease gone
		}
	}
	_, err := c.rotation(t).Run(context.Background(), o)
	if !errors.Is(err, ErrLocked) || !strings.Contains(err.Error(), "lost the rotation lease") {
		t.Fatalf("err: got %v, want the lost lease", err)
	}
	if got, want := c.rot.state("file:k/1"), providers.StateEnabled; got != want {
		t.Errorf("old key after a lost lease: got %s, want %s", got, want)
	}
}

// Without MaxPasses a run still makes further passes for what one pass
// left (here a patch refused once, as a restarting apiserver whose RBAC
// cache is cold refuses it), so the CLI, which sets none, finishes.
func TestRunDefaultPassesFinishWhatOnePassLeft(t *testing.T) {
	c := newCluster(t, time.Hour, 10, 0)
	var refused atomic.Bool
	c.api.onPatch = func(key string) (int, string) {
		if strings.HasSuffix(key, "obj-0007") && refused.CompareAndSwap(false, true) {
			return http.StatusForbidden, ""
		}
		return 0, ""
	}
	o := opts(t, "secrets")
	o.MaxPasses = 0
	o.Force = true
	rep, err := c.rotation(t).Run(context.Background(), o)
	if err != nil {
		t.Fatalf("err: %v", err)
	}
	if got, want := rep.Passes, 2; got != want {
		t.Errorf("passes: got %d, want %d", got, want)
	}
}
