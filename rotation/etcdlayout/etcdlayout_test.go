package etcdlayout

import (
	"testing"

	"google.golang.org/protobuf/proto"
	kmstypes "k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2/v2"
)

func kmsValue(t testing.TB, provider string, obj *kmstypes.EncryptedObject) []byte {
	t.Helper()
	b, err := proto.Marshal(obj)
	if err != nil {
		t.Fatal(err)
	}
	return append([]byte(KMSv2Prefix+provider+":"), b...)
}

func TestDecode(t *testing.T) {
	good := &kmstypes.EncryptedObject{KeyID: "file:ks/1", EncryptedDEKSource: []byte{1}, EncryptedData: []byte{2}, Annotations: map[string][]byte{"a.io": []byte("x")}}
	tests := []struct {
		name                   string
		value                  []byte
		wantEncoding           Encoding
		wantKind, wantProvider string
		wantKeyID              string
	}{
		{"kms v2", kmsValue(t, "kms-e2e", good), EncodingKMSv2, "kms:v2", "kms-e2e", "file:ks/1"},
		{"identity protobuf", []byte("k8s\x00\x0a\x0bv1"), EncodingPlain, "", "", ""},
		{"identity json", []byte(`{"kind":"Secret"}`), EncodingPlain, "", "", ""},
		{"aescbc", []byte("k8s:enc:aescbc:v1:key1:xxxx"), EncodingOther, "aescbc:v1", "key1", ""},
		{"secretbox", []byte("k8s:enc:secretbox:v1:k:\x00\x01"), EncodingOther, "secretbox:v1", "k", ""},
		{"kms v1", []byte("k8s:enc:kms:v1:old:xxxx"), EncodingOther, "kms:v1", "old", ""},
		{"other without name", []byte("k8s:enc:aescbc"), EncodingUndecodable, "", "", ""},
		{"no provider name", []byte(KMSv2Prefix + "noseparator"), EncodingUndecodable, "kms:v2", "", ""},
		{"garbage envelope", append([]byte(KMSv2Prefix+"p:"), 0xff, 0xff, 0xff), EncodingUndecodable, "kms:v2", "p", ""},
		{"envelope without keyID", kmsValue(t, "p", &kmstypes.EncryptedObject{EncryptedDEKSource: []byte{1}, EncryptedData: []byte{2}}), EncodingUndecodable, "kms:v2", "p", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := Decode(tt.value)
			if got.Encoding != tt.wantEncoding || got.Kind != tt.wantKind || got.Provider != tt.wantProvider || got.KeyID != tt.wantKeyID {
				t.Fatalf("Decode = %+v, want encoding %s kind %q provider %q keyID %q", got, tt.wantEncoding, tt.wantKind, tt.wantProvider, tt.wantKeyID)
			}
			if (got.Encoding == EncodingUndecodable) != (got.Err != nil) {
				t.Fatalf("Err = %v for encoding %s", got.Err, got.Encoding)
			}
		})
	}
}

func TestWriterCurrent(t *testing.T) {
	v := func(b []byte) Value { return Decode(b) }
	obj := func(k string) *kmstypes.EncryptedObject {
		return &kmstypes.EncryptedObject{KeyID: k, EncryptedDEKSource: []byte{1}, EncryptedData: []byte{2}}
	}
	kms := KMSv2Writer("b", "k2")
	tests := []struct {
		name  string
		w     Writer
		value []byte
		want  bool
	}{
		{"same provider and key", kms, kmsValue(t, "b", obj("k2")), true},
		{"old key", kms, kmsValue(t, "b", obj("k1")), false},
		{"renamed provider, same key", kms, kmsValue(t, "a", obj("k2")), false},
		{"plaintext under kms", kms, []byte("k8s\x00x"), false},
		{"aescbc under kms", kms, []byte("k8s:enc:aescbc:v1:key1:xx"), false},
		{"undecodable under kms", kms, []byte(KMSv2Prefix + "b:\xff\xff"), false},
		{"plaintext under identity", Writer{Encoding: EncodingPlain}, []byte("k8s\x00x"), true},
		{"kms under identity", Writer{Encoding: EncodingPlain}, kmsValue(t, "b", obj("k2")), false},
		{"aescbc same key name", Writer{Encoding: EncodingOther, Kind: "aescbc:v1", Provider: "key1"}, []byte("k8s:enc:aescbc:v1:key1:xx"), true},
		{"aescbc other key name", Writer{Encoding: EncodingOther, Kind: "aescbc:v1", Provider: "key1"}, []byte("k8s:enc:aescbc:v1:key2:xx"), false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.w.Current(v(tt.value)); got != tt.want {
				t.Fatalf("%s.Current(%s) = %v, want %v", tt.w, tt.name, got, tt.want)
			}
		})
	}
}

