//go:build cgo

package pkcs11

import (
	"crypto/rsa"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/miekg/pkcs11"

	"github.com/kms-v2/kms-plugin/providers"
)

// errNoState: the token has no metadata object for this keyLabel yet.
var errNoState = errors.New("no key state on token")

// metaFormat versions the metadata JSON.
const metaFormat = 1

// meta is the JSON value of the "<keyLabel>.state" CKO_DATA object.
type meta struct {
	Format int `json:"format"`
	// Serial increases with every write. PKCS#11 makes a data object's
	// CKA_VALUE read-only, so a write creates a new object and then removes
	// the old one; a reader that finds both takes the higher serial.
	Serial uint64 `json:"serial"`
	// Primary is n of the primary version "<keyLabel>-<n>".
	Primary int `json:"primary"`
	// HighWater is the largest n ever assigned; the next version gets
	// HighWater+1 even if objects were removed.
	HighWater int `json:"highWater"`
	// Created maps n (decimal) to the version's creation time.
	Created map[string]time.Time `json:"created"`
	// Algorithm is the kind of every version under the key label: empty
	// for AES-256-GCM (states written before the field existed say
	// nothing), or RSA-OAEP-256.
	Algorithm string `json:"algorithm,omitempty"`
	// Disabled lists the disabled RSA versions in ascending order. An RSA
	// version's enabled state lives here and not in CKA_DECRYPT, because
	// tpm2-pkcs11 accepts CKA_DECRYPT false on a private key and then
	// decrypts with it all the same. AES versions keep theirs in
	// CKA_DECRYPT, which SoftHSM2 and HSMs enforce.
	Disabled []int `json:"disabled,omitempty"`
}

// algorithm is the kind the state was written for.
func (m meta) algorithm() string {
	if m.Algorithm == "" {
		return AlgorithmAESGCM
	}
	return m.Algorithm
}

// version is one key object as read from the token.
type version struct {
	n       int
	label   string
	keyID   string
	handle  pkcs11.ObjectHandle
	enabled bool
	created time.Time
	// pub is an RSA version's public key (nil for AES), read at refresh
	// so that Encrypt needs no token call.
	pub *rsa.PublicKey
}

// state is an immutable snapshot of the token's key state, held in the
// provider's KeyCache, so Encrypt reads key, handle and key_id from one
// snapshot.
type state struct {
	byID    map[string]*version
	ordered []*version // by n
	primary *version
}

// snapshot is what one read of the token returned.
type snapshot struct {
	meta meta
	// metaHandles are all state objects found; the writer removes them
	// after creating their successor.
	metaHandles []pkcs11.ObjectHandle
	haveMeta    bool
	keys        []*version // by n
	maxN        int        // largest n among key objects, for stray objects
}

func (p *Provider) metaLabel() string     { return p.cfg.KeyLabel + ".state" }
func (p *Provider) keyLabel(n int) string { return p.cfg.KeyLabel + "-" + strconv.Itoa(n) }
func (p *Provider) keyID(label string) string {
	return providers.KeyID{Backend: "pkcs11", Name: p.cfg.TokenLabel + "/" + label}.String()
}

// parseN returns n for a label "<keyLabel>-<n>" in canonical decimal form.
func (p *Provider) parseN(label string) (int, bool) {
	rest, ok := strings.CutPrefix(label, p.cfg.KeyLabel+"-")
	if !ok || rest == "" || rest[0] == '0' || len(rest) > 9 {
		return 0, false
	}
	n, err := strconv.Atoi(rest)
	if err != nil || n <= 0 || strconv.Itoa(n) != rest {
		return 0, false
	}
	return n, true
}

