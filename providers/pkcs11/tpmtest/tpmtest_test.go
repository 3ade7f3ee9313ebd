//go:build cgo

package tpmtest

import (
	"bytes"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"errors"
	"math/big"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/pkcs11"
)

// These tests pin what the TPM token (tpm2-pkcs11 1.9 on swtpm) does with
// the operations the pkcs11 provider's RSA mode relies on, so that a
// different module version that changes any of it fails here, next to the
// explanation, rather than somewhere in the provider.

// TestTokenUnwrapsOAEP256 generates RSA key pairs in the token and unwraps
// seeds wrapped in software with crypto/rsa (OAEP, SHA-256, MGF1-SHA-256),
// the way the provider wraps a seed with a public key it read once.
func TestTokenUnwrapsOAEP256(t *testing.T) {
	var dir string
	t.Run("token", func(t *testing.T) {
		t0 := time.Now()
		tp := Start(t, "kms")
		t.Logf("Start: %v", time.Since(t0))
		dir = tp.Dir
		tp.SetEnv(t)
		quietTSS(t)
		p, sh := session(t, tp)

		for _, bits := range []int{2048, 3072} {
			t0 := time.Now()
			k := generateRSA(t, p, sh, bits)
			t.Logf("%d bits: C_GenerateKeyPair %v", bits, time.Since(t0))
			for _, tc := range []struct {
				name  string
				label []byte
				// wantErr: C_Decrypt fails. The token then keeps the
				// decryption active, so the test ends it.
				wantErr bool
				why     string
			}{
				{name: "no label", label: nil},
				{name: "19-byte label ending in NUL", label: []byte("kms-v1-0123456789a\x00")},
				{name: "label without NUL", label: []byte("kms-v1-0123456789a"), wantErr: true,
					why: "a TPM takes only labels whose last byte is 0 (TPM_RC_VALUE on the label)"},
				{name: "24-byte label ending in NUL", label: []byte("kms-v1-0123456789abcdef\x00"), wantErr: true,
					why: "tpm2-pkcs11 1.9 zeroes label bytes 18-25 after the size query that precedes the real C_Decrypt (tpm_opdata_reset writes a union member that overlaps the label)"},
			} {
				t.Run(tc.name, func(t *testing.T) {
					seed := randomBytes(t, 32)
					ct := wrap(t, k.pub, seed, tc.label)
					got, err := unwrap(p, sh, k.priv, ct, tc.label)
					if tc.wantErr {
						if err == nil {
							t.Fatalf("%d bits: C_Decrypt succeeded, want an error: %s; the token changed, revisit the provider's use of OAEP labels", bits, tc.why)
						}
						endFailedDecrypt(t, p, sh)
						return
					}
					if err != nil {
						t.Fatalf("%d bits: C_Decrypt: %v", bits, err)
					}
					if !bytes.Equal(got, seed) {
						t.Fatalf("%d bits: C_Decrypt: got %x, want %x", bits, got, seed)
					}
				})
			}

			const n = 10
			t0 = time.Now()
			for range n {
				seed := randomBytes(t, 32)
				if _, err := unwrap(p, sh, k.priv, wrap(t, k.pub, seed, nil), nil); err != nil {
					t.Fatalf("%d bits: C_Decrypt: %v", bits, err)
				}
			}
			t.Logf("%d bits: C_DecryptInit+C_Decrypt %v on average (miekg/pkcs11 calls C_Decrypt twice, and each call runs TPM2_RSA_Decrypt)", bits, time.Since(t0)/n)
		}
	})
	noneLeft(t, dir)
}

