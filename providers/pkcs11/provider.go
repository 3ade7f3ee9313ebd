//go:build cgo

package pkcs11

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/miekg/pkcs11"

	"github.com/kms-v2/kms-plugin/providers"
	"github.com/kms-v2/kms-plugin/providers/secretfile"
)

// Provider wraps seeds with AES-256-GCM keys held in a PKCS#11 token. It
// implements providers.Provider, providers.Rotator and providers.Refresher
// and is safe for concurrent use.
type Provider struct {
	cfg    Config
	tok    *token
	logger hclog.Logger

	keys *providers.KeyCache[*state]
	// unwrapper coalesces identical RSA unwraps and caches their seeds
	// (RSA-OAEP-256 mode only).
	unwrapper *providers.Unwrapper
	// unwrap is the token call behind an RSA Decrypt: tokenUnwrap, or a
	// test's counting wrapper around it.
	unwrap func(ctx context.Context, v *version, ct []byte) ([]byte, error)
	// adminMu serializes this process's read-modify-write of the state
	// object (create, promote). Across processes the operator runs one
	// kmsctl at a time; a primary left disabled by a race is refused by
	// Refresh rather than used.
	adminMu   sync.Mutex
	closeOnce sync.Once
}

var (
	_ providers.Provider  = (*Provider)(nil)
	_ providers.Rotator   = (*Provider)(nil)
	_ providers.Refresher = (*Provider)(nil)
	_ providers.Reporter  = (*Provider)(nil)
)

// readPIN reads the PIN file, which only its owner may read: a PIN
// readable by other local users is a PIN given away. The line ending an
// editor leaves is not part of the PIN.
func readPIN(path string) (string, error) {
	b, err := secretfile.Read("pkcs11.pinFile", path)
	if err != nil {
		return "", err
	}
	return strings.TrimRight(string(b), "\r\n"), nil
}

// open validates cfg, reads the PIN and attaches to the token, without
// reading key state.
func open(cfg Config, logger hclog.Logger) (*Provider, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if logger == nil {
		logger = hclog.NewNullLogger()
	}
	pin, err := readPIN(cfg.PinFile)
	if err != nil {
		return nil, err
	}
	mod, err := openModule(cfg.Module)
	if err != nil {
		return nil, err
	}
	p := &Provider{cfg: cfg, logger: logger}
	p.tok = newToken(mod, cfg, pin, logger)
	p.keys = providers.NewKeyCache(p.load, p.published)
	if cfg.rsa() {
		p.unwrapper = providers.NewUnwrapper(cfg.unwrapOptions())
		p.unwrap = p.tokenUnwrap
	}
	return p, nil
}

// aesMechanisms are what AES-256-GCM mode needs from the token.
var aesMechanisms = []mechanism{
	{pkcs11.CKM_AES_GCM, "CKM_AES_GCM", pkcs11.CKF_ENCRYPT | pkcs11.CKF_DECRYPT},
	{pkcs11.CKM_AES_KEY_GEN, "CKM_AES_KEY_GEN", pkcs11.CKF_GENERATE},
}

// mechanisms returns what the configured algorithm needs from the token,
// and what to tell an operator whose token lacks it.
func (p *Provider) mechanisms() ([]mechanism, string) {
	if p.cfg.rsa() {
		return rsaMechanisms, "pkcs11.algorithm " + AlgorithmRSAOAEP + " needs RSA-OAEP decryption and RSA key-pair generation in the token"
	}
	return aesMechanisms, "pkcs11.algorithm " + AlgorithmAESGCM + " needs AES-GCM and AES key generation in the token; a token without AES-GCM, such as a TPM, works with algorithm: " + AlgorithmRSAOAEP
}

