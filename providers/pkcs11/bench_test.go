//go:build cgo

package pkcs11

import (
	"context"
	"crypto/rand"
	"runtime"
	"strconv"
	"testing"

	"github.com/miekg/pkcs11"

	"github.com/kms-v2/kms-plugin/providers"
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
