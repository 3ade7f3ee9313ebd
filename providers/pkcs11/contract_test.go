//go:build cgo

package pkcs11

import (
	"testing"

	"github.com/kms-v2/kms-plugin/plugin/plugintest"
)

// TestPluginContract serves the SoftHSM-backed provider through the real
// plugin on a socket and checks it with kube-apiserver's own KMS v2 client.
func TestPluginContract(t *testing.T) {
	p, _ := newInitialized(t)
	plugintest.Contract(t, p)
}
