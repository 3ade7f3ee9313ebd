package etcdlayout

import "fmt"

// Writer is how an apiserver writes one resource now: what its
// EncryptionConfiguration's first provider for that resource produces. The
// apiserver itself judges a stored value stale (and rewrites it on a no-op
// update) exactly when the value is not what Writer would write: another
// provider kind or name, plaintext, or, for KMS v2, another key_id.
type Writer struct {
	// Encoding is EncodingKMSv2, EncodingOther or EncodingPlain (identity).
	Encoding Encoding `json:"encoding"`
	// Kind and Provider name the provider ("kms:v2" and its name).
	Kind     string `json:"kind,omitempty"`
	Provider string `json:"provider,omitempty"`
	// KeyID is the KMS v2 key_id the plugin's Status reports.
	KeyID string `json:"keyID,omitempty"`
}

// KMSv2Writer is a KMS v2 provider named provider writing under keyID.
func KMSv2Writer(provider, keyID string) Writer {
	return Writer{Encoding: EncodingKMSv2, Kind: "kms:v2", Provider: provider, KeyID: keyID}
}

// WriterOf is the writer that produced v. For a KMS v2 value it is the
// writer the apiserver had when it wrote it.
func WriterOf(v Value) Writer {
	w := Writer{Encoding: v.Encoding, Kind: v.Kind, Provider: v.Provider}
	if v.Encoding == EncodingKMSv2 {
		w.KeyID = v.KeyID
	}
	return w
}

// Current says whether v is stored the way w writes: such a value is not
// stale, and a no-op update leaves it alone.
func (w Writer) Current(v Value) bool {
	switch w.Encoding {
	case EncodingPlain:
		return v.Encoding == EncodingPlain
	case EncodingKMSv2:
		return v.Encoding == EncodingKMSv2 && v.Provider == w.Provider && v.KeyID == w.KeyID
	case EncodingOther:
		return v.Encoding == EncodingOther && v.Kind == w.Kind && v.Provider == w.Provider
	}
	return false
}

// String names the writer in messages: "kms:v2 provider p, key_id k".
func (w Writer) String() string {
	switch w.Encoding {
	case EncodingPlain:
		return "plaintext (identity)"
	case EncodingKMSv2:
		return fmt.Sprintf("kms:v2 provider %q, key_id %s", w.Provider, w.KeyID)
	case EncodingOther:
		return fmt.Sprintf("%s provider %q", w.Kind, w.Provider)
	}
	return string(w.Encoding)
}
