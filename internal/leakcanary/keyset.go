package leakcanary

import (
	"encoding/base64"
	"encoding/json"
	"fmt"

	gcmpb "github.com/tink-crypto/tink-go/v2/proto/aes_gcm_go_proto"
	"google.golang.org/protobuf/proto"
)

// RegisterKeyset registers the key material of a kms-plugin keyset file
// (the file provider's: a Tink keyset in JSON under "keyset"): each key's
// serialized key data and its AES key. It returns how many keys it found.
func (c *Canary) RegisterKeyset(label string, file []byte) (int, error) {
	var doc struct {
		Keyset struct {
			Key []struct {
				KeyID   uint32 `json:"keyId"`
				KeyData struct {
					Value string `json:"value"`
				} `json:"keyData"`
			} `json:"key"`
		} `json:"keyset"`
	}
	if err := json.Unmarshal(file, &doc); err != nil {
		return 0, fmt.Errorf("keyset: %w", err)
	}
	for _, k := range doc.Keyset.Key {
		data, err := base64.StdEncoding.DecodeString(k.KeyData.Value)
		if err != nil {
			return 0, fmt.Errorf("keyset key %d: %w", k.KeyID, err)
		}
		name := fmt.Sprintf("%s key %d", label, k.KeyID)
		c.Register(name+" key data", data)
		var gk gcmpb.AesGcmKey
		if err := proto.Unmarshal(data, &gk); err != nil {
			return 0, fmt.Errorf("keyset key %d: %w", k.KeyID, err)
		}
		c.Register(name+" AES key", gk.GetKeyValue())
	}
	return len(doc.Keyset.Key), nil
}
