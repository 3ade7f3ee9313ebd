package socket

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc"
	"k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2"
	kmsapi "k8s.io/kms/apis/v2"
	kmsservice "k8s.io/kms/pkg/service"

	"github.com/kms-v2/kms-plugin/plugin"
	"github.com/kms-v2/kms-plugin/providers"
	"github.com/kms-v2/kms-plugin/providers/file"
	"github.com/kms-v2/kms-plugin/providers/multi"
	"github.com/kms-v2/kms-plugin/providers/pkcs11"
	"github.com/kms-v2/kms-plugin/providers/pkcs11/pkcs11test"
	"github.com/kms-v2/kms-plugin/providers/pkcs11/tpmtest"
)

// floorServer is the baseline: the KMS v2 service with nothing but the
// cipher. Whatever the plugin costs above it is validation, logging,
// metrics and the provider seam.
type floorServer struct {
	kmsapi.UnimplementedKeyManagementServiceServer
	aead cipher.AEAD
}

func (f *floorServer) Status(context.Context, *kmsapi.StatusRequest) (*kmsapi.StatusResponse, error) {
	return &kmsapi.StatusResponse{Version: "v2", Healthz: "ok", KeyId: "floor:1"}, nil
}

func (f *floorServer) Encrypt(_ context.Context, r *kmsapi.EncryptRequest) (*kmsapi.EncryptResponse, error) {
	return &kmsapi.EncryptResponse{KeyId: "floor:1", Ciphertext: f.aead.Seal(nil, nil, r.Plaintext, nil)}, nil
}

func (f *floorServer) Decrypt(_ context.Context, r *kmsapi.DecryptRequest) (*kmsapi.DecryptResponse, error) {
	pt, err := f.aead.Open(nil, nil, r.Ciphertext, nil)
	return &kmsapi.DecryptResponse{Plaintext: pt}, err
}

func socketPath(b *testing.B) string {
	dir, err := os.MkdirTemp("", "kmsb")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { os.RemoveAll(dir) })
	return filepath.Join(dir, "kms.sock")
}

func serveFloor(b *testing.B) string {
	key := make([]byte, 32)
	_, _ = rand.Read(key)
	block, _ := aes.NewCipher(key)
	a, err := cipher.NewGCMWithRandomNonce(block)
	if err != nil {
		b.Fatal(err)
	}
	sock := socketPath(b)
	ln, err := net.Listen("unix", sock)
	if err != nil {
		b.Fatal(err)
	}
	gs := grpc.NewServer()
	kmsapi.RegisterKeyManagementServiceServer(gs, &floorServer{aead: a})
	go gs.Serve(ln)
	b.Cleanup(gs.Stop)
	return sock
}

// servePlugin runs the real service (interceptors, validation, metrics) over p.
func servePlugin(b *testing.B, p providers.Provider) string {
	return servePluginEntries(b, multi.Entry{Name: "bench", Scope: providers.ScopeShared, Provider: p})
}

// servePluginEntries runs the real service over several providers; the
// first encrypts.
func servePluginEntries(b *testing.B, es ...multi.Entry) string {
	svc, err := plugin.New(plugin.Options{Entries: es, Logger: hclog.NewNullLogger(), Metrics: plugin.NewMetrics(nil), CheckInterval: time.Second, RefreshInterval: time.Second})
	if err != nil {
		b.Fatal(err)
	}
	sock := socketPath(b)
	ln, err := plugin.Listen(sock, "")
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	svc.Check(ctx)
	go svc.Run(ctx)
	gs := plugin.NewGRPCServer(svc)
	go gs.Serve(ln)
	b.Cleanup(func() { cancel(); gs.Stop() })
	return sock
}

func connect(b *testing.B, sock string) kmsservice.Service {
	ctx, cancel := context.WithCancel(context.Background())
	b.Cleanup(cancel)
	svc, err := kmsv2.NewGRPCService(ctx, "unix://"+sock, "bench", 3*time.Second)
	if err != nil {
		b.Fatal(err)
	}
	return svc
}

// result is one measured phase.
type result struct {
	ops  int
	dur  time.Duration
	lats []time.Duration
}

func (r *result) add(o result) {
	r.ops += o.ops
	r.dur += o.dur
	r.lats = append(r.lats, o.lats...)
}

func (r result) opsPerSec() float64 { return float64(r.ops) / r.dur.Seconds() }

func (r result) quantile(q float64) time.Duration {
	if len(r.lats) == 0 {
		return 0
	}
	s := slices.Clone(r.lats)
	slices.Sort(s)
	return s[int(q*float64(len(s)-1))]
}

// roundTrips runs Encrypt+Decrypt pairs from callers goroutines for d.
func roundTrips(b *testing.B, svc kmsservice.Service, callers int, d time.Duration) result {
	var mu sync.Mutex
	var total result
	var wg sync.WaitGroup
	start := time.Now()
	stop := start.Add(d)
	for c := 0; c < callers; c++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx := context.Background()
			seed := make([]byte, 32)
			var local result
			for time.Now().Before(stop) {
				_, _ = rand.Read(seed)
				t0 := time.Now()
				enc, err := svc.Encrypt(ctx, "bench", seed)
				if err != nil {
					b.Error(err)
					return
				}
				if _, err := svc.Decrypt(ctx, "bench", &kmsservice.DecryptRequest{KeyID: enc.KeyID, Ciphertext: enc.Ciphertext, Annotations: enc.Annotations}); err != nil {
					b.Error(err)
					return
				}
				local.lats = append(local.lats, time.Since(t0))
				local.ops++
			}
			mu.Lock()
			total.ops += local.ops
			total.lats = append(total.lats, local.lats...)
			mu.Unlock()
		}()
	}
	wg.Wait()
	total.dur = time.Since(start)
	return total
}

