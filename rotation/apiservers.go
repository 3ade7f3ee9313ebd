package rotation

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"

	"github.com/kms-v2/kms-plugin/providers"
	"github.com/kms-v2/kms-plugin/rotation/etcdlayout"
)

// keyIDStatusMetric is the apiserver's record of the last time its plugin's
// Status returned each key_id (by hash).
const keyIDStatusMetric = "apiserver_envelope_encryption_key_id_hash_status_last_timestamp_seconds"

// APIServer is one kube-apiserver addressed directly (not through a load
// balancer), since each one must be checked on its own.
type APIServer struct {
	URL    string
	canary string
	http   *http.Client
	kube   dynamic.Interface
}

// Resources the orchestrator reads or writes besides the rewritten ones,
// addressed through the dynamic client (see LeaseGVR for why not typed).
var (
	secretsGVR         = schema.GroupVersionResource{Version: "v1", Resource: "secrets"}
	configMapsGVR      = schema.GroupVersionResource{Version: "v1", Resource: "configmaps"}
	endpointSlicesGVR  = schema.GroupVersionResource{Group: "discovery.k8s.io", Version: "v1", Resource: "endpointslices"}
	secretsResource    = Resource{Name: "secrets", GVR: secretsGVR, Path: "secrets"}
	configMapsResource = Resource{Name: "configmaps", GVR: configMapsGVR, Path: "configmaps"}
)

// NewAPIServer builds clients for the apiserver at u with the credentials
// and CA of base (the kubeconfig's). index numbers its canaries
// (kmsctl-canary-<index>), a fixed name RBAC can grant by resourceNames.
func NewAPIServer(base *rest.Config, u string, index int) (*APIServer, error) {
	cfg := rest.CopyConfig(base)
	cfg.Host = u
	cfg.Timeout = 10 * time.Second
	hc, err := rest.HTTPClientFor(cfg)
	if err != nil {
		return nil, fmt.Errorf("apiserver %s: %w", u, err)
	}
	kc, err := dynamic.NewForConfigAndClient(cfg, hc)
	if err != nil {
		return nil, fmt.Errorf("apiserver %s: %w", u, err)
	}
	return &APIServer{URL: strings.TrimSuffix(u, "/"), canary: "kmsctl-canary-" + strconv.Itoa(index), http: hc, kube: kc}, nil
}

// DiscoverAPIServers returns the URLs of the ready endpoints of the
// `kubernetes` service in `default`, which the apiservers maintain
// themselves. An empty result means they cannot be told apart.
func DiscoverAPIServers(ctx context.Context, kube dynamic.Interface) ([]string, error) {
	list, err := kube.Resource(endpointSlicesGVR).Namespace(metav1.NamespaceDefault).List(ctx, metav1.ListOptions{
		LabelSelector: "kubernetes.io/service-name=kubernetes",
	})
	if err != nil {
		return nil, fmt.Errorf("discover apiservers: %w", err)
	}
	seen := map[string]bool{}
	var out []string
	for _, item := range list.Items {
		var s endpointSlice
		if err := runtime.DefaultUnstructuredConverter.FromUnstructured(item.Object, &s); err != nil {
			return nil, fmt.Errorf("discover apiservers: endpointslice %s: %w", item.GetName(), err)
		}
		port := int32(443)
		for _, p := range s.Ports {
			if p.Port != nil && (p.Name == nil || *p.Name == "https") {
				port = *p.Port
			}
		}
		for _, e := range s.Endpoints {
			if e.Conditions.Ready != nil && !*e.Conditions.Ready {
				continue
			}
			for _, a := range e.Addresses {
				u := "https://" + net.JoinHostPort(a, strconv.Itoa(int(port)))
				if !seen[u] {
					seen[u] = true
					out = append(out, u)
				}
			}
		}
	}
	sort.Strings(out)
	return out, nil
}

// endpointSlice is the part of a discovery.k8s.io/v1 EndpointSlice that
// DiscoverAPIServers reads (field names as in k8s.io/api/discovery/v1).
type endpointSlice struct {
	Endpoints []struct {
		Addresses  []string `json:"addresses"`
		Conditions struct {
			Ready *bool `json:"ready,omitempty"`
		} `json:"conditions"`
	} `json:"endpoints"`
	Ports []struct {
		Name *string `json:"name,omitempty"`
		Port *int32  `json:"port,omitempty"`
	} `json:"ports"`
}

