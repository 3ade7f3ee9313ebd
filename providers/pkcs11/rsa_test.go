//go:build cgo

package pkcs11

import (
	"errors"
	"strings"
	"testing"

	"github.com/miekg/pkcs11"

	"github.com/kms-v2/kms-plugin/providers"
	"github.com/kms-v2/kms-plugin/providers/pkcs11/pkcs11test"
)

// The RSA-OAEP-256 checks that need no unwrap run on SoftHSM2, which makes
// and reads RSA key pairs but unwraps RSA-OAEP with SHA-1 only; the
// unwrapping itself is tested against a TPM (tpm_test.go).

// rsaPair plants an RSA key pair the way another application could, with
// the given labels, modulus size and private-key protection.
type rsaPair struct {
	pubLabel, privLabel    string
	bits                   int
	sensitive, extractable bool
}

func plantRSA(t *testing.T, tok *token, k rsaPair) {
	t.Helper()
	err := tok.doRW(testCtx(t), func(h pkcs11.SessionHandle) error {
		_, _, err := tok.mod.ctx.GenerateKeyPair(h, rsaKeyGen, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
			pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true),
			pkcs11.NewAttribute(pkcs11.CKA_MODULUS_BITS, k.bits),
			pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, []byte{1, 0, 1}),
			pkcs11.NewAttribute(pkcs11.CKA_LABEL, k.pubLabel),
		}, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
			pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
			pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, k.sensitive),
			pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, k.extractable),
			pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, true),
			pkcs11.NewAttribute(pkcs11.CKA_LABEL, k.privLabel),
		})
		return err
	})
	if err != nil {
		t.Fatalf("plant RSA key pair: %v", err)
	}
}

// plantRSAState writes the state object an RSA Init would, naming version
// 1 as primary, without making a key.
func plantRSAState(t *testing.T, cfg Config) {
	t.Helper()
	p, err := open(cfg, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	err = p.tok.doRW(testCtx(t), func(h pkcs11.SessionHandle) error {
		return p.writeMeta(h, snapshot{}, meta{Primary: 1, HighWater: 1, Algorithm: AlgorithmRSAOAEP})
	})
	if err != nil {
		t.Fatal(err)
	}
}

func rsaConfigFor(tk pkcs11test.Token) Config {
	cfg := configFor(tk)
	cfg.Algorithm, cfg.KeySize = AlgorithmRSAOAEP, 2048
	return cfg
}

// TestRSARefusesUnsafeKeyPairs plants key pairs under the provider's label
// that must not serve as a KEK; a safe one is the control.
func TestRSARefusesUnsafeKeyPairs(t *testing.T) {
	safe := rsaPair{pubLabel: "k8s-kek-1", privLabel: "k8s-kek-1", bits: 2048, sensitive: true}
	cases := []struct {
		name  string
		pairs func() []rsaPair
		want  string // "" means New succeeds
	}{
		{"Safe", func() []rsaPair { return []rsaPair{safe} }, ""},
		{"Extractable", func() []rsaPair { k := safe; k.extractable = true; return []rsaPair{k} }, "extractable"},
		{"NotSensitive", func() []rsaPair { k := safe; k.sensitive = false; return []rsaPair{k} }, "not sensitive"},
		{"1024Bits", func() []rsaPair { k := safe; k.bits = 1024; return []rsaPair{k} }, "1024 bits"},
		{"HalvesOfTwoPairs", func() []rsaPair {
			a, b := safe, safe
			a.pubLabel, b.privLabel = "stray", "stray"
			return []rsaPair{a, b}
		}, "does not belong"},
		{"TwoPrivateKeys", func() []rsaPair {
			b := safe
			b.pubLabel = "stray"
			return []rsaPair{safe, b}
		}, "2 key objects"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			tk := pkcs11test.NewToken(t, "")
			cfg := rsaConfigFor(tk)
			tok := rawToken(t, cfg)
			for _, k := range c.pairs() {
				plantRSA(t, tok, k)
			}
			plantRSAState(t, cfg)
			p, err := New(testCtx(t), cfg, testLogger(t))
			if c.want == "" {
				if err != nil {
					t.Fatalf("New with a safe key pair: %v", err)
				}
				p.Close()
				return
			}
			if err == nil {
				p.Close()
				t.Fatal("New accepted an unsafe key pair")
			}
			if !errors.Is(err, ErrUnsafeKey) || !strings.Contains(err.Error(), "k8s-kek-1") || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("got %v, want ErrUnsafeKey naming k8s-kek-1 and saying %q", err, c.want)
			}
		})
	}
}

