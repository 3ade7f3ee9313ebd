package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	kmsservice "k8s.io/kms/pkg/service"

	"github.com/kms-v2/kms-plugin/internal/leakcanary"
)

// TestLeakCanary runs the real plugin and kmsctl with debug logs through
// encrypts, decrypts (good and bad), a key rotation and a metrics scrape,
// then searches everything they printed for the seeds, the plaintexts and
// the keyset's key material: raw, hex and base64. It must find nothing.
func TestLeakCanary(t *testing.T) {
	e := newEnv(t, true)
	health := freeTCPAddr(t)
	e.writeConfig(t, fmt.Sprintf("socket: %s\nhealth: %s\nrefreshInterval: 200ms\ncheckInterval: 200ms\nlog:\n  level: trace\nprovider:\n  file:\n    path: keyset.json\n", e.socket, health))
	var canary leakcanary.Canary
	var corpus bytes.Buffer
	kmsctl := func(args ...string) string {
		out, errOut, code := runCode("kmsctl", append(args, "--config", e.config)...)
		corpus.WriteString(out + errOut)
		if code != 0 {
			t.Fatalf("kmsctl %s: exit %d: %s", strings.Join(args, " "), code, errOut)
		}
		return out
	}
	plugin, logs := startPluginLogs(t, e)
	svc := client(t, e)
	ctx := context.Background()

	encrypt := func(uid string) *kmsservice.EncryptResponse {
		seed := make([]byte, 32)
		_, _ = rand.Read(seed)
		canary.Register("seed "+uid, seed)
		enc, err := svc.Encrypt(ctx, uid, seed)
		if err != nil {
			t.Fatalf("Encrypt: %v", err)
		}
		got, err := svc.Decrypt(ctx, uid+"-d", &kmsservice.DecryptRequest{KeyID: enc.KeyID, Ciphertext: enc.Ciphertext})
		if err != nil || !bytes.Equal(got, seed) {
			t.Fatalf("Decrypt: %v", err)
		}
		return enc
	}
	enc := encrypt("uid-1")
	// Refused requests log on their error paths.
	odd := []byte("plaintext-of-the-wrong-size-0123456789")
	canary.Register("wrong-size plaintext", odd)
	if _, err := svc.Encrypt(ctx, "uid-odd", odd); err == nil {
		t.Fatal("Encrypt accepted a 38-byte plaintext")
	}
	bad := append([]byte(nil), enc.Ciphertext...)
	bad[len(bad)-1] ^= 1
	if _, err := svc.Decrypt(ctx, "uid-bad", &kmsservice.DecryptRequest{KeyID: enc.KeyID, Ciphertext: bad}); err == nil {
		t.Fatal("Decrypt accepted a tampered ciphertext")
	}
	if _, err := svc.Decrypt(ctx, "uid-unknown", &kmsservice.DecryptRequest{KeyID: "file:nope/1", Ciphertext: enc.Ciphertext}); err == nil {
		t.Fatal("Decrypt accepted an unknown key_id")
	}

	newKey := strings.TrimSpace(kmsctl("keys", "create"))
	kmsctl("keys", "promote", newKey)
	deadline := time.Now().Add(10 * time.Second)
	for {
		st, err := svc.Status(ctx)
		if err == nil && st.KeyID == newKey {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("Status did not reach %s: %v", newKey, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	encrypt("uid-2")
	kmsctl("keys", "list", "-o", "json")
	kmsctl("keys", "list")

	waitHTTP(t, "http://"+health+"/readyz")
	resp, err := http.Get("http://" + health + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	metrics, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !bytes.Contains(metrics, []byte("kms_plugin_")) {
		t.Fatalf("/metrics has no kms_plugin_ series:\n%s", metrics)
	}
	corpus.Write(metrics)

	if err := plugin.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	_ = plugin.Wait()
	corpus.WriteString(logs.String())

	keyset, err := os.ReadFile(e.keyset)
	if err != nil {
		t.Fatal(err)
	}
	if n, err := canary.RegisterKeyset("keyset", keyset); err != nil || n != 2 {
		t.Fatalf("keyset: %d keys, %v; want 2", n, err)
	}
	if canary.Len() < 7 || canary.Short() != 0 {
		t.Fatalf("canary searches for %d secrets (%d too short); want the 3 plaintexts and 4 key forms", canary.Len(), canary.Short())
	}
	if !strings.Contains(logs.String(), "uid-bad") {
		t.Fatalf("the plugin's trace log does not show the refused decrypt; the scan would prove little:\n%s", logs.String())
	}
	hits := canary.Scan(corpus.Bytes())
	for _, h := range hits {
		t.Errorf("secret in the output: %v: %q", h, context20(corpus.Bytes(), h.Offset))
	}
	t.Logf("leak canary: %d secrets searched for in %d bytes of logs, kmsctl output and metrics: %d hits", canary.Len(), corpus.Len(), len(hits))
}

// context20 is the line around offset, for a failure message (the secret
// is already compromised in the output it quotes).
func context20(b []byte, offset int) string {
	start, end := max(0, offset-40), min(len(b), offset+80)
	return string(b[start:end])
}