// Readyz asks the apiserver for /readyz/kms-providers. Besides telling
// health, it makes the apiserver call Status once its cached result (20 s)
// has expired: the nudge that makes it notice a new key_id sooner than its
// once-a-minute poll.
func (a *APIServer) Readyz(ctx context.Context) error {
	_, err := a.get(ctx, "/readyz/kms-providers")
	return err
}

func (a *APIServer) get(ctx context.Context, path string) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, a.URL+path, nil)
	if err != nil {
		return nil, err
	}
	resp, err := a.http.Do(req)
	if err != nil {
		return nil, fmt.Errorf("GET %s%s: %w", a.URL, path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return nil, fmt.Errorf("GET %s%s: %w", a.URL, path, err)
	}
	if resp.StatusCode != http.StatusOK {
		return body, fmt.Errorf("GET %s%s: %s: %s", a.URL, path, resp.Status, strings.TrimSpace(string(body)))
	}
	return body, nil
}

// errNoMetric means the apiserver does not expose the key_id status metric
// (it is alpha): only the canary can tell.
var errNoMetric = errors.New("apiserver does not export " + keyIDStatusMetric)

// LatestKeyIDHashes reads the apiserver's /metrics and returns, per KMS
// provider name, the key_id hash its latest Status returned.
func (a *APIServer) LatestKeyIDHashes(ctx context.Context) (map[string]string, error) {
	body, err := a.get(ctx, "/metrics")
	if err != nil {
		return nil, err
	}
	return latestKeyIDHashes(body)
}

func latestKeyIDHashes(metrics []byte) (map[string]string, error) {
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(strings.NewReader(string(metrics)))
	if err != nil {
		return nil, fmt.Errorf("parse metrics: %w", err)
	}
	fam, ok := fams[keyIDStatusMetric]
	if !ok {
		return nil, errNoMetric
	}
	best := map[string]float64{}
	out := map[string]string{}
	for _, m := range fam.GetMetric() {
		var provider, hash string
		for _, l := range m.GetLabel() {
			switch l.GetName() {
			case "provider_name":
				provider = l.GetValue()
			case "key_id_hash":
				hash = l.GetValue()
			}
		}
		v := m.GetGauge().GetValue()
		if cur, ok := best[provider]; !ok || v > cur {
			best[provider], out[provider] = v, hash
		}
	}
	if len(out) == 0 {
		return nil, errNoMetric
	}
	return out, nil
}

// canaryName is this apiserver's canary object: one per apiserver so
// concurrent checks do not collide.
func (a *APIServer) canaryName() string { return a.canary }

// canaryResources are the resources a canary can be written for: core
// resources whose objects take arbitrary data.
var canaryResources = map[string]bool{"secrets": true, "configmaps": true}

// Canary writes this apiserver's canary of r (a Secret or ConfigMap in
// kube-system) through it, and reads it back from etcd at the revision the
// write returned. It returns how the apiserver wrote it (its writer for r
// now) and the proof that e is the apiserver's etcd; a canary missing from
// etcd, or there at another revision, is ErrWrongEtcd.
func (a *APIServer) Canary(ctx context.Context, e Etcd, r Resource) (etcdlayout.Writer, string, error) {
	if !canaryResources[r.Name] {
		return etcdlayout.Writer{}, "", fmt.Errorf("no canary can be written for %s", r.Name)
	}
	rv, err := a.writeCanary(ctx, r)
	if err != nil {
		return etcdlayout.Writer{}, "", fmt.Errorf("canary %s through %s: %w", r.Name, a.URL, err)
	}
	what := fmt.Sprintf("the canary %s kube-system/%s written through %s", r.Name, a.canaryName(), a.URL)
	key := e.Layout.Key(r.Path, metav1.NamespaceSystem, a.canaryName())
	proof, kv, err := proveRevision(ctx, e, what, key, rv)
	if err != nil {
		return etcdlayout.Writer{}, "", err
	}
	return etcdlayout.WriterOf(etcdlayout.Decode(kv.Value)), proof, nil
}