func findAll(ctx *pkcs11.Ctx, h pkcs11.SessionHandle, tmpl []*pkcs11.Attribute) ([]pkcs11.ObjectHandle, error) {
	if err := ctx.FindObjectsInit(h, tmpl); err != nil {
		return nil, err
	}
	var all []pkcs11.ObjectHandle
	for {
		objs, _, err := ctx.FindObjects(h, 64)
		if err != nil {
			_ = ctx.FindObjectsFinal(h)
			return nil, err
		}
		all = append(all, objs...)
		if len(objs) < 64 {
			break
		}
	}
	return all, ctx.FindObjectsFinal(h)
}

func boolAttr(a *pkcs11.Attribute) bool { return len(a.Value) > 0 && a.Value[0] != 0 }

// ulongAttr decodes a CK_ULONG, which the token returns in host byte order
// and size.
func ulongAttr(a *pkcs11.Attribute) uint64 {
	switch len(a.Value) {
	case 8:
		return binary.NativeEndian.Uint64(a.Value)
	case 4:
		return uint64(binary.NativeEndian.Uint32(a.Value))
	}
	return ^uint64(0)
}

// read loads metadata and key objects in one session.
func (p *Provider) read(h pkcs11.SessionHandle) (snapshot, error) {
	if err := p.tok.requireLogin(h); err != nil {
		return snapshot{}, err
	}
	snap, err := p.readMeta(h)
	if err != nil {
		return snap, err
	}
	if alg := snap.meta.algorithm(); snap.haveMeta && alg != p.cfg.algorithm() {
		return snap, fmt.Errorf("key label %q on token %q holds %s keys, but pkcs11.algorithm is %s; set algorithm: %s or choose another keyLabel: %w",
			p.cfg.KeyLabel, p.cfg.TokenLabel, alg, p.cfg.algorithm(), alg, ErrWrongAlgorithm)
	}
	secrets, err := p.findLabelled(h, pkcs11.CKO_SECRET_KEY)
	if err != nil {
		return snap, err
	}
	privates, err := p.findLabelled(h, pkcs11.CKO_PRIVATE_KEY)
	if err != nil {
		return snap, err
	}
	if err := p.checkOneKind(len(secrets) > 0, len(privates) > 0); err != nil {
		return snap, err
	}
	if p.cfg.rsa() {
		err = p.readRSA(h, &snap, privates)
	} else {
		err = p.readAES(h, &snap, secrets)
	}
	sort.Slice(snap.keys, func(i, j int) bool { return snap.keys[i].n < snap.keys[j].n })
	return snap, err
}

// checkOneKind refuses AES secret keys and RSA key pairs under one key
// label, and objects of the kind the configured algorithm does not use.
func (p *Provider) checkOneKind(haveAES, haveRSA bool) error {
	switch {
	case haveAES && haveRSA:
		return fmt.Errorf("token %q holds both AES secret keys and RSA private keys labelled %s-<n>; one key label holds one kind of key, remove the strays: %w",
			p.cfg.TokenLabel, p.cfg.KeyLabel, ErrUnsafeKey)
	case haveAES && p.cfg.rsa(), haveRSA && !p.cfg.rsa():
		other := map[bool]string{true: AlgorithmAESGCM, false: AlgorithmRSAOAEP}[haveAES]
		return fmt.Errorf("key label %q on token %q holds %s keys, but pkcs11.algorithm is %s; set algorithm: %s or choose another keyLabel: %w",
			p.cfg.KeyLabel, p.cfg.TokenLabel, other, p.cfg.algorithm(), other, ErrWrongAlgorithm)
	}
	return nil
}

