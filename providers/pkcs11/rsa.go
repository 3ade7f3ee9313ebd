//go:build cgo

package pkcs11

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"math/big"
	"slices"
	"strconv"

	"github.com/miekg/pkcs11"

	"github.com/kms-v2/kms-plugin/providers"
)

// rsaMechanisms are what RSA-OAEP-256 mode needs from the token.
var rsaMechanisms = []mechanism{
	{pkcs11.CKM_RSA_PKCS_OAEP, "CKM_RSA_PKCS_OAEP", pkcs11.CKF_DECRYPT},
	{pkcs11.CKM_RSA_PKCS_KEY_PAIR_GEN, "CKM_RSA_PKCS_KEY_PAIR_GEN", pkcs11.CKF_GENERATE_KEY_PAIR},
}

// Smallest and largest RSA modulus accepted: below 2048 bits is too weak
// for a KEK, and above 4096 the ciphertext would pass the apiserver's
// 1 KiB limit.
const (
	minRSABits = 2048
	maxRSABits = 4096
)

// oaepMechanism is CKM_RSA_PKCS_OAEP with SHA-256, MGF1-SHA-256 and an
// empty label: what crypto/rsa.EncryptOAEP with sha256 and no label
// produces.
//
// The label stays empty, for every version and forever (a label is part of
// what a ciphertext was made with). The key_id would be the natural label,
// but on the token this mode exists for it does not survive: a TPM takes
// only labels that end in a zero byte, and tpm2-pkcs11 1.9 zeroes label
// bytes 18 to 25 between the size query C_Decrypt that miekg/pkcs11 makes
// and the real one, so a label as long as a key_id decrypts with another
// label than it was wrapped with. The binding to the key_id is the private
// key instead, as with Key Vault: the key_id selects exactly one version's
// key, and another version's key cannot unwrap the ciphertext.
func oaepMechanism() []*pkcs11.Mechanism {
	params := pkcs11.NewOAEPParams(pkcs11.CKM_SHA256, pkcs11.CKG_MGF1_SHA256, pkcs11.CKZ_DATA_SPECIFIED, nil)
	return []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_OAEP, params)}
}

// readRSA checks and adds the RSA versions: a private and a public key
// object with the same label. A lone half (an interrupted CreateVersion,
// or half removed by hand) is no version, but its number stays used.
func (p *Provider) readRSA(h pkcs11.SessionHandle, snap *snapshot, privates map[int][]pkcs11.ObjectHandle) error {
	publics, err := p.findLabelled(h, pkcs11.CKO_PUBLIC_KEY)
	if err != nil {
		return err
	}
	for n := range publics {
		snap.maxN = max(snap.maxN, n)
	}
	for n, objs := range privates {
		snap.maxN = max(snap.maxN, n)
		if len(publics[n]) == 0 {
			continue
		}
		priv, err := p.only(objs, n)
		if err != nil {
			return err
		}
		pub, err := p.only(publics[n], n)
		if err != nil {
			return err
		}
		v, err := p.rsaVersion(h, n, priv, pub)
		if err != nil {
			return err
		}
		v.enabled = !slices.Contains(snap.meta.Disabled, n)
		v.created = snap.meta.Created[strconv.Itoa(n)]
		snap.keys = append(snap.keys, v)
	}
	return nil
}

// rsaVersion reads one key pair, refusing a private key that could leave
// the token, a weak key, or two halves that do not belong together.
func (p *Provider) rsaVersion(h pkcs11.SessionHandle, n int, priv, pub pkcs11.ObjectHandle) (*version, error) {
	label := p.keyLabel(n)
	c := p.tok.mod.ctx
	a, err := c.GetAttributeValue(h, priv, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, nil),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, nil),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, nil),
		pkcs11.NewAttribute(pkcs11.CKA_MODULUS, nil),
	})
	if err != nil {
		return nil, fmt.Errorf("read attributes of private key %q: %w", label, err)
	}
	switch {
	case ulongAttr(a[0]) != pkcs11.CKK_RSA:
		return nil, fmt.Errorf("private key %q on token %q is not an RSA key; remove or relabel it: %w", label, p.cfg.TokenLabel, ErrUnsafeKey)
	case !boolAttr(a[1]):
		return nil, fmt.Errorf("private key %q on token %q is not sensitive (CKA_SENSITIVE false), its value can be read; refusing it, remove it and create keys with kmsctl: %w", label, p.cfg.TokenLabel, ErrUnsafeKey)
	case boolAttr(a[2]):
		return nil, fmt.Errorf("private key %q on token %q is extractable (CKA_EXTRACTABLE true), it can be exported; refusing it, remove it and create keys with kmsctl: %w", label, p.cfg.TokenLabel, ErrUnsafeKey)
	}
	key, err := p.publicKey(h, label, pub)
	if err != nil {
		return nil, err
	}
	if !bytes.Equal(bytes.TrimLeft(a[3].Value, "\x00"), key.N.Bytes()) {
		return nil, fmt.Errorf("public key %q on token %q does not belong to the private key of that label; remove the stray: %w", label, p.cfg.TokenLabel, ErrUnsafeKey)
	}
	return &version{n: n, label: label, keyID: p.keyID(label), handle: priv, pub: key}, nil
}

