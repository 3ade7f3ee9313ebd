package etcdlayout

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
	// encPrefix starts every encrypted value: k8s:enc:<kind>:<version>:<name>:.
	encPrefix = "k8s:enc:"
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
	// EncodingUndecodable is an encrypted value whose envelope does not
	// parse: nothing can tell which key protects it.
	EncodingUndecodable Encoding = "undecodable"
)

// Value is what a read-only look at one etcd value tells: never the
// object's data, only how it is protected.
type Value struct {
	Encoding Encoding
	// Kind is the provider kind of an encrypted value: "kms:v2",
	// "aescbc:v1", "aesgcm:v1", "secretbox:v1", "kms:v1".
	Kind string
	// Provider is the EncryptionConfiguration provider name (or, for
	// aescbc/aesgcm/secretbox, the key name) that wrote the value.
	Provider string
	// KeyID is the plugin key_id that wrapped the object's seed (KMS v2 only).
	KeyID string
	// Annotations are the plugin's annotations, stored in plaintext.
	Annotations map[string][]byte
	// Err says why an EncodingUndecodable value did not parse.
	Err error
}

// Decode classifies one etcd value as kube-apiserver wrote it. It never
// fails: a value it cannot parse is reported as EncodingUndecodable with the
// reason, so a census counts it instead of stopping.
func Decode(value []byte) Value {
	switch {
	case bytes.HasPrefix(value, []byte(KMSv2Prefix)):
		return decodeKMSv2(value[len(KMSv2Prefix):])
	case bytes.HasPrefix(value, []byte(encPrefix)):
		return decodeOther(value[len(encPrefix):])
	}
	// k8s\x00 protobuf, JSON, or anything else the apiserver reads as an
	// unencrypted object.
	return Value{Encoding: EncodingPlain}
}

func decodeKMSv2(rest []byte) Value {
	i := bytes.IndexByte(rest, ':')
	if i <= 0 {
		return Value{Encoding: EncodingUndecodable, Kind: "kms:v2", Err: fmt.Errorf("no provider name after %q", KMSv2Prefix)}
	}
	out := Value{Kind: "kms:v2", Provider: string(rest[:i])}
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

// decodeOther reads "<kind>:<version>:<name>:" of aescbc, aesgcm, secretbox
// and KMS v1 values.
func decodeOther(rest []byte) Value {
	parts := strings.SplitN(string(rest[:min(len(rest), 512)]), ":", 4)
	if len(parts) < 4 || parts[0] == "" || parts[1] == "" || parts[2] == "" {
		return Value{Encoding: EncodingUndecodable, Err: fmt.Errorf("no <kind>:<version>:<name>: after %q", encPrefix)}
	}
	return Value{Encoding: EncodingOther, Kind: parts[0] + ":" + parts[1], Provider: parts[2]}
}

// DEKSource returns the encryptedDEKSource of a KMS v2 value (the plugin's
// ciphertext of the apiserver's seed), or nil for any other value. Tests use
// it to tell which objects share one seed.
func DEKSource(value []byte) []byte {
	rest, ok := bytes.CutPrefix(value, []byte(KMSv2Prefix))
	if !ok {
		return nil
	}
	i := bytes.IndexByte(rest, ':')
	var obj kmstypes.EncryptedObject
	if i < 0 || proto.Unmarshal(rest[i+1:], &obj) != nil {
		return nil
	}
	return obj.GetEncryptedDEKSource()
}