func TestLayout(t *testing.T) {
	for _, tt := range []struct{ in, want string }{
		{"/registry", "/registry"}, {"/custom/", "/custom"}, {"custom", "/custom"}, {"/a/b", "/a/b"},
	} {
		l, err := New(tt.in)
		if err != nil || l.Prefix() != tt.want {
			t.Errorf("New(%q) = %q, %v; want %q", tt.in, l.Prefix(), err, tt.want)
		}
	}
	for _, bad := range []string{"", "/", "/a//b"} {
		if _, err := New(bad); err == nil {
			t.Errorf("New(%q): want an error", bad)
		}
	}
	l, _ := New("/custom")
	if got, want := l.Key("secrets", "ns", "a"), "/custom/secrets/ns/a"; got != want {
		t.Errorf("Key = %q, want %q", got, want)
	}
	if got, want := l.Key("namespaces", "", "kube-system"), "/custom/namespaces/kube-system"; got != want {
		t.Errorf("Key = %q, want %q", got, want)
	}
	if got, want := l.TopSegment("/custom/example.com/widgets/x"), "example.com"; got != want {
		t.Errorf("TopSegment = %q, want %q", got, want)
	}
	if got := Default().TopSegment("/custom/secrets/x"); got != "" {
		t.Errorf("TopSegment of a key under another prefix = %q, want empty", got)
	}
}

func TestParseKey(t *testing.T) {
	tests := []struct {
		name     string
		key, res string
		want     ObjectKey
		wantErr  bool
	}{
		{"namespaced", "/registry/secrets/ns/a", "secrets", ObjectKey{"secrets", "ns", "a"}, false},
		{"cluster scoped", "/registry/apiextensions.k8s.io/customresourcedefinitions/x", "apiextensions.k8s.io/customresourcedefinitions", ObjectKey{"apiextensions.k8s.io/customresourcedefinitions", "", "x"}, false},
		{"other resource", "/registry/configmaps/ns/a", "secrets", ObjectKey{}, true},
		{"too deep", "/registry/secrets/a/b/c", "secrets", ObjectKey{}, true},
		{"empty name", "/registry/secrets/ns/", "secrets", ObjectKey{}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Default().ParseKey(tt.key, tt.res)
			if (err != nil) != tt.wantErr || got != tt.want {
				t.Fatalf("ParseKey = %+v, %v; want %+v, error %v", got, err, tt.want, tt.wantErr)
			}
		})
	}
}

// FuzzDecode: etcd bytes are untrusted input to the census; any value must
// classify without a panic, and a kmsv2 result must carry a keyID.
func FuzzDecode(f *testing.F) {
	f.Add(kmsValue(f, "kms", &kmstypes.EncryptedObject{KeyID: "file:ks/1", EncryptedDEKSource: []byte{1}, EncryptedData: []byte{2}}))
	f.Add([]byte("k8s\x00"))
	f.Add([]byte(KMSv2Prefix))
	f.Add([]byte("k8s:enc:aescbc:v1:k:"))
	f.Fuzz(func(t *testing.T, value []byte) {
		got := Decode(value)
		if got.Encoding == EncodingKMSv2 && (got.KeyID == "" || got.Provider == "") {
			t.Fatalf("kmsv2 value without keyID or provider: %+v", got)
		}
		if got.Encoding == EncodingOther && (got.Kind == "" || got.Provider == "") {
			t.Fatalf("other value without kind or provider: %+v", got)
		}
	})
}
