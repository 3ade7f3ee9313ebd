package rotation

import (
	"context"
	"encoding/base64"
	"fmt"
	"io"
	"net"
	"net/http"
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
	secretsGVR        = schema.GroupVersionResource{Version: "v1", Resource: "secrets"}
	endpointSlicesGVR = schema.GroupVersionResource{Group: "discovery.k8s.io", Version: "v1", Resource: "endpointslices"}
)

// NewAPIServer builds clients for the apiserver at u with the credentials
// and CA of base (the kubeconfig's). index numbers its canary secret
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
var errNoMetric = fmt.Errorf("apiserver does not export %s", keyIDStatusMetric)

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

// canaryName is this apiserver's canary secret: one per apiserver so
// concurrent checks do not collide.
func (a *APIServer) canaryName() string { return a.canary }

// Canary writes the canary secret through this apiserver and returns the
// key_id etcd now holds for it: the end-to-end proof of which key this
// apiserver encrypts with. errNoCanary means secrets are not stored under
// KMS v2, so the canary proves nothing.
func (a *APIServer) Canary(ctx context.Context, s Store) (string, error) {
	secrets := a.kube.Resource(secretsGVR).Namespace(metav1.NamespaceSystem)
	name := a.canaryName()
	stamp := map[string]string{"kms-plugin.kms-v2.io/canary": time.Now().UTC().Format(time.RFC3339Nano)}
	cur, err := secrets.Get(ctx, name, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		canary := &unstructured.Unstructured{Object: map[string]any{
			"apiVersion": "v1",
			"kind":       "Secret",
			"data": map[string]any{
				"canary": base64.StdEncoding.EncodeToString([]byte("written by kmsctl rotate to check which key this apiserver uses")),
			},
		}}
		canary.SetName(name)
		canary.SetAnnotations(stamp)
		canary.SetLabels(map[string]string{"app.kubernetes.io/managed-by": "kmsctl"})
		_, err = secrets.Create(ctx, canary, metav1.CreateOptions{})
	case err == nil:
		cur.SetAnnotations(stamp)
		_, err = secrets.Update(ctx, cur, metav1.UpdateOptions{})
	}
	if err != nil {
		return "", fmt.Errorf("canary through %s: %w", a.URL, err)
	}
	kvs, err := s.Range(ctx, "/registry/secrets/kube-system/"+name, "/registry/secrets/kube-system/"+name+"\x00", 1)
	if err != nil {
		return "", fmt.Errorf("canary read back: %w", err)
	}
	if len(kvs) == 0 {
		return "", fmt.Errorf("canary %s not found in etcd", name)
	}
	sv := DecodeStoredValue(kvs[0].Value)
	if sv.Encoding != EncodingKMSv2 {
		return "", errNoCanary
	}
	return sv.KeyID, nil
}

// DeleteCanary removes this apiserver's canary secret.
func (a *APIServer) DeleteCanary(ctx context.Context) error {
	err := a.kube.Resource(secretsGVR).Namespace(metav1.NamespaceSystem).Delete(ctx, a.canaryName(), metav1.DeleteOptions{})
	if apierrors.IsNotFound(err) {
		return nil
	}
	return err
}

var errNoCanary = fmt.Errorf("secrets are not stored under KMS v2; the canary cannot tell the key")

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
}

// confirmOnce checks one apiserver once: nudge, metrics, canary.
func (a *APIServer) confirmOnce(ctx context.Context, s Store, keyID string) ([]string, error) {
	_ = a.Readyz(ctx)
	want := providers.HashKeyID(keyID)
	var by []string
	hashes, merr := a.LatestKeyIDHashes(ctx)
	switch {
	case merr == nil:
		found := false
		for _, h := range hashes {
			found = found || h == want
		}
		if !found {
			return nil, fmt.Errorf("its latest plugin Status did not return %s yet", keyID)
		}
		by = append(by, "metrics")
	case merr != errNoMetric:
		return nil, merr
	}
	if s != nil {
		got, err := a.Canary(ctx, s)
		switch {
		case err == nil && got == keyID:
			by = append(by, "canary")
		case err == nil:
			return nil, fmt.Errorf("canary written through it is under %s, not %s", got, keyID)
		case err != errNoCanary:
			return nil, err
		}
	}
	if len(by) == 0 {
		return nil, fmt.Errorf("neither its metrics nor a canary can tell its key")
	}
	return by, nil
}

// Confirm polls one apiserver until it proves it encrypts with keyID or
// timeout passes, nudging it each time.
func (a *APIServer) Confirm(ctx context.Context, s Store, keyID string, interval, timeout time.Duration) APIServerCheck {
	start := time.Now()
	c := APIServerCheck{URL: a.URL}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for {
		c.Attempts++
		by, err := a.confirmOnce(ctx, s, keyID)
		if err == nil {
			c.Switched, c.By, c.Error = true, by, ""
			c.Took = Duration(time.Since(start))
			return c
		}
		c.Error = err.Error()
		t := time.NewTimer(interval)
		select {
		case <-ctx.Done():
			t.Stop()
			c.Took = Duration(time.Since(start))
			return c
		case <-t.C:
		}
	}
}
