package main

import (
	"strings"
	"testing"

	"github.com/spf13/pflag"

	"github.com/kms-v2/kms-plugin/rotation"
)

// FuzzResourcesFlag: --resources as the operator types it, through the
// real flag (pflag's comma-separated, CSV-quoted list) and validate. Any
// value is accepted or refused without a panic; an accepted list names each
// resource once, and each parses again from its own name to itself.
func FuzzResourcesFlag(f *testing.F) {
	for _, s := range []string{
		"secrets", "secrets,configmaps", `"widgets.v1.example.com",secrets`, "secrets,,configmaps",
		"widgets.v1.x/y", `"a,b.v1.g"`, " secrets ", `"`, "",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, value string) {
		var cf clusterFlags
		fs := pflag.NewFlagSet("kmsctl", pflag.ContinueOnError)
		fs.SetOutput(nil)
		cf.register(fs, "rotate")
		if err := fs.Parse([]string{"--resources=" + value, "--etcd-endpoints=http://127.0.0.1:1"}); err != nil {
			return
		}
		if err := cf.validate(); err != nil {
			return
		}
		if len(cf.resources) == 0 {
			return // the default applies
		}
		rs, err := rotation.ParseResources(cf.resources)
		if err != nil {
			t.Fatalf("--resources=%q passed validate but does not parse: %v", value, err)
		}
		seen := map[string]bool{}
		for _, r := range rs {
			if seen[r.Path] {
				t.Fatalf("--resources=%q: %s twice", value, r.Path)
			}
			seen[r.Path] = true
			if again, err := rotation.ParseResource(r.Name); err != nil || again != r {
				t.Fatalf("--resources=%q: %q parses to %+v, %v; want %+v", value, r.Name, again, err, r)
			}
			if strings.ContainsAny(r.Name, ",\"") && r.GVR.Group == "" {
				t.Fatalf("--resources=%q: a core resource named %q", value, r.Name)
			}
		}
	})
}
