//go:build cgo

package pkcs11

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/pkcs11"

	"github.com/kms-v2/kms-plugin/providers"
	"github.com/kms-v2/kms-plugin/providers/pkcs11/tpmtest"
	"github.com/kms-v2/kms-plugin/providers/providertest"
)

// parallel runs body from n goroutines (b.SetParallelism multiplies
// GOMAXPROCS, so round up).
func parallel(b *testing.B, n int, body func()) {
	if n == 1 {
		for i := 0; i < b.N; i++ {
			body()
		}
		return
	}
	procs := runtime.GOMAXPROCS(0)
	b.SetParallelism((n + procs - 1) / procs)
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			body()
		}
	})
}

// BenchmarkProviderRoundTrip is one Encrypt plus one Decrypt through the
// provider (session pool, framing, AAD), what one apiserver seed costs.
func BenchmarkProviderRoundTrip(b *testing.B) {
	for _, n := range []int{1, 16} {
		b.Run("goroutines="+strconv.Itoa(n), func(b *testing.B) {
			p, _ := newInitialized(b)
			ctx := context.Background()
			seed := make([]byte, providers.SeedSize)
			_, _ = rand.Read(seed)
			b.ResetTimer()
			parallel(b, n, func() {
				s, err := p.Encrypt(ctx, seed)
				if err != nil {
					b.Error(err)
					return
				}
				if _, err := p.Decrypt(ctx, s); err != nil {
					b.Error(err)
				}
			})
		})
	}
}

// BenchmarkTokenAESGCMEncrypt is the device's own limit: a bare
// C_EncryptInit + C_Encrypt of 32 bytes with the same key on the same token,
// one session per goroutine, no provider code. The IV is fixed: fine for
// timing, never for data.
func BenchmarkTokenAESGCMEncrypt(b *testing.B) {
	for _, n := range []int{1, 16} {
		b.Run("goroutines="+strconv.Itoa(n), func(b *testing.B) {
			p, _ := newInitialized(b)
			st, _ := p.current()
			key := st.primary.handle
			c := p.tok.mod.ctx
			p.tok.mu.Lock()
			slot := p.tok.slot
			p.tok.mu.Unlock()
			sessions := make(chan pkcs11.SessionHandle, n)
			for i := 0; i < n; i++ {
				h, err := c.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION)
				if err != nil {
					b.Fatal(err)
				}
				b.Cleanup(func() { _ = c.CloseSession(h) })
				sessions <- h
			}
			seed := make([]byte, providers.SeedSize)
			iv := make([]byte, ivSize)
			b.ResetTimer()
			parallel(b, n, func() {
				h := <-sessions
				defer func() { sessions <- h }()
				params := pkcs11.NewGCMParams(iv, []byte("aad"), tagSize*8)
				defer params.Free()
				if err := c.EncryptInit(h, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, params)}, key); err != nil {
					b.Error(err)
					return
				}
				if _, err := c.Encrypt(h, seed); err != nil {
					b.Error(err)
				}
			})
		})
	}
}

// BenchmarkTPMDecryptStorm replays apiserver restarts against a TPM
// (swtpm through tpm2-pkcs11, RSA-OAEP-256 with 2048-bit keys): 1,000
// Decrypts over 50 distinct seeds from 50 concurrent readers, each with
// the apiserver's 3 s deadline. Reads of one seed come together, ten in a
// row, as the resource lists of a restarting apiserver all begin with the
// few seeds most objects were written under; and the seeds are read twice
// over, as when two apiservers restart one after the other. It reports the
// unwraps that reached the token, the Decrypts that missed the deadline
// and the wall time per storm, with the unwrap cache and coalescing on
// (the default), coalescing only, and neither.
//
//	go test -run '^$' -bench TPMDecryptStorm -benchtime 1x ./providers/pkcs11/...
func BenchmarkTPMDecryptStorm(b *testing.B) {
	tp := tpmtest.Start(b, "")
	tp.SetEnv(b)
	for i, tc := range []struct {
		name     string
		cache    *UnwrapCache
		coalesce bool
	}{
		{"coalesce+cache", nil, true},
		{"coalesce-only", &UnwrapCache{Size: 0}, true},
		{"neither", &UnwrapCache{Size: 0}, false},
	} {
		b.Run(tc.name, func(b *testing.B) {
			cfg := tpmConfig(tp, "storm"+strconv.Itoa(i))
			cfg.UnwrapCache, cfg.disableCoalescing = tc.cache, !tc.coalesce
			stormBench(b, cfg)
		})
	}
}

// The storm's shape: what one apiserver restart asks of the plugin.
const (
	stormDecrypts = 1000
	stormSeeds    = 50
	stormRun      = 10 // consecutive Decrypts of one seed
	stormWorkers  = 50
	stormDeadline = 3 * time.Second // the apiserver's per-call timeout
)

func stormBench(b *testing.B, cfg Config) {
	if _, err := Init(testCtx(b), cfg, testLogger(b)); err != nil {
		b.Fatal(err)
	}
	p := mustNew(b, cfg)
	seeds, sealed := make([][]byte, stormSeeds), make([]providers.Sealed, stormSeeds)
	for i := range sealed {
		seeds[i] = providertest.Seed(b)
		s, err := p.Encrypt(context.Background(), seeds[i])
		if err != nil {
			b.Fatal(err)
		}
		sealed[i] = s
	}
	calls := counting(p)
	var failed int64
	var wall time.Duration
	b.ResetTimer()
	for n := 0; n < b.N; n++ {
		p.unwrapper.Purge()
		start := time.Now()
		failed += storm(b, p, seeds, sealed)
		wall += time.Since(start)
	}
	b.ReportMetric(float64(calls.Load())/float64(b.N), "unwraps/storm")
	b.ReportMetric(float64(failed)/float64(b.N), "failed/storm")
	b.ReportMetric(wall.Seconds()/float64(b.N), "s/storm")
	b.Logf("%d Decrypts over %d seeds, %d workers: %.0f token unwraps, %.0f failed (%s deadline), %s per storm",
		stormDecrypts, stormSeeds, stormWorkers, float64(calls.Load())/float64(b.N), float64(failed)/float64(b.N), stormDeadline,
		(wall / time.Duration(b.N)).Round(time.Millisecond))
}

// storm runs one storm and returns how many Decrypts missed the deadline;
// any other failure, or a wrong seed, stops the benchmark.
func storm(b *testing.B, p *Provider, seeds [][]byte, sealed []providers.Sealed) int64 {
	var next, failed atomic.Int64
	var wg sync.WaitGroup
	for range stormWorkers {
		wg.Go(func() {
			for i := next.Add(1) - 1; i < stormDecrypts; i = next.Add(1) - 1 {
				ctx, cancel := context.WithTimeout(context.Background(), stormDeadline)
				k := (i / stormRun) % stormSeeds
				got, err := p.Decrypt(ctx, sealed[k])
				cancel()
				switch {
				case errors.Is(err, context.DeadlineExceeded):
					failed.Add(1)
				case err != nil:
					b.Errorf("Decrypt: %v", err)
				case !bytes.Equal(got, seeds[k]):
					b.Errorf("Decrypt of seed %d returned another value", k)
				}
			}
		})
	}
	wg.Wait()
	return failed.Load()
}
