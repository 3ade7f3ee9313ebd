//go:build cgo

package pkcs11

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"

	"github.com/miekg/pkcs11"

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
	m := &module{path: key, ctx: ctx, refs: 1, owned: owned}
	modules[key] = m
	return m, nil
}

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