// publicKey reads and checks the public half of a version.
func (p *Provider) publicKey(h pkcs11.SessionHandle, label string, pub pkcs11.ObjectHandle) (*rsa.PublicKey, error) {
	a, err := p.tok.mod.ctx.GetAttributeValue(h, pub, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, nil),
		pkcs11.NewAttribute(pkcs11.CKA_MODULUS, nil),
		pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, nil),
	})
	if err != nil {
		return nil, fmt.Errorf("read public key %q: %w", label, err)
	}
	key := &rsa.PublicKey{N: new(big.Int).SetBytes(a[1].Value)}
	e := new(big.Int).SetBytes(a[2].Value)
	bits := key.N.BitLen()
	switch {
	case ulongAttr(a[0]) != pkcs11.CKK_RSA:
		return nil, fmt.Errorf("public key %q on token %q is not an RSA key; remove or relabel it: %w", label, p.cfg.TokenLabel, ErrUnsafeKey)
	case bits < minRSABits || bits > maxRSABits:
		return nil, fmt.Errorf("RSA key %q on token %q has %d bits, want %d to %d: %w", label, p.cfg.TokenLabel, bits, minRSABits, maxRSABits, ErrUnsafeKey)
	case !e.IsInt64() || e.Int64() < 3 || e.Int64() > 1<<31-1 || e.Bit(0) == 0:
		return nil, fmt.Errorf("RSA key %q on token %q has public exponent %s, want an odd one from 3 to 2^31-1: %w", label, p.cfg.TokenLabel, e, ErrUnsafeKey)
	}
	key.E = int(e.Int64())
	return key, nil
}

// generateRSA makes key pair n in the token and checks it unwraps what its
// public key wraps. The private half may only decrypt, and only with
// RSA-OAEP where the token honours CKA_ALLOWED_MECHANISMS. A token that
// insists on deciding CKA_SIGN itself (tpm2-pkcs11 makes every RSA key
// sign-capable and fails a template that says otherwise) gets a template
// without CKA_SIGN and CKA_VERIFY: at once if it is known to (see quirks),
// else after it refused the first.
func (p *Provider) generateRSA(h pkcs11.SessionHandle, n int) error {
	if err := p.checkKeySize(); err != nil {
		return err
	}
	noSign := !p.tok.mod.signingRSAKeys
	pub, priv, err := p.generatePair(h, n, noSign)
	if noSign && isRV(err, pkcs11.CKR_GENERAL_ERROR, pkcs11.CKR_TEMPLATE_INCONSISTENT, pkcs11.CKR_ATTRIBUTE_VALUE_INVALID) {
		p.logger.Debug("token refused an RSA key that cannot sign; letting it set CKA_SIGN", "label", p.keyLabel(n), "error", err)
		pub, priv, err = p.generatePair(h, n, false)
	}
	if err != nil {
		return err
	}
	v, err := p.rsaVersion(h, n, priv, pub)
	if err == nil {
		err = p.selfTest(h, v)
	}
	if err != nil {
		// Nothing was wrapped with it: remove the pair rather than leave
		// a version that cannot work.
		_ = p.tok.mod.ctx.DestroyObject(h, priv)
		_ = p.tok.mod.ctx.DestroyObject(h, pub)
		return err
	}
	return nil
}

var rsaKeyGen = []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_KEY_PAIR_GEN, nil)}

// generatePair is one C_GenerateKeyPair for version n.
func (p *Provider) generatePair(h pkcs11.SessionHandle, n int, noSign bool) (pub, priv pkcs11.ObjectHandle, err error) {
	public, private := p.rsaTemplates(n, noSign)
	return p.tok.mod.ctx.GenerateKeyPair(h, rsaKeyGen, public, private)
}

