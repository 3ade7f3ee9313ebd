//go:build cgo

package pkcs11

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"

	"github.com/hashicorp/go-hclog"
	"github.com/miekg/pkcs11"

	"github.com/kms-v2/kms-plugin/providers"
)

// token is a bounded pool of logged-in sessions on the token with one label.
// It recovers from the failures HSMs report in practice: a session closed
// under us, a lost login, a device that went away and came back (possibly
// in another slot). Safe for concurrent use.
type token struct {
	mod   *module
	label string
	pin   string
	// userType is the role C_Login logs in as (pkcs11.userType, default
	// filled in).
	userType string
	logger   hclog.Logger
	// sem holds one value per session in use; its capacity bounds the pool.
	sem chan struct{}

	mu       sync.Mutex
	slot     uint
	haveSlot bool
	loggedIn bool
	// open counts this token's open sessions: PKCS#11 ends an
	// application's login when its last session closes.
	open int
	// gen counts resets; sessions opened before the latest reset are closed
	// when they come back instead of being reused.
	gen uint64
	// modGen is the module generation the sessions, login and slot belong
	// to; see module.reinit.
	modGen uint64
	idle   []session
	closed bool
	// pinErr is sticky: a rejected PIN is never tried again, because HSMs
	// lock the user after a few failed logins.
	pinErr error
}

// session is one open session. Pooled sessions are read-only: serving
// (wrap, unwrap, reading key state) writes nothing, so the plugin never
// holds a session that could create or change an object. Writes (Init,
// CreateVersion, Promote, Disable, Enable) each open a read/write session
// of their own, closed afterwards.
type session struct {
	h   pkcs11.SessionHandle
	gen uint64
	rw  bool
}

// ckuCryptoUser is Thales Luna's CKU_CRYPTO_USER (CKU_LIMITED_USER).
const ckuCryptoUser = 0x80000001

// loginType is the C_Login user type a pkcs11.userType names.
func loginType(userType string) uint {
	if userType == UserTypeCryptoUser {
		return ckuCryptoUser
	}
	return pkcs11.CKU_USER
}

func newToken(mod *module, cfg Config, pin string, logger hclog.Logger) *token {
	return &token{mod: mod, label: cfg.TokenLabel, pin: pin, userType: cfg.userType(),
		logger: logger, sem: make(chan struct{}, cfg.sessions())}
}

// errKind says how the pool reacts to a PKCS#11 return value.
type errKind int

const (
	kindOther      errKind = iota // pass to the caller
	kindSession                   // this session is unusable: drop it, retry on a new one
	kindLoggedOut                 // log in again, retry
	kindDeviceLost                // every session is gone: rediscover the slot, retry
)

func rv(err error) (pkcs11.Error, bool) {
	var e pkcs11.Error
	ok := errors.As(err, &e)
	return e, ok
}

func kindOf(err error) errKind {
	e, ok := rv(err)
	if !ok {
		return kindOther
	}
	switch e {
	case pkcs11.CKR_SESSION_HANDLE_INVALID, pkcs11.CKR_SESSION_CLOSED, pkcs11.CKR_OPERATION_ACTIVE,
		pkcs11.CKR_OPERATION_NOT_INITIALIZED:
		return kindSession
	case pkcs11.CKR_USER_NOT_LOGGED_IN:
		return kindLoggedOut
	case pkcs11.CKR_DEVICE_REMOVED, pkcs11.CKR_TOKEN_NOT_PRESENT, pkcs11.CKR_SLOT_ID_INVALID,
		pkcs11.CKR_DEVICE_ERROR, pkcs11.CKR_TOKEN_NOT_RECOGNIZED:
		return kindDeviceLost
	}
	return kindOther
}