// New attaches to the token, logs in and loads the key state. It fails if
// the token holds no key for cfg.KeyLabel yet ("run `kmsctl keys init`"),
// if the PIN is wrong (ErrPermissionDenied), or if a key object could leave
// the token (ErrUnsafeKey).
func New(ctx context.Context, cfg Config, logger hclog.Logger) (*Provider, error) {
	p, err := open(cfg, logger)
	if err != nil {
		return nil, err
	}
	if err := p.Refresh(ctx); err != nil {
		p.Close()
		return nil, fmt.Errorf("pkcs11: %w", err)
	}
	if err := p.tok.checkMechanisms(p.mechanisms()); err != nil {
		p.Close()
		return nil, fmt.Errorf("pkcs11: %w", err)
	}
	return p, nil
}

// Init creates the first key version on the token and makes it primary. It
// fails with ErrRefused if the token already has key state for
// cfg.KeyLabel. Leftover key objects without state (from an interrupted
// Init) are kept and their numbers skipped.
func Init(ctx context.Context, cfg Config, logger hclog.Logger) (providers.KeyVersion, error) {
	p, err := open(cfg, logger)
	if err != nil {
		return providers.KeyVersion{}, err
	}
	defer p.Close()
	var kv providers.KeyVersion
	err = p.tok.doRW(ctx, func(h pkcs11.SessionHandle) error {
		snap, err := p.read(h)
		if err != nil {
			return err
		}
		if snap.haveMeta {
			return fmt.Errorf("token %q already has key state for %q (primary %s): use `kmsctl keys create` to add a version: %w",
				cfg.TokenLabel, cfg.KeyLabel, p.keyID(p.keyLabel(snap.meta.Primary)), providers.ErrRefused)
		}
		if err := p.tok.checkMechanismsHeld(p.mechanisms()); err != nil {
			return err
		}
		n := snap.maxN + 1
		now := time.Now().UTC().Truncate(time.Second)
		// The key first, then the state naming it: if we stop in between,
		// the next Init skips the orphan's number instead of finding a
		// state whose primary does not exist.
		if err := p.generate(h, n); err != nil {
			return fmt.Errorf("generate key %q: %w", p.keyLabel(n), err)
		}
		m := meta{Format: metaFormat, Primary: n, HighWater: n, Created: map[string]time.Time{strconv.Itoa(n): now}}
		if p.cfg.rsa() {
			m.Algorithm = AlgorithmRSAOAEP
		}
		if err := p.writeMeta(h, snap, m); err != nil {
			return fmt.Errorf("create state object %q: %w", p.metaLabel(), err)
		}
		kv = providers.KeyVersion{KeyID: p.keyID(p.keyLabel(n)), State: providers.StatePrimary, Created: now}
		return nil
	})
	if err != nil {
		return providers.KeyVersion{}, fmt.Errorf("pkcs11 init: %w", classify(err))
	}
	p.logger.Info("created first key version", "key_id", kv.KeyID)
	return kv, nil
}

// Refresh reloads the key state from the token; concurrent calls share one
// read. On failure the previous state stays in use (so a token hiccup does
// not stop Decrypt with cached handles) and the error is returned for
// health reporting.
func (p *Provider) Refresh(ctx context.Context) error {
	return p.keys.Refresh(ctx)
}