// rsaTemplates returns the public and private templates of key pair n;
// noSign also asks for CKA_SIGN and CKA_VERIFY false.
func (p *Provider) rsaTemplates(n int, noSign bool) (public, private []*pkcs11.Attribute) {
	label := p.keyLabel(n)
	// CK_ULONG[1]; CK_ULONG is C's unsigned long, as wide as Go's int on
	// Linux.
	oaepOnly := binary.NativeEndian.AppendUint64(nil, pkcs11.CKM_RSA_PKCS_OAEP)
	if strconv.IntSize == 32 {
		oaepOnly = binary.NativeEndian.AppendUint32(nil, pkcs11.CKM_RSA_PKCS_OAEP)
	}
	public = []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PUBLIC_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_RSA),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true),
		pkcs11.NewAttribute(pkcs11.CKA_WRAP, false),
		pkcs11.NewAttribute(pkcs11.CKA_MODULUS_BITS, p.cfg.keySize()),
		pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, []byte{1, 0, 1}),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
		pkcs11.NewAttribute(pkcs11.CKA_ID, []byte(label)),
	}
	private = []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_RSA),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, true),
		pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, false),
		pkcs11.NewAttribute(pkcs11.CKA_DERIVE, false),
		pkcs11.NewAttribute(pkcs11.CKA_ALLOWED_MECHANISMS, oaepOnly),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
		pkcs11.NewAttribute(pkcs11.CKA_ID, []byte(label)),
	}
	if noSign {
		public = append(public, pkcs11.NewAttribute(pkcs11.CKA_VERIFY, false))
		private = append(private, pkcs11.NewAttribute(pkcs11.CKA_SIGN, false))
	}
	return public, private
}

// checkKeySize refuses a keySize the token cannot generate, before it
// spends seconds trying. The caller is inside tok.do.
func (p *Provider) checkKeySize() error {
	p.tok.mu.Lock()
	slot := p.tok.slot
	p.tok.mu.Unlock()
	info, err := p.tok.mod.ctx.GetMechanismInfo(slot, rsaKeyGen)
	if err != nil || info.MaxKeySize == 0 || int(info.MaxKeySize) >= p.cfg.keySize() {
		return nil //nolint:nilerr // unknown: let generation decide
	}
	return fmt.Errorf("token %q makes RSA keys of at most %d bits; set pkcs11.keySize: %d: %w", p.cfg.TokenLabel, info.MaxKeySize, info.MaxKeySize, providers.ErrInvalidInput)
}

// selfTest wraps a random value with v's public key in software and has
// the token unwrap it, on session h. It proves the key pair belongs
// together and that the token does RSA-OAEP with SHA-256; Init and
// CreateVersion run it on every new pair, and Check on the primary, since
// on a TPM nothing else reaches the chip.
func (p *Provider) selfTest(h pkcs11.SessionHandle, v *version) error {
	want := make([]byte, providers.SeedSize)
	if _, err := rand.Read(want); err != nil {
		return err
	}
	ct, err := rsa.EncryptOAEP(sha256.New(), rand.Reader, v.pub, want, nil)
	if err != nil {
		return err
	}
	got, err := p.decryptOn(h, v, ct)
	switch {
	case errors.Is(err, errAuthFailed) || isRV(err, pkcs11.CKR_ARGUMENTS_BAD, pkcs11.CKR_MECHANISM_PARAM_INVALID, pkcs11.CKR_MECHANISM_INVALID):
		return spoiled(fmt.Errorf("token %q cannot unwrap with %s as pkcs11.algorithm %s needs, RSA-OAEP with SHA-256 and MGF1-SHA-256 (%v); use a token that can (SoftHSM2 2.6 does SHA-1 only): %w",
			p.cfg.TokenLabel, v.label, AlgorithmRSAOAEP, unwrapRV(err), providers.ErrUnavailable))
	case err != nil:
		return err
	case !bytes.Equal(got, want):
		clear(got)
		return fmt.Errorf("token %q unwrapped a test value with %s to something else; its RSA-OAEP cannot be used: %w", p.cfg.TokenLabel, v.label, providers.ErrUnavailable)
	}
	clear(got)
	return nil
}

// decryptOn runs one RSA-OAEP C_Decrypt with v's private key on session h.
// A failed C_Decrypt spoils the session (see spoiledError); when the
// session still answers, the failure was the input's (errAuthFailed).
func (p *Provider) decryptOn(h pkcs11.SessionHandle, v *version, ct []byte) ([]byte, error) {
	c := p.tok.mod.ctx
	if err := c.DecryptInit(h, oaepMechanism(), v.handle); err != nil {
		return nil, err
	}
	pt, err := c.Decrypt(h, ct)
	if isRV(err, pkcs11.CKR_GENERAL_ERROR) {
		// tpm2-pkcs11 reports the TPM's refusal of a bad OAEP encoding
		// as CKR_GENERAL_ERROR, as SoftHSM2 does a bad GCM tag.
		if _, serr := c.GetSessionInfo(h); serr == nil {
			err = errAuthFailed
		}
	}
	return pt, spoiled(err)
}