// classify maps a PKCS#11 error that no retry fixed to a provider sentinel.
// Operation-specific codes (a bad tag, a disabled key) are mapped by the
// caller before it falls back to this.
func classify(err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, providers.ErrUnavailable) || errors.Is(err, providers.ErrPermissionDenied) {
		return err
	}
	e, ok := rv(err)
	if !ok {
		return err
	}
	switch e {
	case pkcs11.CKR_PIN_INCORRECT, pkcs11.CKR_PIN_LOCKED, pkcs11.CKR_PIN_EXPIRED, pkcs11.CKR_PIN_INVALID,
		pkcs11.CKR_PIN_LEN_RANGE:
		return fmt.Errorf("%w: %w", err, providers.ErrPermissionDenied)
	}
	return fmt.Errorf("%w: %w", err, providers.ErrUnavailable)
}

// spoiledError carries an error after which the session must not be used
// again. tpm2-pkcs11 1.9 leaves a failed C_Decrypt's operation active
// instead of ending it as PKCS#11 requires, so that session's next
// C_DecryptInit would fail with CKR_OPERATION_ACTIVE.
type spoiledError struct{ err error }

func (e spoiledError) Error() string { return e.err.Error() }
func (e spoiledError) Unwrap() error { return e.err }

// spoiled marks err (if not nil) as leaving its session unusable.
func spoiled(err error) error {
	if err == nil {
		return nil
	}
	return spoiledError{err}
}

// do runs fn on a logged-in read-only session of its own. When fn fails
// because the session, the login or the device was lost, do repairs that
// and runs fn once more; fn must therefore be safe to repeat. Other errors
// come back as fn returned them; a session fn reports spoiled is closed,
// not reused. The module cannot restart (reinit) while fn runs, so fn must
// not wait for anything that does.
func (t *token) do(ctx context.Context, fn func(h pkcs11.SessionHandle) error) error {
	return t.run(ctx, false, fn)
}

// doRW is do on a new read/write session, for the calls that create,
// change or destroy objects.
func (t *token) doRW(ctx context.Context, fn func(h pkcs11.SessionHandle) error) error {
	return t.run(ctx, true, fn)
}

func (t *token) run(ctx context.Context, rw bool, fn func(h pkcs11.SessionHandle) error) error {
	select {
	case t.sem <- struct{}{}:
	case <-ctx.Done():
		return fmt.Errorf("waiting for a PKCS#11 session on token %q: %w", t.label, ctx.Err())
	}
	defer func() { <-t.sem }()
	t.mod.use.RLock()
	defer t.mod.use.RUnlock()
	var err error
	for attempt := 0; attempt < 2; attempt++ {
		var s session
		if s, err = t.get(rw); err != nil {
			if kindOf(err) == kindDeviceLost && attempt == 0 {
				continue
			}
			return classify(err)
		}
		var again bool
		if again, err = t.settle(s, fn(s.h)); !again {
			return err
		}
	}
	return classify(err)
}

// settle returns session s to the pool after fn returned err, or repairs
// what err says was lost; again reports whether fn should run once more.
func (t *token) settle(s session, err error) (again bool, _ error) {
	isSpoiled := errors.As(err, new(spoiledError))
	switch kindOf(err) {
	case kindOther:
		t.release(s, isSpoiled)
		return false, err
	case kindSession:
		t.logger.Debug("pkcs11 session lost; opening another", "token", t.label, "error", err)
		t.discard(s)
	case kindLoggedOut:
		t.logger.Info("pkcs11 login lost; logging in again", "token", t.label)
		if lerr := t.login(s.h); lerr != nil {
			t.discard(s)
			return false, lerr
		}
		t.release(s, isSpoiled)
	case kindDeviceLost:
		t.logger.Warn("pkcs11 token lost; reopening", "token", t.label, "error", err)
		t.discard(s)
		t.reset(s.gen)
	}
	return true, err
}

// release puts a session back, or closes it if spoiled.
func (t *token) release(s session, spoiled bool) {
	if spoiled {
		t.discard(s)
		return
	}
	t.put(s)
}