// readMeta finds the state object. Normally there is one; two after a
// writer stopped between creating the new one and removing the old. The
// highest serial wins.
func (p *Provider) readMeta(h pkcs11.SessionHandle) (snapshot, error) {
	c := p.tok.mod.ctx
	var snap snapshot
	metas, err := findAll(c, h, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_DATA),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, p.metaLabel()),
	})
	if err != nil {
		return snap, fmt.Errorf("find state object %q: %w", p.metaLabel(), err)
	}
	for _, o := range metas {
		attrs, err := c.GetAttributeValue(h, o, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_VALUE, nil)})
		if err != nil {
			if isRV(err, pkcs11.CKR_OBJECT_HANDLE_INVALID) {
				continue // replaced while we looked
			}
			return snap, fmt.Errorf("read state object %q: %w", p.metaLabel(), err)
		}
		var m meta
		if err := json.Unmarshal(attrs[0].Value, &m); err != nil || m.Format != metaFormat {
			return snap, fmt.Errorf("state object %q on token %q is not format %d JSON (%v); restore it from backup: %w",
				p.metaLabel(), p.cfg.TokenLabel, metaFormat, err, providers.ErrUnavailable)
		}
		snap.metaHandles = append(snap.metaHandles, o)
		if !snap.haveMeta || m.Serial > snap.meta.Serial {
			snap.meta, snap.haveMeta = m, true
		}
	}
	return snap, nil
}

// findLabelled returns the token objects of class whose label is
// "<keyLabel>-<n>", by n.
func (p *Provider) findLabelled(h pkcs11.SessionHandle, class uint) (map[int][]pkcs11.ObjectHandle, error) {
	c := p.tok.mod.ctx
	objs, err := findAll(c, h, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, class),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
	})
	if err != nil {
		return nil, fmt.Errorf("find key objects: %w", err)
	}
	found := map[int][]pkcs11.ObjectHandle{}
	for _, o := range objs {
		la, err := c.GetAttributeValue(h, o, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_LABEL, nil)})
		if err != nil {
			if isRV(err, pkcs11.CKR_OBJECT_HANDLE_INVALID) {
				continue // removed while we looked
			}
			return nil, fmt.Errorf("read key object label: %w", err)
		}
		if n, ok := p.parseN(string(la[0].Value)); ok {
			found[n] = append(found[n], o)
		}
	}
	return found, nil
}

// only returns the one object labelled "<keyLabel>-<n>" in objs.
func (p *Provider) only(objs []pkcs11.ObjectHandle, n int) (pkcs11.ObjectHandle, error) {
	if len(objs) != 1 {
		return 0, fmt.Errorf("%d key objects of one class labelled %q on token %q; remove all but one: %w", len(objs), p.keyLabel(n), p.cfg.TokenLabel, ErrUnsafeKey)
	}
	return objs[0], nil
}

// readAES checks and adds the AES versions.
func (p *Provider) readAES(h pkcs11.SessionHandle, snap *snapshot, secrets map[int][]pkcs11.ObjectHandle) error {
	for n, objs := range secrets {
		o, err := p.only(objs, n)
		if err != nil {
			return err
		}
		v, err := p.aesVersion(h, n, o)
		if err != nil {
			return err
		}
		// A stray object from an interrupted Init has no creation time
		// and shows the zero time.
		v.created = snap.meta.Created[strconv.Itoa(n)]
		snap.keys = append(snap.keys, v)
		snap.maxN = max(snap.maxN, n)
	}
	return nil
}

// aesVersion reads one AES key object and refuses an unsafe one.
func (p *Provider) aesVersion(h pkcs11.SessionHandle, n int, o pkcs11.ObjectHandle) (*version, error) {
	label := p.keyLabel(n)
	a, err := p.tok.mod.ctx.GetAttributeValue(h, o, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, nil),
		pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, nil),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, nil),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, nil),
		pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, nil),
	})
	if err != nil {
		return nil, fmt.Errorf("read attributes of key object %q: %w", label, err)
	}
	switch {
	case ulongAttr(a[0]) != pkcs11.CKK_AES || ulongAttr(a[1]) != 32:
		return nil, fmt.Errorf("key object %q on token %q is not an AES-256 key; remove or relabel it: %w", label, p.cfg.TokenLabel, ErrUnsafeKey)
	case !boolAttr(a[2]):
		return nil, fmt.Errorf("key object %q on token %q is not sensitive (CKA_SENSITIVE false), its value can be read; refusing it, remove it and create keys with kmsctl: %w", label, p.cfg.TokenLabel, ErrUnsafeKey)
	case boolAttr(a[3]):
		return nil, fmt.Errorf("key object %q on token %q is extractable (CKA_EXTRACTABLE true), it can be exported; refusing it, remove it and create keys with kmsctl: %w", label, p.cfg.TokenLabel, ErrUnsafeKey)
	}
	return &version{n: n, label: label, keyID: p.keyID(label), handle: o, enabled: boolAttr(a[4])}, nil
}