// TestTokenKeepsFailedDecryptActive: after C_Decrypt fails, tpm2-pkcs11
// leaves the operation active (PKCS#11 says it ends), so the session's next
// C_DecryptInit fails with CKR_OPERATION_ACTIVE until C_DecryptFinal ends
// it. A provider that pools sessions must end it, or one corrupt
// ciphertext disables a session for good.
//
// It also shows that CKA_DECRYPT=false is stored but not enforced, while
// narrowing CKA_ALLOWED_MECHANISMS is: the way to retire a key for
// decryption on this token.
func TestTokenKeepsFailedDecryptActive(t *testing.T) {
	var dir string
	t.Run("token", func(t *testing.T) {
		tp := Start(t, "")
		dir = tp.Dir
		tp.SetEnv(t)
		quietTSS(t)
		p, sh := session(t, tp)
		k := generateRSA(t, p, sh, 2048)
		seed := randomBytes(t, 32)
		ct := wrap(t, k.pub, seed, nil)

		corrupt := bytes.Clone(ct)
		corrupt[len(corrupt)/2] ^= 1
		if _, err := unwrap(p, sh, k.priv, corrupt, nil); err == nil {
			t.Fatal("C_Decrypt of a corrupt ciphertext succeeded")
		}
		if _, err := unwrap(p, sh, k.priv, ct, nil); !isRV(err, pkcs11.CKR_OPERATION_ACTIVE) {
			t.Fatalf("C_DecryptInit after a failed C_Decrypt: got %v, want CKR_OPERATION_ACTIVE (if this now works, the token ends failed operations itself)", err)
		}
		endFailedDecrypt(t, p, sh)
		if got, err := unwrap(p, sh, k.priv, ct, nil); err != nil || !bytes.Equal(got, seed) {
			t.Fatalf("C_Decrypt after C_DecryptFinal: got %x, %v; want the seed", got, err)
		}

		if err := p.SetAttributeValue(sh, k.priv, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, false)}); err != nil {
			t.Fatalf("C_SetAttributeValue(CKA_DECRYPT=false): %v", err)
		}
		if got := boolAttr(t, p, sh, k.priv, pkcs11.CKA_DECRYPT); got {
			t.Fatal("CKA_DECRYPT reads true after C_SetAttributeValue(false)")
		}
		if got, err := unwrap(p, sh, k.priv, ct, nil); err != nil || !bytes.Equal(got, seed) {
			t.Fatalf("C_Decrypt with CKA_DECRYPT=false: got %x, %v; want the seed (tpm2-pkcs11 1.9 does not enforce CKA_DECRYPT; if it now refuses, the provider can rely on it)", got, err)
		}

		pssOnly := ulongs(pkcs11.CKM_RSA_PKCS_PSS)
		if err := p.SetAttributeValue(sh, k.priv, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_ALLOWED_MECHANISMS, pssOnly)}); err != nil {
			t.Fatalf("C_SetAttributeValue(CKA_ALLOWED_MECHANISMS): %v", err)
		}
		if _, err := unwrap(p, sh, k.priv, ct, nil); !isRV(err, pkcs11.CKR_MECHANISM_INVALID) {
			t.Fatalf("C_DecryptInit with CKA_ALLOWED_MECHANISMS=[RSA-PSS]: got %v, want CKR_MECHANISM_INVALID", err)
		}
	})
	noneLeft(t, dir)
}

// TestParallelTPMs starts two tokens at once and uses each from a child
// process that sees only os.Environ() plus TPM.Env: the instances must not
// collide, and Env must be all a module user needs.
func TestParallelTPMs(t *testing.T) {
	var (
		mu   sync.Mutex
		dirs []string
	)
	t.Run("group", func(t *testing.T) {
		for _, name := range []string{"a", "b"} {
			t.Run(name, func(t *testing.T) {
				t.Parallel()
				t0 := time.Now()
				tp := Start(t, "kms-"+name)
				t.Logf("Start: %v", time.Since(t0))
				mu.Lock()
				dirs = append(dirs, tp.Dir)
				mu.Unlock()

				fi, err := os.Stat(tp.PinFile)
				if err != nil {
					t.Fatal(err)
				}
				if got := fi.Mode().Perm(); got != 0o600 {
					t.Errorf("PinFile mode: got %o, want 600", got)
				}
				if b, err := os.ReadFile(tp.PinFile); err != nil || string(b) != tp.PIN+"\n" {
					t.Errorf("PinFile: got %q, %v; want the PIN and a newline", b, err)
				}

				cmd := exec.Command(os.Args[0], "-test.run=^TestChildUnwraps$", "-test.count=1", "-test.v")
				cmd.Env = append(os.Environ(), tp.Env...)
				cmd.Env = append(cmd.Env, "TPMTEST_CHILD_MODULE="+tp.Module, "TPMTEST_CHILD_LABEL="+tp.Label, "TPMTEST_CHILD_PINFILE="+tp.PinFile)
				out, err := cmd.CombinedOutput()
				if err != nil || !bytes.Contains(out, []byte("--- PASS: TestChildUnwraps")) {
					t.Fatalf("child process: %v\n%s", err, out)
				}
			})
		}
	})
	if len(dirs) != 2 || dirs[0] == dirs[1] {
		t.Fatalf("directories: got %q, want two distinct ones", dirs)
	}
	for _, d := range dirs {
		noneLeft(t, d)
	}
}