// get returns an idle read-only session or opens (and if needed logs in) a
// new one; with rw, always a new read/write session.
func (t *token) get(rw bool) (session, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return session{}, fmt.Errorf("pkcs11 provider for token %q is closed: %w", t.label, providers.ErrUnavailable)
	}
	if t.pinErr != nil {
		return session{}, t.pinErr
	}
	t.syncModuleLocked()
	if n := len(t.idle); n > 0 && !rw {
		s := t.idle[n-1]
		t.idle = t.idle[:n-1]
		return s, nil
	}
	if !t.haveSlot {
		slot, err := t.findSlot()
		if err != nil {
			return session{}, err
		}
		t.slot, t.haveSlot = slot, true
	}
	flags := uint(pkcs11.CKF_SERIAL_SESSION)
	if rw {
		flags |= pkcs11.CKF_RW_SESSION
	}
	h, err := t.mod.ctx.OpenSession(t.slot, flags)
	if err != nil {
		if kindOf(err) == kindDeviceLost {
			t.resetLocked()
		}
		return session{}, fmt.Errorf("open session on token %q: %w", t.label, err)
	}
	t.open++
	s := session{h: h, gen: t.gen, rw: rw}
	if !t.loggedIn {
		if err := t.loginLocked(h); err != nil {
			t.closeLocked(h)
			return session{}, err
		}
	}
	return s, nil
}

// syncModuleLocked forgets the sessions, login and slot of an older
// module generation without closing them: they ended with that C_Finalize,
// and their handle numbers may now belong to new sessions. The caller holds
// t.mu and the module's use lock.
func (t *token) syncModuleLocked() {
	if t.modGen == t.mod.gen {
		return
	}
	t.modGen = t.mod.gen
	t.idle = nil
	t.open = 0
	t.gen++
	t.haveSlot = false
	t.loggedIn = false
}

func (t *token) login(h pkcs11.SessionHandle) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.loginLocked(h)
}

func (t *token) loginLocked(h pkcs11.SessionHandle) error {
	if t.pinErr != nil {
		return t.pinErr
	}
	err := t.mod.ctx.Login(h, loginType(t.userType), t.pin)
	if isRV(err, pkcs11.CKR_USER_TYPE_INVALID) {
		// Never retried either: the token has no such role.
		t.pinErr = fmt.Errorf("login to token %q: the token has no %s role (CKR_USER_TYPE_INVALID); set pkcs11.userType to %s, or to a role this HSM offers: %w",
			t.label, t.userType, UserTypeUser, providers.ErrPermissionDenied)
		return t.pinErr
	}
	if err != nil && !errors.Is(err, pkcs11.Error(pkcs11.CKR_USER_ALREADY_LOGGED_IN)) {
		err = classify(err)
		if errors.Is(err, providers.ErrPermissionDenied) {
			// Never retried; see pinErr.
			t.pinErr = fmt.Errorf("login to token %q: the PIN from the pin file was rejected (%v); not retrying so the token does not lock; fix the pin file and restart: %w",
				t.label, unwrapRV(err), providers.ErrPermissionDenied)
			return t.pinErr
		}
		return fmt.Errorf("login to token %q: %w", t.label, err)
	}
	t.loggedIn = true
	return nil
}

func unwrapRV(err error) error {
	if e, ok := rv(err); ok {
		return e
	}
	return err
}

