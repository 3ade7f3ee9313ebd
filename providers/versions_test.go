package providers

import (
	"slices"
	"testing"
	"time"
)

func TestListVersions(t *testing.T) {
	type ver struct {
		id      string
		enabled bool
	}
	t0 := time.Unix(1000, 0)
	a, b, c := &ver{"k:a", true}, &ver{"k:b", false}, &ver{"k:c", true}
	describe := func(v *ver) (string, bool, time.Time) { return v.id, v.enabled, t0 }
	got := ListVersions([]*ver{a, b, c}, c, describe)
	want := []KeyVersion{
		{KeyID: "k:a", State: StateEnabled, Created: t0},
		{KeyID: "k:b", State: StateDisabled, Created: t0},
		{KeyID: "k:c", State: StatePrimary, Created: t0},
	}
	if !slices.Equal(got, want) {
		t.Fatalf("ListVersions = %v, want %v (order kept, primary wins over enabled)", got, want)
	}
}

func TestStateOf(t *testing.T) {
	tests := []struct {
		name             string
		primary, enabled bool
		want             KeyState
	}{
		{"Primary", true, true, StatePrimary},
		{"Enabled", false, true, StateEnabled},
		{"Disabled", false, false, StateDisabled},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := StateOf(tt.primary, tt.enabled); got != tt.want {
				t.Fatalf("StateOf(%v, %v) = %s, want %s", tt.primary, tt.enabled, got, tt.want)
			}
		})
	}
}
