package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	kmsapi "k8s.io/kms/apis/v2"
)

// startWithHealth starts the plugin with the file provider and a health
// address, and waits until the health endpoint answers.
func startWithHealth(t *testing.T) (e env, health string, pid int, logs *syncBuffer) {
	t.Helper()
	e = newEnv(t, true)
	health = freeTCPAddr(t)
	e.writeConfig(t, fmt.Sprintf("socket: %s\nhealth: %s\nprovider:\n  file:\n    path: keyset.json\n", e.socket, health))
	cmd, logs := startPluginLogs(t, e)
	waitHTTP(t, "http://"+health+"/livez")
	return e, health, cmd.Process.Pid, logs
}

// TestOversizedRequestsAreRefused: 100 clients sending 4 MB Decrypts for a
// few seconds get ResourceExhausted, the plugin stays within the static
// pod's memory limit, and its logs stay small, carry no long uid, and count
// what the rate limit dropped.
func TestOversizedRequestsAreRefused(t *testing.T) {
	const clients = 100
	limit := manifestMemoryLimit(t)
	e, health, pid, logs := startWithHealth(t)
	rssBefore, _ := memory(t, pid)

	dial := func() (kmsapi.KeyManagementServiceClient, func()) {
		conn, err := grpc.NewClient("unix://"+e.socket,
			grpc.WithTransportCredentials(insecure.NewCredentials()),
			grpc.WithDefaultCallOptions(grpc.MaxCallSendMsgSize(8<<20)))
		if err != nil {
			t.Fatal(err)
		}
		return kmsapi.NewKeyManagementServiceClient(conn), func() { conn.Close() }
	}
	// One request under the size limit with a long uid, while the log
	// budget is fresh: it is logged, with the uid cut short.
	c, closeConn := dial()
	longUID := strings.Repeat("v", 48<<10)
	_, err := c.Decrypt(context.Background(), &kmsapi.DecryptRequest{Uid: longUID, KeyId: "file:nope/1", Ciphertext: []byte{1}})
	closeConn()
	if err == nil {
		t.Fatal("Decrypt of junk succeeded")
	}

	// Just under gRPC's default 4 MiB limit: a 3 MiB uid and a ciphertext
	// of nearly 1 MiB.
	huge := &kmsapi.DecryptRequest{Uid: strings.Repeat("u", 3<<20), KeyId: "file:nope/1", Ciphertext: make([]byte, 1<<20-4<<10)}
	var (
		calls   atomic.Int64
		wrong   atomic.Int64
		firstMu sync.Mutex
		first   error
		wg      sync.WaitGroup
		peak    atomic.Int64
	)
	// At least 3 s and 300 calls (well past the log budget's burst and
	// rate, however slow the machine), at most 30 s.
	const minCalls = 300
	stop, hardStop := time.Now().Add(3*time.Second), time.Now().Add(30*time.Second)
	more := func() bool {
		now := time.Now()
		return now.Before(hardStop) && (now.Before(stop) || calls.Load() < minCalls)
	}
	sampling, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(sampling)
		for {
			select {
			case <-done:
				return
			case <-time.After(50 * time.Millisecond):
			}
			if rss, _, err := readMemory(pid); err == nil && rss > peak.Load() {
				peak.Store(rss)
			}
		}
	}()
	for range clients {
		c, closeConn := dial()
		wg.Go(func() {
			defer closeConn()
			for more() {
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				_, err := c.Decrypt(ctx, huge)
				cancel()
				calls.Add(1)
				if status.Code(err) != codes.ResourceExhausted {
					wrong.Add(1)
					firstMu.Lock()
					if first == nil {
						first = fmt.Errorf("code %v: %v", status.Code(err), err)
					}
					firstMu.Unlock()
				}
			}
		})
	}
	wg.Wait()
	close(done)
	<-sampling
	rss, hwm := memory(t, pid)
	t.Logf("%d calls of 4 MiB from %d clients; plugin RSS %.1f MiB before, %.1f MiB after, sampled peak %.1f MiB, VmHWM %.1f MiB; limit %.0f MiB",
		calls.Load(), clients, mib(rssBefore), mib(rss), mib(peak.Load()), mib(hwm), mib(limit))
	if n := wrong.Load(); n > 0 {
		t.Errorf("%d of %d oversized calls did not fail with ResourceExhausted; first: %v", n, calls.Load(), first)
	}
	if hwm >= limit {
		t.Errorf("plugin peak RSS %.1f MiB reached the static pod's memory limit %.0f MiB", mib(hwm), mib(limit))
	}

	metrics := scrape(t, "http://"+health+"/metrics")
	dropped := metricValue(metrics, `kms_plugin_log_lines_dropped_total{reason="rate_limited"}`)
	t.Logf("log output %d bytes; %v lines dropped by the rate limit", logs.Len(), dropped)
	if dropped <= 0 {
		t.Errorf(`kms_plugin_log_lines_dropped_total{reason="rate_limited"} = %v, want > 0`, dropped)
	}
	out := logs.String()
	if len(out) >= 1<<20 {
		t.Errorf("log output is %d bytes, want under 1 MiB", len(out))
	}
	if strings.Contains(out, strings.Repeat("u", 65)) || strings.Contains(out, strings.Repeat("v", 65)) {
		t.Errorf("logs carry a uid longer than 64 bytes")
	}
	if want := "…(49152 bytes)"; !strings.Contains(out, want) {
		t.Errorf("logs lack the truncated long uid %q", want)
	}
}