// load is the KeyCache's load: one read of the token, checked.
func (p *Provider) load(ctx context.Context) (*state, error) {
	if err := p.freshen(ctx); err != nil {
		return nil, fmt.Errorf("refresh: %w", err)
	}
	var snap snapshot
	err := p.tok.do(ctx, func(h pkcs11.SessionHandle) error {
		var err error
		snap, err = p.read(h)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("refresh: %w", classify(err))
	}
	st, err := p.toState(snap)
	if err != nil {
		return nil, fmt.Errorf("refresh: %w", err)
	}
	return st, nil
}

// freshen makes the module see what other processes changed on the token
// since this call began (a no-op for modules that see it anyway; see
// module.staleObjects). Everything that reads key state calls it first.
func (p *Provider) freshen(ctx context.Context) error {
	return p.tok.mod.reinit(ctx, time.Now())
}

// published logs the primary when it is first known or changes.
func (p *Provider) published(old, st *state) {
	if old == nil || old.primary.keyID != st.primary.keyID {
		p.logger.Info("primary key version", "key_id", st.primary.keyID, "versions", len(st.ordered))
	}
}

func (p *Provider) current() (*state, error) {
	st, err := p.keys.Current()
	if err != nil {
		return nil, fmt.Errorf("pkcs11: %w", err)
	}
	return st, nil
}

// Stats reports the primary's creation time (kept in the token's metadata
// object; zero for a version made before it was kept), and the key state
// and, for RSA keys, seed caches' lookups.
func (p *Provider) Stats() providers.Stats {
	st := providers.Stats{Caches: []providers.CacheStats{p.keys.Stats()}}
	if p.unwrapper != nil {
		st.Caches = append(st.Caches, p.unwrapper.Stats())
	}
	if snap, err := p.current(); err == nil && snap.primary != nil {
		st.PrimaryCreated = snap.primary.created
	}
	return st
}

// PrimaryKeyID returns the key_id of the cached primary version.
func (p *Provider) PrimaryKeyID(ctx context.Context) (string, error) {
	st, err := p.current()
	if err != nil {
		return "", err
	}
	return st.primary.keyID, nil
}

func isRV(err error, codes ...uint) bool {
	e, ok := rv(err)
	if !ok {
		return false
	}
	for _, c := range codes {
		if uint(e) == c {
			return true
		}
	}
	return false
}

// handleGone reports a key object that vanished or was replaced since the
// last refresh.
func handleGone(err error) bool {
	return isRV(err, pkcs11.CKR_OBJECT_HANDLE_INVALID, pkcs11.CKR_KEY_HANDLE_INVALID)
}

// Encrypt wraps a 32-byte seed with the primary key version.
func (p *Provider) Encrypt(ctx context.Context, plaintext []byte) (providers.Sealed, error) {
	if len(plaintext) != providers.SeedSize {
		return providers.Sealed{}, fmt.Errorf("pkcs11 encrypt: plaintext of %d bytes, want the apiserver's %d-byte seed: %w", len(plaintext), providers.SeedSize, providers.ErrInvalidInput)
	}
	if p.cfg.rsa() {
		st, err := p.current()
		if err != nil {
			return providers.Sealed{}, err
		}
		ct, err := p.sealRSA(st.primary, plaintext)
		return providers.Sealed{KeyID: st.primary.keyID, Ciphertext: ct}, err
	}
	for attempt := 0; ; attempt++ {
		st, err := p.current()
		if err != nil {
			return providers.Sealed{}, err
		}
		v := st.primary
		ct, err := p.seal(ctx, v, plaintext)
		if err == nil {
			return providers.Sealed{KeyID: v.keyID, Ciphertext: ct}, nil
		}
		if handleGone(err) && attempt == 0 {
			// Reload: a refresh in flight may have read the token before
			// the object changed.
			if rerr := p.keys.Reload(ctx); rerr == nil {
				continue
			}
		}
		switch {
		case handleGone(err):
			return providers.Sealed{}, fmt.Errorf("pkcs11 encrypt with %s: key object gone from the token: %w", v.keyID, providers.ErrKeyNotFound)
		case isRV(err, pkcs11.CKR_KEY_FUNCTION_NOT_PERMITTED):
			return providers.Sealed{}, fmt.Errorf("pkcs11 encrypt with %s: %w", v.keyID, providers.ErrKeyDisabled)
		}
		return providers.Sealed{}, fmt.Errorf("pkcs11 encrypt with %s: %w", v.keyID, classify(err))
	}
}

func (p *Provider) seal(ctx context.Context, v *version, plaintext []byte) ([]byte, error) {
	var out []byte
	err := p.tok.do(ctx, func(h pkcs11.SessionHandle) error {
		iv := make([]byte, ivSize)
		if _, err := rand.Read(iv); err != nil {
			return err
		}
		params := pkcs11.NewGCMParams(iv, aad(v.keyID), tagSize*8)
		defer params.Free()
		if err := p.tok.mod.ctx.EncryptInit(h, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, params)}, v.handle); err != nil {
			return err
		}
		ct, err := p.tok.mod.ctx.Encrypt(h, plaintext)
		if err != nil {
			return err
		}
		// Some tokens ignore the caller's IV and choose their own; store
		// the one actually used.
		if used := params.IV(); len(used) == ivSize {
			iv = used
		}
		if len(ct) != providers.SeedSize+tagSize {
			return fmt.Errorf("token returned %d bytes of AES-GCM output, want %d: %w", len(ct), providers.SeedSize+tagSize, providers.ErrUnavailable)
		}
		out = frame(iv, ct)
		return nil
	})
	return out, err
}

