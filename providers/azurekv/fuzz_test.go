package azurekv

import (
	"strings"
	"testing"

	"github.com/kms-v2/kms-plugin/providers"
)

// FuzzParseKeyID: a key_id reaches Decrypt from etcd through the apiserver.
// Any key_id parses without a panic; one this vault and key accept names a
// version that formats back to the same key_id (up to the host's case); and
// every version that a key_id can carry round-trips through formatKeyID.
func FuzzParseKeyID(f *testing.F) {
	const host, keyName = "myvault.vault.azure.net", "k8s-kek"
	p := &Provider{cfg: Config{KeyName: keyName}, host: host}
	f.Add("azurekv:myvault.vault.azure.net/k8s-kek/0123456789abcdef0123456789abcdef", "0123abcd")
	f.Add("azurekv:MYVAULT.vault.azure.net/k8s-kek/v1", "v1")
	f.Add("azurekv:other.vault.azure.net/k8s-kek/v1", "")
	f.Add("azurekv:myvault.vault.azure.net/k8s-kek/", "a/b")
	f.Add("azurekv:myvault.vault.azure.net/k8s-kek/v/x", "v x")
	f.Add("file:ks/1", "\x00")
	f.Add("", strings.Repeat("a", providers.MaxKeyIDSize))
	f.Fuzz(func(t *testing.T, keyID, ver string) {
		got, err := p.parseKeyID(keyID)
		if owns := p.Owns(keyID); owns != (err == nil) {
			t.Fatalf("Owns(%q) = %v, parseKeyID error %v", keyID, owns, err)
		}
		if err == nil {
			back := formatKeyID(host, keyName, got)
			if !strings.EqualFold(back, keyID) || back[len(back)-len(got):] != keyID[len(keyID)-len(got):] {
				t.Fatalf("parseKeyID(%q) = %q, which formats to %q", keyID, got, back)
			}
			if got == "" || strings.Contains(got, "/") {
				t.Fatalf("parseKeyID(%q) = version %q", keyID, got)
			}
		}
		// A version as Key Vault names it (printable, no "/") round-trips.
		id := formatKeyID(host, keyName, ver)
		v, err := p.parseKeyID(id)
		_, perr := providers.ParseKeyID(id)
		valid := ver != "" && !strings.Contains(ver, "/") && perr == nil
		if valid != (err == nil) || (valid && v != ver) {
			t.Fatalf("version %q: key_id %q parses to %q, %v", ver, id, v, err)
		}
	})
}