func mib(b int64) float64 { return float64(b) / (1 << 20) }

// scrape returns the Prometheus text at url.
func scrape(t *testing.T, url string) string {
	t.Helper()
	resp, err := (&http.Client{Timeout: 5 * time.Second}).Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(body)
}

// metricValue finds one sample (name with its labels, exactly as exposed)
// in Prometheus text; -1 when absent.
func metricValue(text, sample string) float64 {
	re := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(sample) + ` (\S+)$`)
	m := re.FindStringSubmatch(text)
	if m == nil {
		return -1
	}
	v, err := strconv.ParseFloat(m[1], 64)
	if err != nil {
		return -1
	}
	return v
}

// TestDecryptStorm is kube-apiserver after a restart, on a cluster with
// many seeds: it decrypts every seed it finds at once (one Decrypt per
// distinct encrypted DEK source), on its one connection, with far more
// calls in flight than the plugin's stream cap. Every call must succeed
// with the right plaintext, and the plugin must stay well within the
// static pod's memory limit, so the limit cannot OOM-kill it just when the
// cluster needs it most.
func TestDecryptStorm(t *testing.T) {
	const seeds, inFlight, rounds = 5000, 1000, 3
	limit := manifestMemoryLimit(t)
	e, _, pid, _ := startWithHealth(t)
	conn, err := grpc.NewClient("unix://"+e.socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c := kmsapi.NewKeyManagementServiceClient(conn)

	type sealed struct {
		plain []byte
		resp  *kmsapi.EncryptResponse
	}
	all := make([]sealed, seeds)
	for i := range all {
		plain := fmt.Appendf(nil, "seed-%027d", i) // 32 bytes, as the apiserver's seeds
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		resp, err := c.Encrypt(ctx, &kmsapi.EncryptRequest{Uid: fmt.Sprint("enc-", i), Plaintext: plain})
		cancel()
		if err != nil {
			t.Fatalf("Encrypt seed %d: %v", i, err)
		}
		all[i] = sealed{plain, resp}
	}
	rssBefore, _ := memory(t, pid)

	var failed atomic.Int64
	var firstMu sync.Mutex
	var first error
	next := atomic.Int64{}
	start := time.Now()
	var wg sync.WaitGroup
	for range inFlight {
		wg.Go(func() {
			for {
				n := next.Add(1) - 1
				if n >= seeds*rounds {
					return
				}
				s := all[n%seeds]
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				resp, err := c.Decrypt(ctx, &kmsapi.DecryptRequest{Uid: fmt.Sprint("dec-", n), KeyId: s.resp.KeyId, Ciphertext: s.resp.Ciphertext, Annotations: s.resp.Annotations})
				cancel()
				if err == nil && string(resp.Plaintext) != string(s.plain) {
					err = fmt.Errorf("seed %d: wrong plaintext", n%seeds)
				}
				if err != nil {
					failed.Add(1)
					firstMu.Lock()
					if first == nil {
						first = err
					}
					firstMu.Unlock()
				}
			}
		})
	}
	wg.Wait()
	took := time.Since(start)
	rss, hwm := memory(t, pid)
	t.Logf("%d Decrypts of %d seeds, %d in flight on one connection, in %s; plugin RSS %.1f MiB before, %.1f MiB after, VmHWM %.1f MiB; limit %.0f MiB",
		seeds*rounds, seeds, inFlight, took.Round(time.Millisecond), mib(rssBefore), mib(rss), mib(hwm), mib(limit))
	if n := failed.Load(); n > 0 {
		t.Errorf("%d of %d Decrypts failed; first: %v", n, seeds*rounds, first)
	}
	// Half the limit: room for the Go runtime's own growth, the provider's
	// refresh and a second apiserver connecting during the storm.
	if hwm >= limit/2 {
		t.Errorf("plugin peak RSS %.1f MiB in a decrypt storm, want under half the static pod's memory limit (%.0f MiB)", mib(hwm), mib(limit))
	}
}