// errAuthFailed marks a C_Decrypt that failed on the input, not the token.
var errAuthFailed = errors.New("AES-GCM authentication failed")

// lookup returns the version named by keyID, refreshing once if it is not
// known yet (another instance may have just created it). A key_id this
// provider could never have made gets no refresh, so garbage key_ids cannot
// make us hammer the token.
func (p *Provider) lookup(ctx context.Context, keyID string) (*version, error) {
	if err := p.own(keyID); err != nil {
		return nil, err
	}
	v, ok, err := providers.LookupVersion(ctx, p.keys, func(st *state) (*version, bool) {
		v, ok := st.byID[keyID]
		return v, ok
	})
	switch {
	case err != nil:
		return nil, err
	case !ok:
		return nil, fmt.Errorf("key_id %q: no such key object on token %q: %w", keyID, p.cfg.TokenLabel, providers.ErrKeyNotFound)
	}
	return v, nil
}

// own checks that keyID is a name this provider could have made: backend
// pkcs11, this token, and a label "<keyLabel>-<n>".
func (p *Provider) own(keyID string) error {
	id, err := providers.ParseKeyID(keyID)
	if err != nil {
		return err
	}
	if id.Backend != "pkcs11" {
		return fmt.Errorf("key_id %q belongs to backend %q, not pkcs11: %w", keyID, id.Backend, providers.ErrKeyNotFound)
	}
	tokenLabel, label, _ := strings.Cut(id.Name, "/")
	if _, ok := p.parseN(label); !ok || tokenLabel != p.cfg.TokenLabel {
		return fmt.Errorf("key_id %q is not a version of %s on token %q: %w", keyID, p.cfg.KeyLabel, p.cfg.TokenLabel, providers.ErrKeyNotFound)
	}
	return nil
}

// Owns reports whether keyID names a version of this provider's key label
// on its token, without touching the token.
func (p *Provider) Owns(keyID string) bool { return p.own(keyID) == nil }

