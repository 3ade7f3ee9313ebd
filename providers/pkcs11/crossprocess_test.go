//go:build cgo

package pkcs11

import (
	"bytes"
	"context"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/kms-v2/kms-plugin/providers"
	"github.com/kms-v2/kms-plugin/providers/providertest"
)

// helperEnv makes the test binary act as a second process on the token
// (like kmsctl next to a running plugin) instead of running tests.
const helperEnv = "KMS_PKCS11_HELPER_OUT"

// crossProcessSeed is what the helper encrypts, so the parent can check it.
var crossProcessSeed = bytes.Repeat([]byte{0x5a}, providers.SeedSize)

// TestHelperProcess rotates the key a few times from another process and
// writes its last ciphertext to $KMS_PKCS11_HELPER_OUT.
func TestHelperProcess(t *testing.T) {
	out := os.Getenv(helperEnv)
	if out == "" {
		t.Skip("helper for TestOtherProcessRotates")
	}
	cfg := Config{Module: os.Getenv("HELPER_MODULE"), TokenLabel: os.Getenv("HELPER_TOKEN"), PinFile: os.Getenv("HELPER_PIN"), KeyLabel: "k8s-kek",
		Algorithm: os.Getenv("HELPER_ALGORITHM")}
	rounds := 5
	if cfg.rsa() {
		cfg.KeySize, rounds = 2048, 2 // a TPM takes seconds per key pair
	}
	ctx := context.Background()
	p, err := New(ctx, cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	for i := 0; i < rounds; i++ {
		v, err := p.CreateVersion(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := p.Promote(ctx, v.KeyID); err != nil {
			t.Fatal(err)
		}
	}
	s, err := p.Encrypt(ctx, crossProcessSeed)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(out, []byte(s.KeyID+" "+hex.EncodeToString(s.Ciphertext)), 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestOtherProcessRotates runs the plugin's side of a rotation done by
// another process: while that process creates and promotes versions, this
// one keeps encrypting and decrypting from many goroutines (SoftHSM2 reloads
// changed objects under us then), and after one Refresh it encrypts with the
// other process's primary and decrypts what that process wrote.
func TestOtherProcessRotates(t *testing.T) {
	p, cfg := newInitialized(t)
	otherProcessRotates(t, p, cfg, 6)
}

// otherProcessRotates is TestOtherProcessRotates for the provider p on the
// token of cfg, whose key label holds one version; the helper process
// leaves want versions in all.
func otherProcessRotates(t *testing.T, p *Provider, cfg Config, want int) {
	ctx := testCtx(t)
	out := filepath.Join(t.TempDir(), "sealed")
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperProcess$")
	cmd.Env = append(os.Environ(), helperEnv+"="+out, "HELPER_MODULE="+cfg.Module, "HELPER_TOKEN="+cfg.TokenLabel, "HELPER_PIN="+cfg.PinFile,
		"HELPER_ALGORITHM="+cfg.Algorithm)
	var helperOut []byte
	done := make(chan error, 1)
	go func() {
		var err error
		helperOut, err = cmd.CombinedOutput()
		done <- err
	}()

	stop := make(chan struct{})
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				seed := providertest.Seed(t)
				s, err := p.Encrypt(ctx, seed)
				if err != nil {
					errs <- err
					return
				}
				got, err := p.Decrypt(ctx, s)
				if err != nil || !bytes.Equal(got, seed) {
					errs <- fmt.Errorf("round trip with %s while another process rotates: %v", s.KeyID, err)
					return
				}
			}
		}()
	}
	herr := <-done
	close(stop)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if herr != nil {
		t.Fatalf("helper process: %v\n%s", herr, helperOut)
	}

	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	keyID, ctHex, _ := strings.Cut(string(b), " ")
	ct, err := hex.DecodeString(ctHex)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Refresh(ctx); err != nil {
		t.Fatal(err)
	}
	if got, _ := p.PrimaryKeyID(ctx); got != keyID {
		t.Fatalf("after Refresh, primary = %s, want the other process's %s", got, keyID)
	}
	got, err := p.Decrypt(ctx, providers.Sealed{KeyID: keyID, Ciphertext: ct})
	if err != nil || !bytes.Equal(got, crossProcessSeed) {
		t.Fatalf("Decrypt of the other process's ciphertext: %x, %v", got, err)
	}
	vs, err := p.Versions(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if got := len(vs); got != want {
		t.Fatalf("Versions: %d, want %d", got, want)
	}
}