// TestOneKindPerKeyLabel: AES keys and RSA key pairs never share a key
// label, and a config whose algorithm does not match the token's keys is
// refused with the fix.
func TestOneKindPerKeyLabel(t *testing.T) {
	rsaPairAt2 := rsaPair{pubLabel: "k8s-kek-2", privLabel: "k8s-kek-2", bits: 2048, sensitive: true}
	cases := []struct {
		name    string
		setup   func(t *testing.T, cfg Config) Config // returns the config to open with
		init    bool                                  // run Init with it instead of New
		wantErr error
		want    string
	}{
		{"RSAPairNextToAESKeys", func(t *testing.T, cfg Config) Config {
			mustInit(t, cfg)
			plantRSA(t, rawToken(t, cfg), rsaPairAt2)
			return cfg
		}, false, ErrUnsafeKey, "both AES secret keys and RSA private keys labelled k8s-kek-<n>"},
		{"RSAConfigOnAESState", func(t *testing.T, cfg Config) Config {
			mustInit(t, cfg)
			cfg.Algorithm, cfg.KeySize = AlgorithmRSAOAEP, 2048
			return cfg
		}, false, ErrWrongAlgorithm, "set algorithm: AES-256-GCM"},
		{"AESConfigOnRSAState", func(t *testing.T, cfg Config) Config {
			rsaCfg := cfg
			rsaCfg.Algorithm = AlgorithmRSAOAEP
			plantRSAState(t, rsaCfg)
			return cfg
		}, false, ErrWrongAlgorithm, "set algorithm: RSA-OAEP-256"},
		{"AESConfigOnStrayRSAPair", func(t *testing.T, cfg Config) Config {
			plantRSA(t, rawToken(t, cfg), rsaPairAt2)
			return cfg
		}, true, ErrWrongAlgorithm, "holds RSA-OAEP-256 keys"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			tk := pkcs11test.NewToken(t, "")
			cfg := c.setup(t, configFor(tk))
			var err error
			if c.init {
				_, err = Init(testCtx(t), cfg, testLogger(t))
			} else {
				var p *Provider
				if p, err = New(testCtx(t), cfg, testLogger(t)); err == nil {
					p.Close()
				}
			}
			if !errors.Is(err, c.wantErr) || !strings.Contains(err.Error(), "k8s-kek") || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("got %v, want %v naming the key label and saying %q", err, c.wantErr, c.want)
			}
		})
	}
}

func mustInit(t *testing.T, cfg Config) {
	t.Helper()
	if _, err := Init(testCtx(t), cfg, testLogger(t)); err != nil {
		t.Fatalf("Init: %v", err)
	}
}

// TestRSAInitNeedsOAEPWithSHA256 runs an RSA Init on SoftHSM2, whose
// RSA-OAEP takes SHA-1 only: the self-test must refuse the new pair with
// an error that says why, and leave neither half nor a state object behind.
func TestRSAInitNeedsOAEPWithSHA256(t *testing.T) {
	tk := pkcs11test.NewToken(t, "")
	cfg := rsaConfigFor(tk)
	_, err := Init(testCtx(t), cfg, testLogger(t))
	if !errors.Is(err, providers.ErrUnavailable) || !strings.Contains(err.Error(), "SHA-256") {
		t.Fatalf("RSA Init on SoftHSM2: got %v, want ErrUnavailable saying SHA-256", err)
	}
	tok := rawToken(t, cfg)
	err = tok.do(testCtx(t), func(h pkcs11.SessionHandle) error {
		objs, err := findAll(tok.mod.ctx, h, nil)
		if err == nil && len(objs) != 0 {
			t.Errorf("%d objects left on the token after the failed Init, want none", len(objs))
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
}