// TestChildUnwraps is the child process of TestParallelTPMs; run directly
// it does nothing.
func TestChildUnwraps(t *testing.T) {
	module := os.Getenv("TPMTEST_CHILD_MODULE")
	if module == "" {
		t.Skip("only run as TestParallelTPMs's child process")
	}
	pin, err := os.ReadFile(os.Getenv("TPMTEST_CHILD_PINFILE"))
	if err != nil {
		t.Fatal(err)
	}
	tp := TPM{Module: module, Label: os.Getenv("TPMTEST_CHILD_LABEL"), PIN: strings.TrimSpace(string(pin))}
	p, sh := session(t, tp)
	k := generateRSA(t, p, sh, 2048)
	seed := randomBytes(t, 32)
	got, err := unwrap(p, sh, k.priv, wrap(t, k.pub, seed, nil), nil)
	if err != nil || !bytes.Equal(got, seed) {
		t.Fatalf("C_Decrypt: got %x, %v; want the seed", got, err)
	}
}

// session loads tp.Module in this process (with the environment it has
// now), logs in to the token labelled tp.Label, and closes everything when
// the test ends, before Start's cleanups stop the broker.
func session(t testing.TB, tp TPM) (*pkcs11.Ctx, pkcs11.SessionHandle) {
	t.Helper()
	p := pkcs11.New(tp.Module)
	if p == nil {
		t.Fatalf("cannot load %s", tp.Module)
	}
	if err := p.Initialize(); err != nil {
		p.Destroy()
		t.Fatalf("C_Initialize: %v", err)
	}
	t.Cleanup(func() { p.Finalize(); p.Destroy() })
	slots, err := p.GetSlotList(true)
	if err != nil {
		t.Fatalf("C_GetSlotList: %v", err)
	}
	var labels []string
	for _, s := range slots {
		ti, err := p.GetTokenInfo(s)
		if err != nil {
			t.Fatalf("C_GetTokenInfo: %v", err)
		}
		labels = append(labels, ti.Label)
		if strings.TrimRight(ti.Label, " ") != tp.Label {
			continue
		}
		sh, err := p.OpenSession(s, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
		if err != nil {
			t.Fatalf("C_OpenSession: %v", err)
		}
		t.Cleanup(func() { p.CloseSession(sh) })
		if err := p.Login(sh, pkcs11.CKU_USER, tp.PIN); err != nil {
			t.Fatalf("C_Login: %v", err)
		}
		return p, sh
	}
	t.Fatalf("no token labelled %q (found %q)", tp.Label, labels)
	return nil, 0
}

// quietTSS silences the TPM software stack's own logging in this process:
// the tests provoke TPM errors on purpose, and it would print a WARNING and
// an ERROR line for each (tpm2-pkcs11 still prints one "ERROR:" line; it
// has no level below errors). TSS2_LOG is read at the first log call, so
// call this before the module is first initialized.
func quietTSS(t *testing.T) { t.Setenv("TSS2_LOG", "all+none") }

// rsaKey is a key pair generated in the token.
type rsaKey struct {
	priv pkcs11.ObjectHandle
	pub  *rsa.PublicKey
}

// generateRSA makes a token key pair with the attributes the provider
// gives its keys: a private key that decrypts and never leaves the token.
func generateRSA(t testing.TB, p *pkcs11.Ctx, sh pkcs11.SessionHandle, bits int) rsaKey {
	t.Helper()
	label := "k-" + randomHex(t, 4)
	pubT := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
		pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true),
		pkcs11.NewAttribute(pkcs11.CKA_MODULUS_BITS, bits),
		pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, []byte{1, 0, 1}),
	}
	privT := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, true),
	}
	pub, priv, err := p.GenerateKeyPair(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_KEY_PAIR_GEN, nil)}, pubT, privT)
	if err != nil {
		t.Fatalf("C_GenerateKeyPair(%d bits): %v", bits, err)
	}
	attrs, err := p.GetAttributeValue(sh, pub, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_MODULUS, nil),
		pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, nil),
	})
	if err != nil {
		t.Fatalf("C_GetAttributeValue(public key): %v", err)
	}
	k := rsaKey{priv: priv, pub: &rsa.PublicKey{
		N: new(big.Int).SetBytes(attrs[0].Value),
		E: int(new(big.Int).SetBytes(attrs[1].Value).Int64()),
	}}
	if got := k.pub.N.BitLen(); got != bits {
		t.Fatalf("modulus: got %d bits, want %d", got, bits)
	}
	if k.pub.E != 65537 {
		t.Fatalf("public exponent: got %d, want 65537", k.pub.E)
	}
	if !boolAttr(t, p, sh, priv, pkcs11.CKA_SENSITIVE) || boolAttr(t, p, sh, priv, pkcs11.CKA_EXTRACTABLE) {
		t.Fatal("private key: want CKA_SENSITIVE true and CKA_EXTRACTABLE false")
	}
	return k
}