// toState checks the snapshot's consistency and indexes it.
func (p *Provider) toState(snap snapshot) (*state, error) {
	if !snap.haveMeta {
		return nil, fmt.Errorf("token %q has no key state for key label %q (no %q object): run `kmsctl keys init`: %w",
			p.cfg.TokenLabel, p.cfg.KeyLabel, p.metaLabel(), errNoState)
	}
	st := &state{byID: map[string]*version{}, ordered: snap.keys}
	for _, v := range snap.keys {
		st.byID[v.keyID] = v
		if v.n == snap.meta.Primary {
			st.primary = v
		}
	}
	switch {
	case st.primary == nil:
		return nil, fmt.Errorf("primary key object %q is missing from token %q; promote another version (kmsctl keys promote) or restore it: %w",
			p.keyLabel(snap.meta.Primary), p.cfg.TokenLabel, providers.ErrKeyNotFound)
	case !st.primary.enabled:
		return nil, fmt.Errorf("primary key object %q on token %q is disabled; enable it or promote another version: %w",
			st.primary.label, p.cfg.TokenLabel, providers.ErrKeyDisabled)
	}
	return st, nil
}

// writeMeta replaces the state object: create the successor, then remove
// the predecessors. Readers never see a moment without one.
func (p *Provider) writeMeta(h pkcs11.SessionHandle, snap snapshot, m meta) error {
	m.Format = metaFormat
	m.Serial = snap.meta.Serial + 1
	b, err := json.Marshal(m)
	if err != nil {
		return err
	}
	if _, err := p.tok.mod.ctx.CreateObject(h, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_DATA),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, p.metaLabel()),
		pkcs11.NewAttribute(pkcs11.CKA_APPLICATION, "kms-plugin"),
		pkcs11.NewAttribute(pkcs11.CKA_VALUE, b),
	}); err != nil {
		return err
	}
	for _, o := range snap.metaHandles {
		if err := p.tok.mod.ctx.DestroyObject(h, o); err != nil && !isRV(err, pkcs11.CKR_OBJECT_HANDLE_INVALID) {
			// The new state is in place; a leftover is harmless (lower
			// serial) and removed by the next write.
			p.logger.Warn("could not remove the previous state object", "token", p.cfg.TokenLabel, "error", err)
		}
	}
	return nil
}

// generate makes key version n inside the token, of the configured kind.
func (p *Provider) generate(h pkcs11.SessionHandle, n int) error {
	if p.cfg.rsa() {
		return p.generateRSA(h, n)
	}
	_, err := p.generateAES(h, n)
	return err
}

// generateAES makes AES key version n inside the token.
func (p *Provider) generateAES(h pkcs11.SessionHandle, n int) (pkcs11.ObjectHandle, error) {
	label := p.keyLabel(n)
	return p.tok.mod.ctx.GenerateKey(h, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)}, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
		pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, 32),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true),
		pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, true),
		pkcs11.NewAttribute(pkcs11.CKA_WRAP, false),
		pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, false),
		pkcs11.NewAttribute(pkcs11.CKA_SIGN, false),
		pkcs11.NewAttribute(pkcs11.CKA_VERIFY, false),
		pkcs11.NewAttribute(pkcs11.CKA_DERIVE, false),
		pkcs11.NewAttribute(pkcs11.CKA_MODIFIABLE, true),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
		pkcs11.NewAttribute(pkcs11.CKA_ID, []byte(label)),
	})
}
