package rotation

import (
	"context"
	"fmt"
	"testing"

	"github.com/kms-v2/kms-plugin/rotation/etcdlayout"
)

// kmsValueNamed is what kube-apiserver stores for an object written by the
// KMS v2 provider named provider under keyID.
func kmsValueNamed(t testing.TB, provider, keyID string) []byte {
	t.Helper()
	v := kmsValue(t, keyID)
	return append([]byte(etcdlayout.KMSv2Prefix+provider+":"), v[len(etcdlayout.KMSv2Prefix+"test:"):]...)
}

func TestTakeCensus(t *testing.T) {
	secrets := mustResource(t, "secrets")
	current := etcdlayout.KMSv2Writer("test", "file:k/2")
	tests := []struct {
		name         string
		values       map[string][]byte
		writer       *etcdlayout.Writer
		pageSize     int64
		wantTotal    int
		wantStale    int
		wantStored   string
		wantPlain    int
		wantOther    int
		wantBad      int
		wantNamed    int
		wantNotCurrt int
	}{
		{
			name:   "all current",
			values: map[string][]byte{"/registry/secrets/a/1": kmsValue(t, "file:k/2"), "/registry/secrets/a/2": kmsValue(t, "file:k/2")},
			writer: &current, wantTotal: 2, wantStored: "test/file:k/2=2(current)",
		},
		{
			name: "mixed keys across pages",
			values: map[string][]byte{
				"/registry/secrets/a/1": kmsValue(t, "file:k/1"), "/registry/secrets/a/2": kmsValue(t, "file:k/2"),
				"/registry/secrets/b/3": kmsValue(t, "file:k/1"), "/registry/secrets/b/4": []byte("k8s\x00plain"),
				"/registry/secrets/c/5": []byte(etcdlayout.KMSv2Prefix + "test:\xff\xff"),
			},
			writer: &current, pageSize: 2, wantTotal: 5, wantStale: 3, wantNamed: 4, wantNotCurrt: 4,
			wantStored: "test/file:k/1=2 test/file:k/2=1(current)", wantPlain: 1, wantBad: 1,
		},
		{
			name: "renamed provider with the same key is stale",
			values: map[string][]byte{
				"/registry/secrets/a/1": kmsValueNamed(t, "old", "file:k/2"), "/registry/secrets/a/2": kmsValue(t, "file:k/2"),
			},
			writer: &current, wantTotal: 2, wantStale: 1, wantNamed: 1, wantNotCurrt: 1,
			wantStored: "old/file:k/2=1 test/file:k/2=1(current)",
		},
		{
			name: "plaintext and aescbc are stale under a KMS writer",
			values: map[string][]byte{
				"/registry/secrets/a/1": []byte("k8s\x00plain"), "/registry/secrets/a/2": []byte("k8s:enc:aescbc:v1:key1:xx"),
			},
			writer: &current, wantTotal: 2, wantStale: 2, wantNamed: 2, wantNotCurrt: 2, wantPlain: 1, wantOther: 1,
		},
		{
			name:      "no writer judges nothing",
			values:    map[string][]byte{"/registry/secrets/a/1": kmsValue(t, "file:k/1"), "/registry/secrets/a/2": []byte("k8s\x00plain")},
			wantTotal: 2, wantStored: "test/file:k/1=1", wantPlain: 1,
		},
		{
			name: "other resources and neighbours are not counted",
			values: map[string][]byte{
				"/registry/secrets/a/1": kmsValue(t, "file:k/1"), "/registry/secretsX/a/1": kmsValue(t, "file:k/1"),
				"/registry/configmaps/a/1": kmsValue(t, "file:k/1"),
			},
			writer: &current, wantTotal: 1, wantStale: 1, wantNamed: 1, wantNotCurrt: 1, wantStored: "test/file:k/1=1",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newFakeEtcd()
			for k, v := range tt.values {
				e.put(k, v)
			}
			var w Writers
			if tt.writer != nil {
				w = Writers{"secrets": *tt.writer}
			}
			c, err := TakeCensus(context.Background(), e.etcd(), []Resource{secrets}, w, CensusOptions{PageSize: tt.pageSize})
			if err != nil {
				t.Fatal(err)
			}
			rc := c.Resources[0]
			for _, x := range []struct {
				what      string
				got, want int
			}{
				{"total", rc.Total, tt.wantTotal}, {"stale", c.Stale(), tt.wantStale}, {"not current", c.NotCurrent(), tt.wantNotCurrt},
				{"plaintext", rc.Plaintext, tt.wantPlain}, {"other", rc.Other, tt.wantOther}, {"undecodable", rc.Undecodable, tt.wantBad},
				{"named", len(rc.StaleObjects) + len(rc.UndecodableObjects), tt.wantNamed},
			} {
				if x.got != x.want {
					t.Errorf("%s: got %d, want %d", x.what, x.got, x.want)
				}
			}
			if got, want := storedString(rc), tt.wantStored; got != want {
				t.Errorf("by provider: got %q, want %q", got, want)
			}
		})
	}
}

