//go:build e2e

package e2e

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/kms-v2/kms-plugin/e2e/harness"
)

// testEtcdTLS: etcd serves TLS and demands a client certificate, as
// kubeadm sets it up, and kmsctl is given the wrong TLS flags in the ways
// an operator gets them wrong. Each run must exit non-zero within 15 s,
// with a last line that names the etcd and the flag that fixes it, not a
// bare "context deadline exceeded".
func testEtcdTLS(ctx context.Context, t *testing.T, c *harness.Cluster) {
	good := censusArgs(c, "--resources", "secrets")
	otherCA := c.APIServers[0].ServingCert()
	plain := "http://" + strings.TrimPrefix(c.Etcd.Endpoint, "https://")
	cases := []struct {
		name string
		args []string
		// want are what the last line must name besides the endpoint.
		want     []string
		endpoint string
	}{
		{"NoClientCertificate", withoutFlags(good, "--etcd-cert", "--etcd-key"), []string{"--etcd-cert", "--etcd-key"}, c.Etcd.Endpoint},
		{"UnknownCA", withFlag(good, "--etcd-cacert", otherCA), []string{"--etcd-cacert"}, c.Etcd.Endpoint},
		{"NoCA", withoutFlags(good, "--etcd-cacert"), []string{"--etcd-cacert"}, c.Etcd.Endpoint},
		{"PlainHTTP", withFlag(good, "--etcd-endpoints", plain), []string{"https://"}, plain},
		{"CertWithoutKey", withoutFlags(good, "--etcd-key"), []string{"--etcd-cert", "--etcd-key"}, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			runCtx, cancel := context.WithTimeout(ctx, 90*time.Second)
			defer cancel()
			start := time.Now()
			r := runKmsctl(runCtx, t, c, tc.args...)
			took := time.Since(start)
			line := lastLine(r.stderr)
			t.Logf("exit %d in %s: %s", r.code, took.Round(time.Millisecond), line)
			if r.code == 0 || r.killed {
				t.Fatalf("census: exit %d (killed %v), want a non-zero exit\nstderr:\n%s", r.code, r.killed, r.stderr)
			}
			if took >= 15*time.Second {
				t.Errorf("took %s, want under 15s", took.Round(time.Millisecond))
			}
			for _, w := range append(tc.want, tc.endpoint) {
				if !strings.Contains(line, w) {
					t.Errorf("last stderr line does not name %q: %s", w, line)
				}
			}
			if strings.Count(strings.TrimSpace(r.stderr), "\n") > 0 && !strings.HasPrefix(line, "kmsctl") {
				t.Errorf("want one error line, got:\n%s", r.stderr)
			}
		})
	}
	// The same flags, right, work: the cases above failed for their flag.
	if r := runKmsctl(ctx, t, c, good...); r.code != 0 {
		t.Errorf("census with the right TLS flags: exit %d\n%s", r.code, r.stderr)
	}
}

// withoutFlags drops each named flag and its value from args.
func withoutFlags(args []string, flags ...string) []string {
	out := make([]string, 0, len(args))
	for i := 0; i < len(args); i++ {
		name, _, hasValue := strings.Cut(args[i], "=")
		if !slices.Contains(flags, name) {
			out = append(out, args[i])
			continue
		}
		if !hasValue {
			i++ // the value is the next argument
		}
	}
	return out
}