// sealRSA wraps a seed with v's public key, in software: no token call.
func (p *Provider) sealRSA(v *version, seed []byte) ([]byte, error) {
	ct, err := rsa.EncryptOAEP(sha256.New(), rand.Reader, v.pub, seed, nil)
	if err != nil {
		return nil, fmt.Errorf("pkcs11 encrypt with %s: %w", v.keyID, err)
	}
	return frameRSA(ct), nil
}

// decryptRSA unwraps with the private key of exactly the version s.KeyID
// names, so a ciphertext relabelled with another version's key_id fails
// (see oaepMechanism). A disabled version is refused before the
// unwrap cache is consulted, so its seeds are never served from memory.
func (p *Provider) decryptRSA(ctx context.Context, s providers.Sealed) ([]byte, error) {
	for attempt := 0; ; attempt++ {
		v, err := p.lookup(ctx, s.KeyID)
		if err != nil {
			return nil, fmt.Errorf("pkcs11 decrypt: %w", err)
		}
		if !v.enabled {
			return nil, fmt.Errorf("pkcs11 decrypt: key version %s is disabled; `kmsctl keys enable` it to read data it protects: %w", v.keyID, providers.ErrKeyDisabled)
		}
		ct, err := unframeRSA(s.Ciphertext, v.pub.Size())
		if err == nil && new(big.Int).SetBytes(ct).Cmp(v.pub.N) >= 0 {
			err = fmt.Errorf("ciphertext is not below the modulus: %w", providers.ErrInvalidCiphertext)
		}
		if err != nil {
			return nil, fmt.Errorf("pkcs11 decrypt with %s: %w", v.keyID, err)
		}
		seed, err := p.unwrapper.Unwrap(ctx, v.keyID, s.Ciphertext, func(ctx context.Context) ([]byte, error) {
			return p.unwrap(ctx, v, ct)
		})
		if handleGone(err) && attempt == 0 {
			if rerr := p.keys.Reload(ctx); rerr != nil {
				return nil, fmt.Errorf("pkcs11 decrypt with %s: key object changed and refresh failed: %w", v.keyID, rerr)
			}
			continue
		}
		return seed, p.decryptError(v, err)
	}
}

// tokenUnwrap is the one token call of an RSA Decrypt; Provider.unwrap
// points here except in tests that count calls.
func (p *Provider) tokenUnwrap(ctx context.Context, v *version, ct []byte) ([]byte, error) {
	var pt []byte
	err := p.tok.do(ctx, func(h pkcs11.SessionHandle) error {
		var err error
		pt, err = p.decryptOn(h, v, ct)
		return err
	})
	if err != nil {
		return nil, err
	}
	if len(pt) != providers.SeedSize {
		clear(pt)
		return nil, fmt.Errorf("unwrapped %d bytes, not a seed: %w", len(pt), providers.ErrInvalidCiphertext)
	}
	return pt, nil
}

// decryptError maps an unwrap's failure to the provider's sentinels.
func (p *Provider) decryptError(v *version, err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, providers.ErrInvalidCiphertext):
		return fmt.Errorf("pkcs11 decrypt with %s: %w", v.keyID, err)
	case handleGone(err):
		return fmt.Errorf("pkcs11 decrypt with %s: key object gone from the token: %w", v.keyID, providers.ErrKeyNotFound)
	case errors.Is(err, errAuthFailed) || isRV(err, pkcs11.CKR_ENCRYPTED_DATA_INVALID, pkcs11.CKR_ENCRYPTED_DATA_LEN_RANGE, pkcs11.CKR_DATA_INVALID, pkcs11.CKR_DATA_LEN_RANGE):
		return fmt.Errorf("pkcs11 decrypt with %s: not a seed wrapped for this key_id: %w", v.keyID, providers.ErrInvalidCiphertext)
	case isRV(err, pkcs11.CKR_KEY_FUNCTION_NOT_PERMITTED):
		return fmt.Errorf("pkcs11 decrypt: the token refuses key version %s (CKA_DECRYPT false): %w", v.keyID, providers.ErrKeyDisabled)
	}
	return fmt.Errorf("pkcs11 decrypt with %s: %w", v.keyID, classify(err))
}

// setDisabled records an RSA version's enabled state in the state object.
func (p *Provider) setDisabled(h pkcs11.SessionHandle, snap snapshot, n int, disabled bool) error {
	m := snap.meta
	m.Disabled = slices.DeleteFunc(slices.Clone(m.Disabled), func(d int) bool { return d == n })
	if disabled {
		m.Disabled = append(m.Disabled, n)
		slices.Sort(m.Disabled)
	}
	if slices.Equal(m.Disabled, snap.meta.Disabled) {
		return nil
	}
	return p.writeMeta(h, snap, m)
}
