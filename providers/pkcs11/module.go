//go:build cgo

package pkcs11

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/miekg/pkcs11"
	"k8s.io/apimachinery/pkg/util/wait"

	"github.com/kms-v2/kms-plugin/providers"
)

// module is one loaded and initialized PKCS#11 library. C_Initialize may run
// once per process per library, and C_Finalize ends every session of every
// user of it, so providers share modules through the registry below.
type module struct {
	path string
	ctx  *pkcs11.Ctx
	refs int
	// owned: we ran C_Initialize (rather than finding the library already
	// initialized by other code in the process), so we may finalize it.
	owned bool
	quirks

	// use is held shared by every call into the library and exclusively
	// by reinit, so no session is in use while the library restarts.
	use sync.RWMutex
	// gen counts reinits (under use); sessions and logins from an older
	// generation no longer exist.
	gen uint64
	// inited is when the latest C_Initialize began (under use).
	inited time.Time
}

// quirks are behaviours of particular PKCS#11 libraries that the provider
// works around, found by the library's C_GetInfo manufacturer ID.
type quirks struct {
	// staleObjects: the library reads the token's objects once, in
	// C_Initialize, and never sees what other processes create or destroy
	// later (kmsctl's new version or promote would stay invisible to a
	// running plugin). Key state is then read after a fresh C_Finalize +
	// C_Initialize; see reinit.
	staleObjects bool
	// signingRSAKeys: the library makes every RSA key able to sign and
	// fails C_GenerateKeyPair, logging an error, when the template asks
	// for CKA_SIGN false, so it is not asked.
	signingRSAKeys bool
}

// knownQuirks maps manufacturer IDs to their quirks. tpm2-pkcs11: both,
// in 1.9.0 (Debian bookworm) and still in its main branch in 2026; its
// TPM keys carry both the sign and the decrypt attribute.
var knownQuirks = map[string]quirks{
	"tpm2-software.github.io": {staleObjects: true, signingRSAKeys: true},
}

var (
	modulesMu sync.Mutex
	modules   = map[string]*module{}
)

// openModule loads and initializes the library at path, or returns the
// already loaded one with one more reference.
func openModule(path string) (*module, error) {
	if _, err := os.Stat(path); err != nil {
		return nil, fmt.Errorf("pkcs11 module %s: %w; install the vendor's PKCS#11 library (SoftHSM2: apt-get install softhsm2) or fix pkcs11.module: %w", path, err, providers.ErrUnavailable)
	}
	key := path
	if real, err := filepath.EvalSymlinks(path); err == nil {
		key = real
	}
	modulesMu.Lock()
	defer modulesMu.Unlock()
	if m, ok := modules[key]; ok {
		m.refs++
		return m, nil
	}
	ctx := pkcs11.New(path)
	if ctx == nil {
		return nil, fmt.Errorf("pkcs11 module %s: cannot be loaded as a PKCS#11 library (dlopen or C_GetFunctionList failed): %w", path, providers.ErrUnavailable)
	}
	owned := true
	if err := ctx.Initialize(); err != nil {
		if !errors.Is(err, pkcs11.Error(pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED)) {
			ctx.Destroy()
			return nil, fmt.Errorf("pkcs11 module %s: C_Initialize: %w", path, classify(err))
		}
		owned = false
	}
	m := &module{path: key, ctx: ctx, refs: 1, owned: owned, inited: time.Now()}
	if info, err := ctx.GetInfo(); err == nil {
		m.quirks = knownQuirks[strings.TrimRight(info.ManufacturerID, " \x00")]
	}
	modules[key] = m
	return m, nil
}

// reinit restarts a staleObjects library so that it reads the token's
// objects again, unless a restart began after since (then that one already
// sees everything committed before since). It waits for calls in progress
// and holds new ones back for its duration, tens of milliseconds on
// tpm2-pkcs11 (up to busyBackoff's few seconds while another process holds
// the store); every session and login of the old generation is gone
// afterwards, which the token pools notice through gen. A library we did
// not initialize ourselves is left alone: other code in the process owns
// its sessions.
func (m *module) reinit(ctx context.Context, since time.Time) error {
	if !m.staleObjects || !m.owned {
		return nil
	}
	m.use.Lock()
	defer m.use.Unlock()
	if m.inited.After(since) {
		return nil
	}
	m.inited = time.Now()
	m.gen++
	return m.retryBusy(ctx, func() error {
		// Not initialized: an earlier try failed halfway; start it now.
		if err := m.ctx.Finalize(); err != nil && !isRV(err, pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED) {
			return fmt.Errorf("pkcs11 module %s: C_Finalize before reading objects again: %w", m.path, classify(err))
		}
		if err := m.ctx.Initialize(); err != nil {
			return fmt.Errorf("pkcs11 module %s: C_Initialize to read objects again: %w", m.path, classify(err))
		}
		return nil
	})
}

// busyBackoff paces retryBusy: 10 ms doubling to 1 s, each pause lengthened
// at random by up to 20%, 9 tries over about 3.5 s. tpm2-pkcs11 holds a
// write lock on its store for milliseconds per object; a rotation's key
// generation and a plugin's Refresh each take the store a few times.
var busyBackoff = wait.Backoff{Duration: 10 * time.Millisecond, Factor: 2, Jitter: 0.2, Steps: 9, Cap: time.Second}

// retryBusy runs op and, on a staleObjects library, runs it again while it
// fails with CKR_GENERAL_ERROR, until busyBackoff's tries are spent or ctx
// is done; it returns op's last error. tpm2-pkcs11 keeps its objects in a
// SQLite database and sets no busy timeout, so its C_Initialize (which
// reads the store) and its object writes fail at once, with that code,
// whenever another process holds the store's lock: a plugin's Refresh
// reading while kmsctl creates a version, or the other way round. op must
// be safe to repeat after a partial failure. An error that a retryBusy
// inside op already retried (reinit's, within CreateVersion) is not
// retried again, so nesting never multiplies the tries.
func (m *module) retryBusy(ctx context.Context, op func() error) error {
	if !m.staleObjects {
		return op()
	}
	var err error
	tries := 0
	// Until runs op at once, then after each pause, and stops when ctx is
	// done; op's last error is the answer, not Until's.
	_ = busyBackoff.DelayFunc().Until(ctx, true, true, func(context.Context) (bool, error) {
		err = op()
		tries++
		return !isRV(err, pkcs11.CKR_GENERAL_ERROR) || errors.As(err, new(retriedError)) || tries >= busyBackoff.Steps, nil
	})
	if isRV(err, pkcs11.CKR_GENERAL_ERROR) && !errors.As(err, new(retriedError)) {
		err = retriedError{err}
	}
	return err
}

// retriedError marks a busy-store failure retryBusy gave up on.
type retriedError struct{ error }

func (e retriedError) Unwrap() error { return e.error }

// release drops one reference; the last one finalizes and unloads the
// library, so a later open (for example in the next test, with another
// SOFTHSM2_CONF) starts from a clean state.
func (m *module) release() {
	modulesMu.Lock()
	defer modulesMu.Unlock()
	m.refs--
	if m.refs > 0 {
		return
	}
	delete(modules, m.path)
	if m.owned {
		_ = m.ctx.Finalize()
	}
	m.ctx.Destroy()
}
