package azurekv

import (
	"testing"

	"github.com/kms-v2/kms-plugin/e2e/keyvault-emulator/emulator"
	"github.com/kms-v2/kms-plugin/plugin/plugintest"
)

// TestKMSv2Contract serves the provider through the real plugin on a Unix
// socket and checks it with kube-apiserver's own KMS v2 client and envelope
// code, against the emulator through the real SDK.
func TestKMSv2Contract(t *testing.T) {
	e := startEmulator(t, emulator.Options{})
	plugintest.Contract(t, newProvider(t, e, testConfig(t, e)))
}
