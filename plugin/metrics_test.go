package plugin

import (
	"crypto/fips140"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// TestFIPS140Gauge: kms_plugin_fips140_enabled is registered and follows
// crypto/fips140.Enabled (make test-fips runs this under fips140=only,
// where it must read 1; make unit without it, where it must read 0).
func TestFIPS140Gauge(t *testing.T) {
	reg := prometheus.NewRegistry()
	NewMetrics(reg)
	want := "0"
	if fips140.Enabled() {
		want = "1"
	}
	exp := `# HELP kms_plugin_fips140_enabled 1 when the Go cryptography runs in FIPS 140-3 mode (crypto/fips140.Enabled: GODEBUG fips140=on or only, the default in a GOFIPS140 build), else 0.
# TYPE kms_plugin_fips140_enabled gauge
kms_plugin_fips140_enabled ` + want + "\n"
	if err := testutil.GatherAndCompare(reg, strings.NewReader(exp), "kms_plugin_fips140_enabled"); err != nil {
		t.Fatal(err)
	}
	t.Logf("fips140.Enabled() = %v", fips140.Enabled())
}