// unwrap decrypts ct with priv: RSA-OAEP with SHA-256, MGF1-SHA-256 and
// the given OAEP label, as crypto/rsa.EncryptOAEP(sha256.New()) made it.
func unwrap(p *pkcs11.Ctx, sh pkcs11.SessionHandle, priv pkcs11.ObjectHandle, ct, label []byte) ([]byte, error) {
	params := pkcs11.NewOAEPParams(pkcs11.CKM_SHA256, pkcs11.CKG_MGF1_SHA256, pkcs11.CKZ_DATA_SPECIFIED, label)
	if err := p.DecryptInit(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_OAEP, params)}, priv); err != nil {
		return nil, err
	}
	return p.Decrypt(sh, ct)
}

// endFailedDecrypt ends the decryption a failed C_Decrypt left active.
func endFailedDecrypt(t testing.TB, p *pkcs11.Ctx, sh pkcs11.SessionHandle) {
	t.Helper()
	// miekg/pkcs11 calls C_DecryptFinal twice (size, then data); the first
	// call ends the operation, so the second may report it not initialized.
	if _, err := p.DecryptFinal(sh); err != nil && !isRV(err, pkcs11.CKR_OPERATION_NOT_INITIALIZED) {
		t.Fatalf("C_DecryptFinal: %v", err)
	}
}

func wrap(t testing.TB, pub *rsa.PublicKey, seed, label []byte) []byte {
	t.Helper()
	ct, err := rsa.EncryptOAEP(sha256.New(), rand.Reader, pub, seed, label)
	if err != nil {
		t.Fatal(err)
	}
	return ct
}

func boolAttr(t testing.TB, p *pkcs11.Ctx, sh pkcs11.SessionHandle, h pkcs11.ObjectHandle, typ uint) bool {
	t.Helper()
	a, err := p.GetAttributeValue(sh, h, []*pkcs11.Attribute{pkcs11.NewAttribute(typ, nil)})
	if err != nil {
		t.Fatalf("C_GetAttributeValue(%#x): %v", typ, err)
	}
	return len(a[0].Value) == 1 && a[0].Value[0] != 0
}

// ulongs encodes mechanism types as the CK_MECHANISM_TYPE array that
// CKA_ALLOWED_MECHANISMS holds; NewAttribute encodes a uint as one
// CK_ULONG in the C ABI's size and byte order.
func ulongs(vs ...uint) []byte {
	var b []byte
	for _, v := range vs {
		b = append(b, pkcs11.NewAttribute(pkcs11.CKA_MODULUS_BITS, v).Value...)
	}
	return b
}

func isRV(err error, rv uint) bool {
	var e pkcs11.Error
	return errors.As(err, &e) && uint(e) == rv
}

func randomBytes(t testing.TB, n int) []byte {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

// noneLeft fails the test if a process whose command line names dir is
// still running, or dir still exists: every process Start runs has dir in
// its arguments.
func noneLeft(t *testing.T, dir string) {
	t.Helper()
	if dir == "" {
		t.Fatal("no directory recorded: the token did not start")
	}
	out, err := exec.Command("pgrep", "-a", "-f", regexp.QuoteMeta(dir)).Output()
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee) && ee.ExitCode() == 1:
		// pgrep matched nothing.
	case err != nil:
		t.Fatalf("pgrep: %v", err)
	default:
		t.Errorf("processes left behind after cleanup:\n%s", out)
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("directory %s left behind (stat: %v)", dir, err)
	}
}