func storedString(rc ResourceCensus) string {
	s := ""
	for i, x := range rc.ByProvider {
		if i > 0 {
			s += " "
		}
		s += fmt.Sprintf("%s/%s=%d", x.Provider, x.KeyID, x.Objects)
		if x.Current {
			s += "(current)"
		}
	}
	return s
}

func TestCensusStaleListIsBounded(t *testing.T) {
	e := newFakeEtcd()
	for i := range 20 {
		e.put(fmt.Sprintf("/registry/secrets/ns/s%02d", i), kmsValue(t, "file:k/1"))
	}
	w := Writers{"secrets": etcdlayout.KMSv2Writer("test", "file:k/2")}
	c, err := TakeCensus(context.Background(), e.etcd(), []Resource{mustResource(t, "secrets")}, w, CensusOptions{PageSize: 3, StaleListLimit: 5})
	if err != nil {
		t.Fatal(err)
	}
	if got, want := c.Stale(), 20; got != want {
		t.Errorf("stale: got %d, want %d", got, want)
	}
	if got, want := len(c.Resources[0].StaleObjects), 5; got != want {
		t.Errorf("named: got %d, want %d", got, want)
	}
	if got, want := e.ranges, 7; got != want {
		t.Errorf("etcd pages: got %d, want %d (20 keys, 3 a page)", got, want)
	}
}

func TestCensusUnderCustomPrefix(t *testing.T) {
	e := newFakeEtcd()
	e.put("/custom/secrets/a/1", kmsValue(t, "file:k/1"))
	e.put("/registry/secrets/a/1", kmsValue(t, "file:k/1"))
	layout, err := etcdlayout.New("/custom")
	if err != nil {
		t.Fatal(err)
	}
	c, err := TakeCensus(context.Background(), Etcd{Store: e, Layout: layout}, []Resource{mustResource(t, "secrets")}, nil, CensusOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got, want := c.Total(), 1; got != want {
		t.Errorf("objects under /custom: got %d, want %d", got, want)
	}
}

func TestKeyReferences(t *testing.T) {
	e := newFakeEtcd()
	e.put("/registry/secrets/a/1", kmsValue(t, "file:k/2"))
	e.put("/registry/configmaps/a/1", kmsValue(t, "file:k/1"))
	e.put("/registry/example.com/widgets/a/1", kmsValueNamed(t, "other", "file:k/1"))
	e.put("/registry/example.com/widgets/a/2", []byte(etcdlayout.KMSv2Prefix+"x:\xff"))
	refs, err := KeyReferences(context.Background(), e.etcd(), []string{"file:k/1"}, 2)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := refs["file:k/1"], 2; got != want {
		t.Errorf("references to the old key in every resource, under any provider name: got %d, want %d", got, want)
	}
	if got, want := refs[UndecodableKey], 1; got != want {
		t.Errorf("undecodable: got %d, want %d", got, want)
	}
}

func TestParseResource(t *testing.T) {
	tests := []struct {
		name, in string
		wantPath string
		wantErr  bool
	}{
		{name: "secrets", in: "secrets", wantPath: "secrets"},
		{name: "configmaps", in: "configmaps", wantPath: "configmaps"},
		{name: "custom resource", in: "widgets.v1.example.com", wantPath: "example.com/widgets"},
		{name: "unknown short name", in: "deployments", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, err := ParseResource(tt.in)
			if (err != nil) != tt.wantErr {
				t.Fatalf("err: got %v, want error %v", err, tt.wantErr)
			}
			if got, want := r.Path, tt.wantPath; got != want {
				t.Errorf("path: got %q, want %q", got, want)
			}
		})
	}
}

func mustResource(t testing.TB, name string) Resource {
	t.Helper()
	r, err := ParseResource(name)
	if err != nil {
		t.Fatal(err)
	}
	return r
}
