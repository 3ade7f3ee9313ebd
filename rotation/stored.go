package rotation

import (
	"bytes"
	"fmt"
	"strings"

	"google.golang.org/protobuf/proto"
	kmstypes "k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2/v2"
)

// Prefixes kube-apiserver puts in front of stored values.
const (
	// KMSv2Prefix starts every value written by a KMS v2 provider; the
	// provider name and a ":" follow, then a protobuf EncryptedObject.
	KMSv2Prefix = "k8s:enc:kms:v2:"
	// identityPrefix starts an unencrypted protobuf-serialized object.
	identityPrefix = "k8s\x00"
)

// Encoding says how one stored value is protected.
type Encoding string

// Encodings of a stored value.
const (
	// EncodingKMSv2 is a value encrypted through a KMS v2 plugin.
	EncodingKMSv2 Encoding = "kmsv2"
	// EncodingPlain is an unencrypted value (identity provider, or a resource
	// that is not configured for encryption).
	EncodingPlain Encoding = "plain"
	// EncodingOther is another encryption provider (aescbc, aesgcm,
	// secretbox, KMS v1): encrypted, but not by a KMS v2 plugin.
	EncodingOther Encoding = "other"
	// EncodingUndecodable is a KMS v2 value whose envelope does not parse.
	EncodingUndecodable Encoding = "undecodable"
)

// StoredValue is what a read-only look at one etcd value tells: never the
// object's data, only how it is protected.
type StoredValue struct {
	Encoding Encoding
	// Provider is the EncryptionConfiguration provider name (KMS v2 only).
	Provider string
	// KeyID is the plugin key_id that wrapped the object's seed (KMS v2 only).
	KeyID string
	// Annotations are the plugin's annotations, stored in plaintext.
	Annotations map[string][]byte
	// Err says why an EncodingUndecodable value did not parse.
	Err error
}

// DecodeStoredValue classifies one etcd value as kube-apiserver wrote it. It
// never fails: a value it cannot parse is reported as EncodingUndecodable
// with the reason, so a census counts it instead of stopping.
func DecodeStoredValue(value []byte) StoredValue {
	switch {
	case bytes.HasPrefix(value, []byte(KMSv2Prefix)):
	case bytes.HasPrefix(value, []byte(identityPrefix)), len(value) > 0 && value[0] == '{':
		return StoredValue{Encoding: EncodingPlain}
	case bytes.HasPrefix(value, []byte("k8s:enc:")):
		return StoredValue{Encoding: EncodingOther}
	default:
		return StoredValue{Encoding: EncodingPlain}
	}
	rest := value[len(KMSv2Prefix):]
	i := bytes.IndexByte(rest, ':')
	if i <= 0 {
		return StoredValue{Encoding: EncodingUndecodable, Err: fmt.Errorf("no provider name after %q", KMSv2Prefix)}
	}
	out := StoredValue{Provider: string(rest[:i])}
	var obj kmstypes.EncryptedObject
	if err := proto.Unmarshal(rest[i+1:], &obj); err != nil {
		out.Encoding, out.Err = EncodingUndecodable, fmt.Errorf("EncryptedObject: %w", err)
		return out
	}
	if obj.GetKeyID() == "" || len(obj.GetEncryptedDEKSource()) == 0 || len(obj.GetEncryptedData()) == 0 {
		out.Encoding, out.Err = EncodingUndecodable, fmt.Errorf("EncryptedObject lacks keyID, encryptedDEKSource or encryptedData")
		return out
	}
	out.Encoding, out.KeyID, out.Annotations = EncodingKMSv2, obj.GetKeyID(), obj.GetAnnotations()
	return out
}

// ObjectKey is an etcd key under /registry split into its parts.
type ObjectKey struct {
	// Resource is "secrets", "configmaps", or "<group>/<resource>" for
	// resources outside the core group, as the etcd key spells it.
	Resource  string
	Namespace string
	Name      string
}

// ParseObjectKey splits "/registry/secrets/ns/name",
// "/registry/<group>/<resource>/ns/name" and cluster-scoped forms. The
// caller says which resource it scanned (knownResource, as under /registry),
// since the key alone cannot tell a group from a namespace.
func ParseObjectKey(key, knownResource string) (ObjectKey, error) {
	prefix := "/registry/" + knownResource + "/"
	if !strings.HasPrefix(key, prefix) {
		return ObjectKey{}, fmt.Errorf("etcd key %q is not under %s", key, prefix)
	}
	rest := strings.Split(strings.TrimPrefix(key, prefix), "/")
	switch len(rest) {
	case 1:
		return ObjectKey{Resource: knownResource, Name: rest[0]}, nil
	case 2:
		return ObjectKey{Resource: knownResource, Namespace: rest[0], Name: rest[1]}, nil
	}
	return ObjectKey{}, fmt.Errorf("etcd key %q has an unexpected shape", key)
}
