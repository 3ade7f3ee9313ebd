package rotation

import (
	"testing"

	"google.golang.org/protobuf/proto"
	kmstypes "k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2/v2"
)

func storedKMSValue(t testing.TB, provider string, obj *kmstypes.EncryptedObject) []byte {
	t.Helper()
	b, err := proto.Marshal(obj)
	if err != nil {
		t.Fatal(err)
	}
	return append([]byte(KMSv2Prefix+provider+":"), b...)
}

func TestDecodeStoredValue(t *testing.T) {
	good := &kmstypes.EncryptedObject{KeyID: "file:ks/1", EncryptedDEKSource: []byte{1}, EncryptedData: []byte{2}, Annotations: map[string][]byte{"a.io": []byte("x")}}
	tests := []struct {
		name         string
		value        []byte
		wantEncoding Encoding
		wantProvider string
		wantKeyID    string
	}{
		{"kms v2", storedKMSValue(t, "kms-e2e", good), EncodingKMSv2, "kms-e2e", "file:ks/1"},
		{"identity protobuf", []byte("k8s\x00\x0a\x0bv1"), EncodingPlain, "", ""},
		{"identity json", []byte(`{"kind":"Secret"}`), EncodingPlain, "", ""},
		{"aescbc", []byte("k8s:enc:aescbc:v1:key1:xxxx"), EncodingOther, "", ""},
		{"kms v1", []byte("k8s:enc:kms:v1:old:xxxx"), EncodingOther, "", ""},
		{"no provider name", []byte(KMSv2Prefix + "noseparator"), EncodingUndecodable, "", ""},
		{"garbage envelope", append([]byte(KMSv2Prefix+"p:"), 0xff, 0xff, 0xff), EncodingUndecodable, "p", ""},
		{"envelope without keyID", storedKMSValue(t, "p", &kmstypes.EncryptedObject{EncryptedDEKSource: []byte{1}, EncryptedData: []byte{2}}), EncodingUndecodable, "p", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := DecodeStoredValue(tt.value)
			if got.Encoding != tt.wantEncoding || got.Provider != tt.wantProvider || got.KeyID != tt.wantKeyID {
				t.Fatalf("DecodeStoredValue = %+v, want encoding %s provider %q keyID %q", got, tt.wantEncoding, tt.wantProvider, tt.wantKeyID)
			}
			if (got.Encoding == EncodingUndecodable) != (got.Err != nil) {
				t.Fatalf("Err = %v for encoding %s", got.Err, got.Encoding)
			}
		})
	}
}

func TestParseObjectKey(t *testing.T) {
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
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseObjectKey(tt.key, tt.res)
			if (err != nil) != tt.wantErr || got != tt.want {
				t.Fatalf("ParseObjectKey = %+v, %v; want %+v, error %v", got, err, tt.want, tt.wantErr)
			}
		})
	}
}

// FuzzDecodeStoredValue: etcd bytes are untrusted input to the census; any
// value must classify without a panic, and a kmsv2 result must carry a keyID.
func FuzzDecodeStoredValue(f *testing.F) {
	f.Add(storedKMSValue(f, "kms", &kmstypes.EncryptedObject{KeyID: "file:ks/1", EncryptedDEKSource: []byte{1}, EncryptedData: []byte{2}}))
	f.Add([]byte("k8s\x00"))
	f.Add([]byte(KMSv2Prefix))
	f.Fuzz(func(t *testing.T, value []byte) {
		got := DecodeStoredValue(value)
		if got.Encoding == EncodingKMSv2 && (got.KeyID == "" || got.Provider == "") {
			t.Fatalf("kmsv2 value without keyID or provider: %+v", got)
		}
	})
}