// Decrypt unwraps a seed with the version named by s.KeyID.
func (p *Provider) Decrypt(ctx context.Context, s providers.Sealed) ([]byte, error) {
	if p.cfg.rsa() {
		return p.decryptRSA(ctx, s)
	}
	for attempt := 0; ; attempt++ {
		v, err := p.lookup(ctx, s.KeyID)
		if err != nil {
			return nil, fmt.Errorf("pkcs11 decrypt: %w", err)
		}
		// A version cached as disabled is still tried: the token enforces
		// CKA_DECRYPT, so its answer is current even when our cache is not.
		iv, ct, err := unframe(s.Ciphertext)
		if err != nil {
			return nil, fmt.Errorf("pkcs11 decrypt with %s: %w", v.keyID, err)
		}
		var pt []byte
		err = p.tok.do(ctx, func(h pkcs11.SessionHandle) error {
			params := pkcs11.NewGCMParams(iv, aad(v.keyID), tagSize*8)
			defer params.Free()
			if err := p.tok.mod.ctx.DecryptInit(h, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, params)}, v.handle); err != nil {
				return err
			}
			var err error
			pt, err = p.tok.mod.ctx.Decrypt(h, ct)
			if isRV(err, pkcs11.CKR_GENERAL_ERROR) {
				// SoftHSM2 reports a failed GCM tag check as
				// CKR_GENERAL_ERROR. If the session still answers, the
				// token is fine and the input was at fault.
				if _, serr := p.tok.mod.ctx.GetSessionInfo(h); serr == nil {
					return errAuthFailed
				}
			}
			return err
		})
		switch {
		case err == nil && !v.enabled:
			// The token allowed a version our cache calls disabled: it was
			// re-enabled elsewhere, or the token does not enforce
			// CKA_DECRYPT. Fresh state decides: Reload, since a refresh in
			// flight may predate the change.
			if rerr := p.keys.Reload(ctx); rerr != nil {
				return nil, fmt.Errorf("pkcs11 decrypt: key version %s is disabled: %w", v.keyID, providers.ErrKeyDisabled)
			}
			if st, _ := p.current(); st == nil || st.byID[v.keyID] == nil || !st.byID[v.keyID].enabled {
				return nil, fmt.Errorf("pkcs11 decrypt: key version %s is disabled: %w", v.keyID, providers.ErrKeyDisabled)
			}
			return pt, nil
		case err == nil:
			if len(pt) != providers.SeedSize {
				return nil, fmt.Errorf("pkcs11 decrypt with %s: plaintext of %d bytes: %w", v.keyID, len(pt), providers.ErrInvalidCiphertext)
			}
			return pt, nil
		case handleGone(err) && attempt == 0:
			if rerr := p.keys.Reload(ctx); rerr != nil {
				return nil, fmt.Errorf("pkcs11 decrypt with %s: key object changed and refresh failed: %w", v.keyID, rerr)
			}
			continue
		case handleGone(err):
			return nil, fmt.Errorf("pkcs11 decrypt with %s: key object gone from the token: %w", v.keyID, providers.ErrKeyNotFound)
		case errors.Is(err, errAuthFailed) || isRV(err, pkcs11.CKR_ENCRYPTED_DATA_INVALID, pkcs11.CKR_ENCRYPTED_DATA_LEN_RANGE, pkcs11.CKR_DATA_INVALID,
			pkcs11.CKR_DATA_LEN_RANGE):
			return nil, fmt.Errorf("pkcs11 decrypt with %s: authentication failed: %w", v.keyID, providers.ErrInvalidCiphertext)
		case isRV(err, pkcs11.CKR_KEY_FUNCTION_NOT_PERMITTED):
			// Disabled by another process since our last refresh.
			return nil, fmt.Errorf("pkcs11 decrypt: key version %s is disabled on the token: %w", v.keyID, providers.ErrKeyDisabled)
		}
		return nil, fmt.Errorf("pkcs11 decrypt with %s: %w", v.keyID, classify(err))
	}
}

// Check is the health probe: it looks the primary key object up on the
// token, which needs a working session and login, and refreshes the state
// if the object changed. In RSA mode it also has the token unwrap a test
// value with the primary: Encrypt never reaches the token, and on a TPM
// finding objects does not reach the chip either.
func (p *Provider) Check(ctx context.Context) error {
	st, err := p.current()
	if err != nil {
		return err
	}
	var found []pkcs11.ObjectHandle
	class := uint(pkcs11.CKO_SECRET_KEY)
	if p.cfg.rsa() {
		class = pkcs11.CKO_PRIVATE_KEY
	}
	err = p.tok.do(ctx, func(h pkcs11.SessionHandle) error {
		if err := p.tok.requireLogin(h); err != nil {
			return err
		}
		var err error
		found, err = findAll(p.tok.mod.ctx, h, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, class),
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
			pkcs11.NewAttribute(pkcs11.CKA_LABEL, st.primary.label),
		})
		if err == nil && p.cfg.rsa() && len(found) == 1 && found[0] == st.primary.handle {
			err = p.selfTest(h, st.primary)
		}
		return err
	})
	if err != nil {
		return fmt.Errorf("pkcs11 check: %w", classify(err))
	}
	if len(found) != 1 || found[0] != st.primary.handle {
		if err := p.Refresh(ctx); err != nil {
			return fmt.Errorf("pkcs11 check: primary key object %q: %w", st.primary.label, err)
		}
	}
	return nil
}