// findSlot returns the one slot whose token has t.label.
func (t *token) findSlot() (uint, error) {
	slots, err := t.mod.ctx.GetSlotList(true)
	if err != nil {
		return 0, fmt.Errorf("list slots of %s: %w", t.mod.path, classify(err))
	}
	var found []uint
	var labels []string
	for _, s := range slots {
		info, err := t.mod.ctx.GetTokenInfo(s)
		if err != nil {
			continue
		}
		l := strings.TrimRight(info.Label, " \x00")
		labels = append(labels, fmt.Sprintf("%q", l))
		if l != t.label {
			continue
		}
		if info.Flags&pkcs11.CKF_USER_PIN_LOCKED != 0 {
			return 0, fmt.Errorf("token %q: the user PIN is locked; unlock it with the SO PIN: %w", t.label, providers.ErrPermissionDenied)
		}
		if info.Flags&pkcs11.CKF_USER_PIN_INITIALIZED == 0 {
			return 0, fmt.Errorf("token %q has no user PIN yet; initialize one (softhsm2-util --init-token ... --pin): %w", t.label, providers.ErrPermissionDenied)
		}
		found = append(found, s)
	}
	switch len(found) {
	case 0:
		have := "none"
		if len(labels) > 0 {
			have = strings.Join(labels, ", ")
		}
		return 0, fmt.Errorf("no token labelled %q in module %s (tokens present: %s); check pkcs11.tokenLabel or initialize the token: %w",
			t.label, t.mod.path, have, providers.ErrUnavailable)
	case 1:
		return found[0], nil
	}
	return 0, fmt.Errorf("%d tokens labelled %q in module %s; labels must be unique: %w", len(found), t.label, t.mod.path, providers.ErrUnavailable)
}

// put returns a healthy read-only session to the pool, and closes a
// read/write one.
func (t *token) put(s session) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed || s.gen != t.gen || s.rw {
		t.closeLocked(s.h)
		return
	}
	t.idle = append(t.idle, s)
}

// discard closes a broken session.
func (t *token) discard(s session) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.closeLocked(s.h)
}

// closeLocked closes session h; after the last one the token is logged
// out, so the next session logs in again.
func (t *token) closeLocked(h pkcs11.SessionHandle) {
	_ = t.mod.ctx.CloseSession(h)
	if t.open--; t.open <= 0 {
		t.open = 0
		t.loggedIn = false
	}
}

// reset forgets every session, the login and the slot after the device was
// lost, unless another caller already did so since session s was opened.
func (t *token) reset(gen uint64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if gen != t.gen {
		return
	}
	t.resetLocked()
}

func (t *token) resetLocked() {
	for _, s := range t.idle {
		t.closeLocked(s.h)
	}
	t.idle = nil
	t.gen++
	t.haveSlot = false
	t.loggedIn = false
}

// close closes the idle sessions; sessions in use are closed when returned.
func (t *token) close() {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, s := range t.idle {
		t.closeLocked(s.h)
	}
	t.idle = nil
	t.closed = true
}

// requireLogin fails with CKR_USER_NOT_LOGGED_IN when the session is public,
// because a search for private objects in a public session silently finds
// nothing, which would look like missing keys rather than a lost login.
func (t *token) requireLogin(h pkcs11.SessionHandle) error {
	info, err := t.mod.ctx.GetSessionInfo(h)
	if err != nil {
		return err
	}
	if info.State != pkcs11.CKS_RW_USER_FUNCTIONS && info.State != pkcs11.CKS_RO_USER_FUNCTIONS {
		return pkcs11.Error(pkcs11.CKR_USER_NOT_LOGGED_IN)
	}
	return nil
}

// mechanism is one capability the provider needs from the token.
type mechanism struct {
	mech  uint
	name  string
	flags uint
}

// checkMechanisms fails clearly when the token lacks what the provider
// needs, instead of letting the first Encrypt fail with CKR_MECHANISM_INVALID.
// hint says what to change.
func (t *token) checkMechanisms(need []mechanism, hint string) error {
	t.mod.use.RLock()
	defer t.mod.use.RUnlock()
	return t.checkMechanismsHeld(need, hint)
}

// checkMechanismsHeld is checkMechanisms for a caller inside do, which
// already holds the module.
func (t *token) checkMechanismsHeld(need []mechanism, hint string) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.syncModuleLocked()
	if !t.haveSlot {
		return nil // no session yet; the first call will find out
	}
	for _, m := range need {
		info, err := t.mod.ctx.GetMechanismInfo(t.slot, []*pkcs11.Mechanism{pkcs11.NewMechanism(m.mech, nil)})
		if err != nil || info.Flags&m.flags != m.flags {
			return fmt.Errorf("token %q does not offer %s for this use (%v); %s: %w", t.label, m.name, err, hint, providers.ErrUnavailable)
		}
	}
	return nil
}
