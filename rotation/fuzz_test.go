package rotation

import (
	"math"
	"strings"
	"testing"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/kms-v2/kms-plugin/rotation/etcdlayout"
)

// FuzzLatestKeyIDHashes: an apiserver's /metrics body is input from the
// network. Any body parses without a panic; a result names, for each
// provider, a key_id hash that a sample of the status metric carried for
// that provider, and no sample of that provider is newer.
func FuzzLatestKeyIDHashes(f *testing.F) {
	f.Add([]byte(`# TYPE apiserver_envelope_encryption_key_id_hash_status_last_timestamp_seconds gauge
apiserver_envelope_encryption_key_id_hash_status_last_timestamp_seconds{apiserver_id_hash="x",key_id_hash="sha256:old",provider_name="p"} 100
apiserver_envelope_encryption_key_id_hash_status_last_timestamp_seconds{apiserver_id_hash="x",key_id_hash="sha256:new",provider_name="p"} 200
apiserver_envelope_encryption_key_id_hash_status_last_timestamp_seconds{key_id_hash="sha256:q",provider_name="q"} 1
`))
	f.Add([]byte("# TYPE other gauge\nother 1\n"))
	f.Add([]byte(keyIDStatusMetric + "{provider_name=\"p\"} NaN\n"))
	f.Add([]byte(keyIDStatusMetric + " 1\n"))
	f.Add([]byte("# TYPE " + keyIDStatusMetric + " counter\n" + keyIDStatusMetric + "{provider_name=\"p\",key_id_hash=\"h\"} 1\n"))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, body []byte) {
		got, err := latestKeyIDHashes(body)
		if err != nil {
			if got != nil {
				t.Fatalf("error %v with a result %v", err, got)
			}
			return
		}
		if len(got) == 0 {
			t.Fatal("no error and no result")
		}
		p := expfmt.NewTextParser(model.UTF8Validation)
		fams, perr := p.TextToMetricFamilies(strings.NewReader(string(body)))
		if perr != nil {
			t.Fatalf("latestKeyIDHashes accepted a body the parser refuses: %v", perr)
		}
		type sample struct {
			hash string
			v    float64
		}
		byProvider := map[string][]sample{}
		for _, m := range fams[keyIDStatusMetric].GetMetric() {
			var provider, hash string
			for _, l := range m.GetLabel() {
				switch l.GetName() {
				case "provider_name":
					provider = l.GetValue()
				case "key_id_hash":
					hash = l.GetValue()
				}
			}
			byProvider[provider] = append(byProvider[provider], sample{hash, m.GetGauge().GetValue()})
		}
		if len(got) != len(byProvider) {
			t.Fatalf("%d providers in the samples, %d in the result", len(byProvider), len(got))
		}
		for provider, hash := range got {
			ss, ok := byProvider[provider]
			if !ok {
				t.Fatalf("provider %q is in no sample", provider)
			}
			chosen := math.Inf(-1)
			carried := false
			for _, s := range ss {
				if s.hash == hash {
					carried = true
					if !(s.v < chosen) {
						chosen = s.v
					}
				}
			}
			if !carried {
				t.Fatalf("provider %q: hash %q is in no sample", provider, hash)
			}
			for _, s := range ss {
				if s.v > chosen {
					t.Fatalf("provider %q: chose %q (%v) over the newer %q (%v)", provider, hash, chosen, s.hash, s.v)
				}
			}
		}
	})
}

// FuzzParseResources: --resources is operator input, split at commas as
// the flag does. A list that parses names each resource once; every
// resource parses again from its own name to itself, names a custom
// resource's etcd path as exactly "<group>/<resource>", and its objects'
// etcd keys parse back through the layout.
func FuzzParseResources(f *testing.F) {
	for _, s := range []string{
		"secrets", "secrets,configmaps", " secrets ", "widgets.v1.example.com",
		"secrets,secrets", "a.b.", ".v1.g", "widgets.v1.x/y", "a b.v1.g", "", ",",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, list string) {
		rs, err := ParseResources(strings.Split(list, ","))
		if err != nil {
			if rs != nil {
				t.Fatalf("error %v with a result %v", err, rs)
			}
			return
		}
		seen := map[string]bool{}
		l := etcdlayout.Default()
		for _, r := range rs {
			if seen[r.Path] {
				t.Fatalf("%q: path %q twice", list, r.Path)
			}
			seen[r.Path] = true
			again, err := ParseResource(r.Name)
			if err != nil || again != r {
				t.Fatalf("%q: ParseResource(%q) = %+v, %v; want %+v", list, r.Name, again, err, r)
			}
			if r.GVR.Group != "" {
				if want := r.GVR.Group + "/" + r.GVR.Resource; r.Path != want || strings.Count(r.Path, "/") != 1 {
					t.Fatalf("%q: custom resource path %q, want exactly %q", list, r.Path, want)
				}
				if got := l.TopSegment(l.Key(r.Path, "ns", "n")); got != r.GVR.Group {
					t.Fatalf("%q: the top etcd segment of %s is %q, want its group %q", list, r.Name, got, r.GVR.Group)
				}
			}
			key := l.Key(r.Path, "ns", "n")
			if got, err := l.ParseKey(key, r.Path); err != nil || got != (etcdlayout.ObjectKey{Resource: r.Path, Namespace: "ns", Name: "n"}) {
				t.Fatalf("%q: key %q of %s parses to %+v, %v", list, key, r.Name, got, err)
			}
			if r.configName() == "" {
				t.Fatalf("%q: %s has no configuration name", list, r.Name)
			}
		}
	})
}