// Close releases the sessions and the module reference.
func (p *Provider) Close() error {
	p.closeOnce.Do(func() {
		if p.unwrapper != nil {
			p.unwrapper.Purge()
		}
		p.tok.close()
		p.tok.mod.release()
	})
	return nil
}

// Versions lists every key version on the token, oldest first, as read from
// the token now.
func (p *Provider) Versions(ctx context.Context) ([]providers.KeyVersion, error) {
	if err := p.keys.Reload(ctx); err != nil {
		return nil, fmt.Errorf("pkcs11 versions: %w", err)
	}
	st, err := p.current()
	if err != nil {
		return nil, err
	}
	return providers.ListVersions(st.ordered, st.primary, func(v *version) (string, bool, time.Time) {
		return v.keyID, v.enabled, v.created
	}), nil
}

// CreateVersion generates a new enabled, non-primary version. Its number is
// reserved in the state object before the key is generated, so it is never
// handed out twice even if the key object is later removed; a try that
// failed on a busy store (see module.retryBusy) therefore leaves at most an
// unused number and a lone half of a key pair, which is no version.
func (p *Provider) CreateVersion(ctx context.Context) (providers.KeyVersion, error) {
	p.adminMu.Lock()
	defer p.adminMu.Unlock()
	var kv providers.KeyVersion
	err := p.tok.mod.retryBusy(ctx, func() error {
		var err error
		kv, err = p.createVersion(ctx)
		return err
	})
	if err != nil {
		return providers.KeyVersion{}, fmt.Errorf("pkcs11 create version: %w", err)
	}
	p.logger.Info("created key version", "key_id", kv.KeyID)
	// Reload, not Refresh: a refresh in flight may predate the write.
	if err := p.keys.Reload(ctx); err != nil {
		return kv, fmt.Errorf("pkcs11 create version %s: created, but %w", kv.KeyID, err)
	}
	return kv, nil
}

// createVersion is one try of CreateVersion, on freshly read token state.
func (p *Provider) createVersion(ctx context.Context) (providers.KeyVersion, error) {
	if err := p.freshen(ctx); err != nil {
		return providers.KeyVersion{}, err
	}
	var kv providers.KeyVersion
	err := p.tok.doRW(ctx, func(h pkcs11.SessionHandle) error {
		snap, err := p.read(h)
		if err != nil {
			return err
		}
		if _, err := p.toState(snap); err != nil {
			return err
		}
		n := max(snap.meta.HighWater, snap.maxN) + 1
		now := time.Now().UTC().Truncate(time.Second)
		m := snap.meta
		m.HighWater = n
		m.Created = make(map[string]time.Time, len(snap.meta.Created)+1)
		for k, t := range snap.meta.Created {
			m.Created[k] = t
		}
		m.Created[strconv.Itoa(n)] = now
		if err := p.writeMeta(h, snap, m); err != nil {
			return fmt.Errorf("reserve version %d in %q: %w", n, p.metaLabel(), err)
		}
		if err := p.generate(h, n); err != nil {
			return fmt.Errorf("generate key %q: %w", p.keyLabel(n), err)
		}
		kv = providers.KeyVersion{KeyID: p.keyID(p.keyLabel(n)), State: providers.StateEnabled, Created: now}
		return nil
	})
	return kv, classify(err)
}

