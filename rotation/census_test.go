package rotation

import (
	"context"
	"fmt"
	"testing"
)

func TestTakeCensus(t *testing.T) {
	secrets, configmaps := mustResource(t, "secrets"), mustResource(t, "configmaps")
	tests := []struct {
		name      string
		values    map[string][]byte
		current   string
		pageSize  int64
		wantTotal int
		wantStale int
		wantByKey map[string]int
		wantPlain int
		wantBad   int
		wantNamed int
	}{
		{
			name:    "all current",
			values:  map[string][]byte{"/registry/secrets/a/1": kmsValue(t, "file:k/2"), "/registry/secrets/a/2": kmsValue(t, "file:k/2")},
			current: "file:k/2", wantTotal: 2, wantByKey: map[string]int{"file:k/2": 2},
		},
		{
			name: "mixed keys across pages",
			values: map[string][]byte{
				"/registry/secrets/a/1": kmsValue(t, "file:k/1"), "/registry/secrets/a/2": kmsValue(t, "file:k/2"),
				"/registry/secrets/b/3": kmsValue(t, "file:k/1"), "/registry/secrets/b/4": []byte("k8s\x00plain"),
				"/registry/secrets/c/5": []byte(KMSv2Prefix + "test:\xff\xff"),
			},
			current: "file:k/2", pageSize: 2, wantTotal: 5, wantStale: 2, wantNamed: 2,
			wantByKey: map[string]int{"file:k/1": 2, "file:k/2": 1}, wantPlain: 1, wantBad: 1,
		},
		{
			name: "other resources and neighbours are not counted",
			values: map[string][]byte{
				"/registry/secrets/a/1": kmsValue(t, "file:k/1"), "/registry/secretsX/a/1": kmsValue(t, "file:k/1"),
				"/registry/configmaps/a/1": kmsValue(t, "file:k/1"),
			},
			current: "file:k/2", wantTotal: 1, wantStale: 1, wantNamed: 1, wantByKey: map[string]int{"file:k/1": 1},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newFakeEtcd()
			for k, v := range tt.values {
				e.put(k, v)
			}
			c, err := TakeCensus(context.Background(), e, []Resource{secrets}, tt.current, CensusOptions{PageSize: tt.pageSize})
			if err != nil {
				t.Fatal(err)
			}
			rc := c.Resources[0]
			if got, want := rc.Total, tt.wantTotal; got != want {
				t.Errorf("total: got %d, want %d", got, want)
			}
			if got, want := c.Stale(), tt.wantStale; got != want {
				t.Errorf("stale: got %d, want %d", got, want)
			}
			if got, want := fmt.Sprint(rc.ByKeyID), fmt.Sprint(tt.wantByKey); got != want {
				t.Errorf("by key: got %s, want %s", got, want)
			}
			if got, want := rc.Unencrypted, tt.wantPlain; got != want {
				t.Errorf("unencrypted: got %d, want %d", got, want)
			}
			if got, want := rc.Undecodable, tt.wantBad; got != want {
				t.Errorf("undecodable: got %d, want %d", got, want)
			}
			if got, want := len(rc.StaleObjects), tt.wantNamed; got != want {
				t.Errorf("named stale: got %d, want %d", got, want)
			}
		})
	}
	_ = configmaps
}

func TestCensusStaleListIsBounded(t *testing.T) {
	e := newFakeEtcd()
	for i := range 20 {
		e.put(fmt.Sprintf("/registry/secrets/ns/s%02d", i), kmsValue(t, "file:k/1"))
	}
	c, err := TakeCensus(context.Background(), e, []Resource{mustResource(t, "secrets")}, "file:k/2", CensusOptions{PageSize: 3, StaleListLimit: 5})
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

func TestKeyReferences(t *testing.T) {
	e := newFakeEtcd()
	e.put("/registry/secrets/a/1", kmsValue(t, "file:k/2"))
	e.put("/registry/configmaps/a/1", kmsValue(t, "file:k/1"))
	e.put("/registry/example.com/widgets/a/1", kmsValue(t, "file:k/1"))
	refs, err := KeyReferences(context.Background(), e, []string{"file:k/1"}, 2)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := refs["file:k/1"], 2; got != want {
		t.Errorf("references to the old key in every resource: got %d, want %d", got, want)
	}
}

func TestParseResource(t *testing.T) {
	tests := []struct {
		name, in   string
		wantPrefix string
		wantErr    bool
	}{
		{name: "secrets", in: "secrets", wantPrefix: "/registry/secrets/"},
		{name: "configmaps", in: "configmaps", wantPrefix: "/registry/configmaps/"},
		{name: "custom resource", in: "widgets.v1.example.com", wantPrefix: "/registry/example.com/widgets/"},
		{name: "unknown short name", in: "deployments", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, err := ParseResource(tt.in)
			if (err != nil) != tt.wantErr {
				t.Fatalf("err: got %v, want error %v", err, tt.wantErr)
			}
			if got, want := r.EtcdPrefix, tt.wantPrefix; got != want {
				t.Errorf("prefix: got %q, want %q", got, want)
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