// writeCanary creates or updates the canary of r and returns the
// resourceVersion of that write.
func (a *APIServer) writeCanary(ctx context.Context, r Resource) (string, error) {
	objs := a.kube.Resource(r.GVR).Namespace(metav1.NamespaceSystem)
	stamp := map[string]string{"kms-plugin.kms-v2.io/canary": time.Now().UTC().Format(time.RFC3339Nano)}
	cur, err := objs.Get(ctx, a.canaryName(), metav1.GetOptions{})
	if err == nil {
		cur.SetAnnotations(stamp)
		cur, err = objs.Update(ctx, cur, metav1.UpdateOptions{})
		if err != nil {
			return "", err
		}
		return cur.GetResourceVersion(), nil
	}
	if !apierrors.IsNotFound(err) {
		return "", err
	}
	note := "written by kmsctl rotate to check how this apiserver stores " + r.Name
	data := map[string]any{"canary": note}
	kind := "ConfigMap"
	if r.Name == "secrets" {
		kind, data = "Secret", map[string]any{"canary": base64.StdEncoding.EncodeToString([]byte(note))}
	}
	canary := &unstructured.Unstructured{Object: map[string]any{"apiVersion": "v1", "kind": kind, "data": data}}
	canary.SetName(a.canaryName())
	canary.SetAnnotations(stamp)
	canary.SetLabels(map[string]string{"app.kubernetes.io/managed-by": "kmsctl"})
	created, err := objs.Create(ctx, canary, metav1.CreateOptions{})
	if err != nil {
		return "", err
	}
	return created.GetResourceVersion(), nil
}

// DeleteCanaries removes this apiserver's canaries.
func (a *APIServer) DeleteCanaries(ctx context.Context) error {
	var errs []error
	for _, gvr := range []schema.GroupVersionResource{secretsGVR, configMapsGVR} {
		err := a.kube.Resource(gvr).Namespace(metav1.NamespaceSystem).Delete(ctx, a.canaryName(), metav1.DeleteOptions{})
		if err != nil && !apierrors.IsNotFound(err) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// APIServerCheck is what confirming one apiserver found.
type APIServerCheck struct {
	URL string `json:"url"`
	// Switched says the apiserver proved it uses the wanted key.
	Switched bool `json:"switched"`
	// By lists the proofs: "metrics", "canary".
	By       []string `json:"by,omitempty"`
	Attempts int      `json:"attempts"`
	Error    string   `json:"error,omitempty"`
	Took     Duration `json:"took"`
	// TookSeconds is Took in seconds.
	TookSeconds float64 `json:"tookSeconds"`
}

// confirmOnce checks one apiserver once: nudge, metrics, canary.
func (a *APIServer) confirmOnce(ctx context.Context, e Etcd, want etcdlayout.Writer, with Resource) ([]string, error) {
	_ = a.Readyz(ctx)
	hashes, merr := a.LatestKeyIDHashes(ctx)
	if merr != nil && !errors.Is(merr, errNoMetric) {
		return nil, merr
	}
	var by []string
	if merr == nil {
		if !slices.Contains(slices.Collect(maps.Values(hashes)), providers.HashKeyID(want.KeyID)) {
			return nil, fmt.Errorf("its latest plugin Status did not return %s yet", want.KeyID)
		}
		by = append(by, "metrics")
	}
	if with.Name == "" {
		if len(by) == 0 {
			return nil, fmt.Errorf("neither its metrics nor a canary (no canary resource is encrypted through the plugin) can tell its key")
		}
		return by, nil
	}
	got, _, err := a.Canary(ctx, e, with)
	switch {
	case err != nil:
		return nil, err
	case got != want:
		return nil, fmt.Errorf("its canary %s is stored as %s, not %s", with.Name, got, want)
	}
	return append(by, "canary"), nil
}

// Confirm polls one apiserver until it proves it writes as want (provider
// name and key_id) or timeout passes, nudging it each time. The proof is
// its Status metric and a canary of with read back from etcd (a zero with:
// the metric alone).
func (a *APIServer) Confirm(ctx context.Context, e Etcd, want etcdlayout.Writer, with Resource, interval, timeout time.Duration) APIServerCheck {
	start := time.Now()
	c := APIServerCheck{URL: a.URL}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for {
		c.Attempts++
		by, err := a.confirmOnce(ctx, e, want, with)
		if err == nil {
			c.Switched, c.By, c.Error = true, by, ""
			break
		}
		c.Error = err.Error()
		if errors.Is(err, ErrWrongEtcd) || sleep(ctx, interval) != nil {
			break
		}
	}
	c.Took = Duration(time.Since(start))
	c.TookSeconds = c.Took.Seconds()
	return c
}