// mutate runs fn on fresh token state for the version named keyID.
func (p *Provider) mutate(ctx context.Context, op, keyID string, fn func(h pkcs11.SessionHandle, snap snapshot, st *state, v *version) error) error {
	p.adminMu.Lock()
	defer p.adminMu.Unlock()
	err := p.tok.mod.retryBusy(ctx, func() error { return p.mutateOnce(ctx, keyID, fn) })
	if err != nil {
		if !errors.Is(err, providers.ErrRefused) && !errors.Is(err, providers.ErrKeyNotFound) && !errors.Is(err, providers.ErrKeyDisabled) {
			err = classify(err)
		}
		return fmt.Errorf("pkcs11 %s %s: %w", op, keyID, err)
	}
	p.logger.Info("key version "+op+"d", "key_id", keyID)
	// Reload, not Refresh: a refresh in flight may predate the write.
	if err := p.keys.Reload(ctx); err != nil {
		return fmt.Errorf("pkcs11 %s %s: done, but %w", op, keyID, err)
	}
	return nil
}

// mutateOnce is one try of mutate, on freshly read token state.
func (p *Provider) mutateOnce(ctx context.Context, keyID string, fn func(h pkcs11.SessionHandle, snap snapshot, st *state, v *version) error) error {
	if err := p.freshen(ctx); err != nil {
		return err
	}
	return p.tok.doRW(ctx, func(h pkcs11.SessionHandle) error {
		snap, err := p.read(h)
		if err != nil {
			return err
		}
		st, err := p.toState(snap)
		if err != nil {
			return err
		}
		v, ok := st.byID[keyID]
		if !ok {
			return fmt.Errorf("key_id %q: no such key object on token %q: %w", keyID, p.cfg.TokenLabel, providers.ErrKeyNotFound)
		}
		return fn(h, snap, st, v)
	})
}

// Promote makes an enabled version the primary, by rewriting the state
// object every instance reads.
func (p *Provider) Promote(ctx context.Context, keyID string) error {
	return p.mutate(ctx, "promote", keyID, func(h pkcs11.SessionHandle, snap snapshot, st *state, v *version) error {
		if !v.enabled {
			return fmt.Errorf("version is disabled; enable it first: %w", providers.ErrRefused)
		}
		if v == st.primary {
			return nil
		}
		m := snap.meta
		m.Primary = v.n
		return p.writeMeta(h, snap, m)
	})
}

// Disable stops a non-primary version from decrypting. An AES version gets
// CKA_ENCRYPT and CKA_DECRYPT false, so the token itself refuses it to
// every process at once. An RSA version is listed as disabled in the state
// object (see meta.Disabled): this process refuses it now, other plugin
// instances from their next Refresh, and the token does not enforce it.
func (p *Provider) Disable(ctx context.Context, keyID string) error {
	return p.mutate(ctx, "disable", keyID, func(h pkcs11.SessionHandle, snap snapshot, st *state, v *version) error {
		if v == st.primary {
			return fmt.Errorf("the primary cannot be disabled; promote another version first: %w", providers.ErrRefused)
		}
		return p.setUsable(h, snap, v, false)
	})
}

// Enable lets a disabled version decrypt again.
func (p *Provider) Enable(ctx context.Context, keyID string) error {
	return p.mutate(ctx, "enable", keyID, func(h pkcs11.SessionHandle, snap snapshot, _ *state, v *version) error {
		return p.setUsable(h, snap, v, true)
	})
}

func (p *Provider) setUsable(h pkcs11.SessionHandle, snap snapshot, v *version, on bool) error {
	if p.cfg.rsa() {
		return p.setDisabled(h, snap, v.n, !on)
	}
	return p.tok.mod.ctx.SetAttributeValue(h, v.handle, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, on),
		pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, on),
	})
}
