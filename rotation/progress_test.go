package rotation

import (
	"strings"
	"testing"
	"time"
)

// The limiter's figures describe our own engine only: a phase another
// engine runs (StorageVersionMigration) must not show them.
func TestProgressShowsTheLimiterOnlyWhenItPaces(t *testing.T) {
	for _, paced := range []bool{true, false} {
		var out strings.Builder
		p := NewProgress(&out, time.Hour, NewLimiter(LimiterConfig{Max: 4}))
		p.BeginPaced("rewrite secrets (pass 1)", 10, paced)
		p.Done(10)
		p.End()
		if got := strings.Contains(out.String(), "concurrency"); got != paced {
			t.Errorf("paced %v: line %q shows the limiter: %v", paced, out.String(), got)
		}
	}
}
