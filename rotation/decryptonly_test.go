package rotation

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/kms-v2/kms-plugin/providers"
)

// oldProvider is a decrypt-only provider whose key_ids start "old:":
// version 1 its primary, version 2 an enabled leftover.
func oldProvider() (DecryptOnly, *fakeRotator) {
	r := &fakeRotator{versions: []providers.KeyVersion{
		{KeyID: "old:v/1", State: providers.StatePrimary},
		{KeyID: "old:v/2", State: providers.StateEnabled},
	}}
	return DecryptOnly{Name: "old", Owns: func(id string) bool { return strings.HasPrefix(id, "old:") }, Rotator: r}, r
}

func TestRunRetiresAnEmptiedDecryptOnlyProvider(t *testing.T) {
	c := newCluster(t, time.Hour, 10, 0)
	seed(t, c.etcd, "configmaps", "old:v/1", 7)
	old, oldRot := oldProvider()
	rot := c.rotation(t)
	rot.DecryptOnly = []DecryptOnly{old}
	o := opts(t, "secrets", "configmaps")
	o.Retire = true
	rep, err := rot.Run(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	if got := c.census(t, "file:k/1", "secrets", "configmaps").Stale(); got != 0 {
		t.Errorf("stale after: %d, want 0", got)
	}
	want := DecryptOnlyReport{Provider: "old", Objects: 0, Disabled: []string{"old:v/2"}, Removable: true}
	if len(rep.DecryptOnly) != 1 || !equalReport(rep.DecryptOnly[0], want) {
		t.Fatalf("decrypt-only report: got %+v, want %+v", rep.DecryptOnly, want)
	}
	if got := oldRot.state("old:v/2"); got != providers.StateDisabled {
		t.Errorf("old:v/2 is %s, want disabled", got)
	}
	if got := oldRot.state("old:v/1"); got != providers.StatePrimary {
		t.Errorf("old:v/1 is %s, want it left primary", got)
	}
}

func TestRunKeepsADecryptOnlyProviderThatStillProtectsObjects(t *testing.T) {
	c := newCluster(t, time.Hour, 10, 0)
	// Not among the rotated resources, so never rewritten: the scan of
	// everything under the prefix must still find it.
	seed(t, c.etcd, "leases", "old:v/1", 3)
	old, oldRot := oldProvider()
	rot := c.rotation(t)
	rot.DecryptOnly = []DecryptOnly{old}
	o := opts(t, "secrets")
	o.Retire = true
	rep, err := rot.Run(context.Background(), o)
	if !errors.Is(err, ErrRetireRefused) {
		t.Fatalf("err: got %v, want ErrRetireRefused", err)
	}
	if len(rep.DecryptOnly) != 1 || rep.DecryptOnly[0].Objects != 3 || rep.DecryptOnly[0].Removable {
		t.Fatalf("decrypt-only report: got %+v, want 3 objects, not removable", rep.DecryptOnly)
	}
	if got := oldRot.state("old:v/2"); got != providers.StateEnabled {
		t.Errorf("old:v/2 is %s, want enabled", got)
	}
}

func equalReport(a, b DecryptOnlyReport) bool {
	return a.Provider == b.Provider && a.Objects == b.Objects && a.Removable == b.Removable &&
		strings.Join(a.Disabled, ",") == strings.Join(b.Disabled, ",")
}

func TestRunRefusesPerNodeKeysItCannotDistribute(t *testing.T) {
	for _, tt := range []struct {
		name        string
		distributed bool
		wantErr     error
	}{
		{name: "refused without --keyset-distributed", wantErr: ErrNotDistributed},
		{name: "rotates with --keyset-distributed", distributed: true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c := newCluster(t, time.Hour, 10, 0)
			before := objectRevisions(c.etcd)
			o := opts(t, "secrets")
			o.Force, o.Scope, o.KeysetDistributed = true, providers.ScopePerNode, tt.distributed
			// No apiserver can be listed one by one: their number is unknown.
			_, err := c.rotation(t).Run(context.Background(), o)
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("err: got %v, want %v", err, tt.wantErr)
			}
			if tt.wantErr == nil {
				return
			}
			if !strings.Contains(err.Error(), "--keyset-distributed") || c.rot.created != 0 {
				t.Errorf("refusal %q, %d versions created; want the fix named and none created", err, c.rot.created)
			}
			after := objectRevisions(c.etcd)
			for k, rev := range before {
				if after[k] != rev {
					t.Errorf("%s rewritten (rev %d -> %d) after a refusal", k, rev, after[k])
				}
			}
		})
	}
}
