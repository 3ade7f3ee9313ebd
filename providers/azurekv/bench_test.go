package azurekv

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kms-v2/kms-plugin/e2e/keyvault-emulator/emulator"
	"github.com/kms-v2/kms-plugin/providers"
	"github.com/kms-v2/kms-plugin/providers/providertest"
)

// BenchmarkDecryptStorm replays what an apiserver restart does to the
// plugin: 10,000 Decrypts over 100 distinct seeds from 50 concurrent
// readers, against a vault that answers in 20 ms. It reports the unwrap
// calls that reached the vault and the wall time per storm, with
// coalescing and the unwrap cache on (the default) and off.
//
//	go test -run '^$' -bench DecryptStorm -benchtime 1x ./providers/azurekv
func BenchmarkDecryptStorm(b *testing.B) {
	const (
		decrypts = 10_000
		seeds    = 100
		workers  = 50
		latency  = 20 * time.Millisecond
	)
	for _, tc := range []struct {
		name     string
		cache    *UnwrapCache
		coalesce bool
	}{
		{"coalesce+cache", nil, true},
		{"coalesce-only", &UnwrapCache{Size: 0}, true},
		{"neither", &UnwrapCache{Size: 0}, false},
	} {
		b.Run(tc.name, func(b *testing.B) {
			e := startEmulator(b, emulator.Options{})
			cfg := testConfig(b, e)
			cfg.UnwrapCache = tc.cache
			cfg.disableCoalescing = !tc.coalesce
			p := newProvider(b, e, cfg)
			sealed := make([]providers.Sealed, seeds)
			for i := range sealed {
				s, err := p.Encrypt(context.Background(), providertest.Seed(b))
				if err != nil {
					b.Fatal(err)
				}
				sealed[i] = s
			}
			e.SetLatency(latency)
			var unwraps int64
			var wall time.Duration
			b.ResetTimer()
			for n := 0; n < b.N; n++ {
				p.unwrapper.Purge()
				e.ResetCounts()
				var next atomic.Int64
				var failed atomic.Int64
				var wg sync.WaitGroup
				start := time.Now()
				for w := 0; w < workers; w++ {
					wg.Add(1)
					go func() {
						defer wg.Done()
						for {
							i := next.Add(1) - 1
							if i >= decrypts {
								return
							}
							ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
							if _, err := p.Decrypt(ctx, sealed[i%seeds]); err != nil {
								failed.Add(1)
							}
							cancel()
						}
					}()
				}
				wg.Wait()
				wall += time.Since(start)
				unwraps += e.Counts().Unwrap
				if f := failed.Load(); f > 0 {
					b.Fatalf("%d of %d Decrypts failed", f, decrypts)
				}
			}
			b.ReportMetric(float64(unwraps)/float64(b.N), "unwraps/storm")
			b.ReportMetric(wall.Seconds()/float64(b.N), "s/storm")
			b.Logf("%s: %d Decrypts over %d seeds, %d workers, %s vault latency: %.0f unwrap calls, %s per storm",
				tc.name, decrypts, seeds, workers, latency, float64(unwraps)/float64(b.N), (wall / time.Duration(b.N)).Round(time.Millisecond))
		})
	}
}