func statusLatency(b *testing.B, svc kmsservice.Service, d time.Duration) result {
	var r result
	start := time.Now()
	for time.Since(start) < d {
		t0 := time.Now()
		if _, err := svc.Status(context.Background()); err != nil {
			b.Fatal(err)
		}
		r.lats = append(r.lats, time.Since(t0))
		r.ops++
	}
	r.dur = time.Since(start)
	return r
}

// phase is how long each target runs per round; rounds alternate targets so
// drift on a shared machine hits all of them alike.
var (
	phase  = 2 * time.Second
	rounds = 3
)

// openTPM is a pkcs11 provider in RSA-OAEP-256 mode on a fresh software
// TPM (2048-bit keys, as most real TPMs make).
func openTPM(b *testing.B) *pkcs11.Provider {
	tpm := tpmtest.Start(b, "bench-tpm")
	tpm.SetEnv(b)
	cfg := pkcs11.Config{Module: tpm.Module, TokenLabel: tpm.Label, PinFile: tpm.PinFile, KeyLabel: "bench-kek", Algorithm: pkcs11.AlgorithmRSAOAEP, KeySize: 2048}
	if _, err := pkcs11.Init(context.Background(), cfg, nil); err != nil {
		b.Fatal(err)
	}
	p, err := pkcs11.New(context.Background(), cfg, nil)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { p.Close() })
	return p
}

// BenchmarkSocket compares the plugin (file provider, pkcs11 on SoftHSM2,
// file with pkcs11 listed second, and pkcs11 on a software TPM) with the floor at 1 and 16
// concurrent callers. Run it once per invocation
// (-benchtime 1x): every number it reports comes from the same run.
func BenchmarkSocket(b *testing.B) {
	dir := b.TempDir()
	cfg := file.Config{Path: filepath.Join(dir, "keyset.json")}
	if _, err := file.Init(context.Background(), cfg, nil); err != nil {
		b.Fatal(err)
	}
	fp, err := file.New(context.Background(), cfg, nil)
	if err != nil {
		b.Fatal(err)
	}
	tok := pkcs11test.NewToken(b, "bench")
	pcfg := pkcs11.Config{Module: tok.Module, TokenLabel: tok.Label, PinFile: tok.PinFile, KeyLabel: "bench-kek"}
	if _, err := pkcs11.Init(context.Background(), pcfg, nil); err != nil {
		b.Fatal(err)
	}
	pp, err := pkcs11.New(context.Background(), pcfg, nil)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { pp.Close() })
	tp := openTPM(b)

	targets := []struct {
		name string
		svc  kmsservice.Service
	}{
		{"floor", connect(b, serveFloor(b))},
		{"file", connect(b, servePlugin(b, fp))},
		{"pkcs11", connect(b, servePlugin(b, pp))},
		// A provider migration's first phase: file encrypts, pkcs11 is
		// listed to decrypt; every call is routed past it.
		{"file+pkcs11", connect(b, servePluginEntries(b,
			multi.Entry{Name: "file", Scope: providers.ScopePerNode, Provider: fp},
			multi.Entry{Name: "pkcs11", Scope: providers.ScopeShared, Provider: pp}))},
		// The node's TPM (swtpm through tpm2-pkcs11): every Decrypt of a
		// fresh seed is an RSA-OAEP unwrap inside the TPM.
		{"tpm", connect(b, servePlugin(b, tp))},
	}
	for _, callers := range []int{1, 16} {
		b.Run(fmt.Sprintf("callers=%d", callers), func(b *testing.B) {
			results := make([]result, len(targets))
			for i := 0; i < b.N; i++ {
				for r := 0; r < rounds; r++ {
					for ti, tg := range targets {
						results[ti].add(roundTrips(b, tg.svc, callers, phase))
					}
				}
			}
			floor := results[0].opsPerSec()
			for ti, tg := range targets {
				r := results[ti]
				b.ReportMetric(r.opsPerSec(), tg.name+"-ops/s")
				b.ReportMetric(float64(r.quantile(0.50).Microseconds()), tg.name+"-p50-µs")
				b.ReportMetric(float64(r.quantile(0.99).Microseconds()), tg.name+"-p99-µs")
				if ti > 0 {
					b.ReportMetric(r.opsPerSec()/floor, tg.name+"/floor")
				}
			}
		})
	}
	b.Run("status", func(b *testing.B) {
		var fl, pl result
		for i := 0; i < b.N; i++ {
			fl.add(statusLatency(b, targets[0].svc, phase))
			pl.add(statusLatency(b, targets[1].svc, phase))
		}
		b.ReportMetric(float64(fl.quantile(0.50).Microseconds()), "floor-p50-µs")
		b.ReportMetric(float64(fl.quantile(0.99).Microseconds()), "floor-p99-µs")
		b.ReportMetric(float64(pl.quantile(0.50).Microseconds()), "plugin-p50-µs")
		b.ReportMetric(float64(pl.quantile(0.99).Microseconds()), "plugin-p99-µs")
	})
}
