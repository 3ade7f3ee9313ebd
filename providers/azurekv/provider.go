package azurekv

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore/to"
	"github.com/Azure/azure-sdk-for-go/sdk/security/keyvault/azkeys"
	"github.com/hashicorp/go-hclog"

	"github.com/kms-v2/kms-plugin/providers"
)

// Backend is the key_id prefix of this provider.
const Backend = "azurekv"

// sharedCallTimeout bounds a coalesced unwrap, which runs detached from the
// first caller's context so that caller leaving early does not fail the
// others; retries still fit in it.
const sharedCallTimeout = 5 * time.Second

// Provider wraps seeds with versions of one Key Vault key. It implements
// providers.Provider, providers.Rotator and providers.Refresher, and is safe
// for concurrent use.
type Provider struct {
	cfg    Config
	log    hclog.Logger
	client *azkeys.Client
	hc     *http.Client
	host   string
	alg    azkeys.EncryptionAlgorithm

	keys    *providers.KeyCache[*state]
	breaker *breaker
	// unwrapper coalesces identical unwraps and caches their seeds.
	unwrapper *providers.Unwrapper
	warned    sync.Once
	closed    atomic.Bool
}

var (
	_ providers.Provider  = (*Provider)(nil)
	_ providers.Rotator   = (*Provider)(nil)
	_ providers.Refresher = (*Provider)(nil)
	_ providers.Reporter  = (*Provider)(nil)
)

// New returns a provider whose key state has been loaded and whose primary
// version has been checked. It fails if the key does not exist yet (run
// `kmsctl keys init`), cannot be reached, or our identity is refused.
func New(ctx context.Context, cfg Config, logger hclog.Logger) (*Provider, error) {
	p, err := open(cfg, logger)
	if err != nil {
		return nil, err
	}
	if err := p.Refresh(ctx); err != nil {
		if errors.Is(err, providers.ErrKeyNotFound) {
			return nil, fmt.Errorf("%w (key %s in %s; run `kmsctl keys init` to create it)", err, cfg.KeyName, cfg.VaultURL)
		}
		return nil, err
	}
	if _, err := p.primary(); err != nil {
		return nil, fmt.Errorf("azurekv: %w", err)
	}
	if err := p.Check(ctx); err != nil {
		return nil, err
	}
	return p, nil
}

// Init creates key cfg.KeyName with its first version, which is primary by
// the "newest enabled version" rule. It refuses (ErrRefused) when the key
// already has a version.
func Init(ctx context.Context, cfg Config, logger hclog.Logger) (providers.KeyVersion, error) {
	p, err := open(cfg, logger)
	if err != nil {
		return providers.KeyVersion{}, err
	}
	defer p.Close()
	err = p.Refresh(ctx)
	switch {
	case err == nil:
		n := len(p.current().ordered)
		return providers.KeyVersion{}, fmt.Errorf("azurekv: init: key %s already has %d version(s); see `kmsctl keys list`: %w", cfg.KeyName, n, providers.ErrRefused)
	case !errors.Is(err, providers.ErrKeyNotFound):
		return providers.KeyVersion{}, err
	}
	kty, size := azkeys.KeyType(cfg.KeyType), int32(cfg.KeySize) //nolint:gosec // G115: Validate allows 0, 2048, 3072 or 4096
	if kty == "" {
		kty = DefaultKeyType
	}
	if size == 0 {
		size = DefaultKeySize
	}
	v, err := p.create(ctx, kty, size)
	if err != nil {
		return providers.KeyVersion{}, err
	}
	v.State = providers.StatePrimary
	p.log.Info("created key", "key_id", v.KeyID, "kty", kty, "size", size)
	return v, nil
}

// open builds a provider without touching the vault.
func open(cfg Config, logger hclog.Logger) (*Provider, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("azurekv: config: %w", err)
	}
	if logger == nil {
		logger = hclog.NewNullLogger()
	}
	hc, err := newHTTPClient(cfg.CAFile)
	if err != nil {
		return nil, err
	}
	client, err := newClient(cfg, hc)
	if err != nil {
		return nil, fmt.Errorf("azurekv: auth: %w", err)
	}
	u, _ := url.Parse(cfg.VaultURL)
	alg := azkeys.EncryptionAlgorithm(cfg.Algorithm)
	if alg == "" {
		alg = DefaultAlgorithm
	}
	unwrap := cfg.UnwrapCache.Options(cfg.disableCoalescing)
	unwrap.SharedTimeout = sharedCallTimeout
	p := &Provider{
		cfg: cfg, log: logger.Named("azurekv"), client: client, hc: hc,
		host: vaultHost(u.Host), alg: alg,
		unwrapper: providers.NewUnwrapper(unwrap),
	}
	p.keys = providers.NewKeyCache(p.load, p.published)
	p.breaker = newBreaker(func(open bool, until time.Time, cause error) {
		if open {
			p.log.Warn("circuit open: failing Key Vault calls fast", "until", until.Format(time.RFC3339), "cause", cause)
		} else {
			p.log.Info("circuit closed: Key Vault answers again")
		}
	})
	return p, nil
}

// call runs one Key Vault call through the circuit breaker and classifies
// its error.
func (p *Provider) call(o op, target string, f func() error) error {
	done, err := p.breaker.allow()
	if err != nil {
		return err
	}
	err = classify(o, target, f())
	done(err)
	return err
}

// Encrypt wraps a 32-byte seed with the primary version.
func (p *Provider) Encrypt(ctx context.Context, plaintext []byte) (providers.Sealed, error) {
	if len(plaintext) != providers.SeedSize {
		return providers.Sealed{}, fmt.Errorf("azurekv: encrypt: plaintext is %d bytes, want the apiserver's %d-byte seed: %w", len(plaintext), providers.SeedSize, providers.ErrInvalidInput)
	}
	v, err := p.primary()
	if err != nil {
		return providers.Sealed{}, fmt.Errorf("azurekv: encrypt: %w", err)
	}
	var resp azkeys.WrapKeyResponse
	err = p.call(opWrap, p.cfg.KeyName+"/"+v.id, func() (err error) {
		resp, err = p.client.WrapKey(ctx, p.cfg.KeyName, v.id, azkeys.KeyOperationParameters{Algorithm: &p.alg, Value: plaintext}, nil)
		return err
	})
	if err != nil {
		return providers.Sealed{}, err
	}
	if resp.KID == nil || resp.KID.Version() != v.id {
		return providers.Sealed{}, fmt.Errorf("azurekv: wrapkey %s/%s: the vault answered for another version: %w", p.cfg.KeyName, v.id, providers.ErrUnavailable)
	}
	if n := len(resp.Result); n == 0 || n > providers.MaxCiphertextSize {
		return providers.Sealed{}, fmt.Errorf("azurekv: wrapkey %s/%s: %d-byte ciphertext, the apiserver takes 1..%d (use a key of at most 4096 bits)", p.cfg.KeyName, v.id, n, providers.MaxCiphertextSize)
	}
	return providers.Sealed{KeyID: v.keyID, Ciphertext: resp.Result}, nil
}

// Decrypt unwraps with exactly the version s.KeyID names. RSA-OAEP has no
// associated data, so the binding to key_id is that the unwrap runs under
// that version's private key only: a ciphertext relabelled with another
// version's key_id fails to unwrap (ErrInvalidCiphertext). Disabled
// versions are refused before any call; identical concurrent requests share
// one Key Vault call, and results are cached briefly.
func (p *Provider) Decrypt(ctx context.Context, s providers.Sealed) ([]byte, error) {
	if n := len(s.Ciphertext); n == 0 || n > providers.MaxCiphertextSize {
		return nil, fmt.Errorf("azurekv: decrypt: %d-byte ciphertext, want 1..%d: %w", n, providers.MaxCiphertextSize, providers.ErrInvalidCiphertext)
	}
	if len(s.Annotations) > 0 {
		return nil, fmt.Errorf("azurekv: decrypt: annotations present, this provider never writes any: %w", providers.ErrInvalidCiphertext)
	}
	id, err := p.parseKeyID(s.KeyID)
	if err != nil {
		return nil, err
	}
	v, err := p.lookup(ctx, id)
	if err != nil {
		return nil, err
	}
	if !v.enabled {
		return nil, fmt.Errorf("azurekv: decrypt: %s is disabled; `kmsctl keys enable` it to read data it protects: %w", s.KeyID, providers.ErrKeyDisabled)
	}
	ct := bytes.Clone(s.Ciphertext)
	return p.unwrapper.Unwrap(ctx, s.KeyID, ct, func(ctx context.Context) ([]byte, error) {
		var resp azkeys.UnwrapKeyResponse
		err := p.call(opUnwrap, p.cfg.KeyName+"/"+v.id, func() (err error) {
			resp, err = p.client.UnwrapKey(ctx, p.cfg.KeyName, v.id, azkeys.KeyOperationParameters{Algorithm: &p.alg, Value: ct}, nil)
			return err
		})
		if err != nil {
			return nil, err
		}
		if resp.KID == nil || resp.KID.Version() != v.id {
			return nil, fmt.Errorf("azurekv: unwrapkey %s/%s: the vault answered for another version: %w", p.cfg.KeyName, v.id, providers.ErrUnavailable)
		}
		if len(resp.Result) != providers.SeedSize {
			// Wrapped by this key, but not a seed this plugin made.
			clear(resp.Result)
			return nil, fmt.Errorf("azurekv: unwrapkey %s/%s: not a seed: %w", p.cfg.KeyName, v.id, providers.ErrInvalidCiphertext)
		}
		return resp.Result, nil
	})
}

// parseKeyID returns the version a key_id of this vault and key names.
func (p *Provider) parseKeyID(keyID string) (string, error) {
	k, err := providers.ParseKeyID(keyID)
	if err != nil {
		return "", err
	}
	if k.Backend != Backend {
		return "", fmt.Errorf("azurekv: key_id %q belongs to backend %q: %w", keyID, k.Backend, providers.ErrKeyNotFound)
	}
	parts := strings.Split(k.Name, "/")
	if len(parts) != 3 || parts[2] == "" {
		return "", fmt.Errorf("azurekv: key_id %q: want azurekv:<vault host>/<key>/<version>: %w", keyID, providers.ErrKeyNotFound)
	}
	if !strings.EqualFold(parts[0], p.host) || parts[1] != p.cfg.KeyName {
		return "", fmt.Errorf("azurekv: key_id %q names another vault or key than %s/%s: %w", keyID, p.host, p.cfg.KeyName, providers.ErrKeyNotFound)
	}
	return parts[2], nil
}

// lookup finds a version in cached state, refreshing once if unknown: a
// version made by Key Vault's rotation policy or by another instance's
// `kmsctl` reaches this instance before the next background refresh.
func (p *Provider) lookup(ctx context.Context, id string) (*version, error) {
	v, ok, err := providers.LookupVersion(ctx, p.keys, func(st *state) (*version, bool) {
		v := st.versions[id]
		return v, v != nil
	})
	switch {
	case err != nil:
		return nil, fmt.Errorf("azurekv: decrypt: version %s unknown and refresh failed: %w", id, err)
	case !ok:
		return nil, fmt.Errorf("azurekv: decrypt: key %s has no version %s: %w", p.cfg.KeyName, id, providers.ErrKeyNotFound)
	}
	return v, nil
}

// Owns reports whether keyID names a version of this vault's key, from the
// key_id alone.
func (p *Provider) Owns(keyID string) bool {
	_, err := p.parseKeyID(keyID)
	return err == nil
}

// current is the snapshot in use; nil only before the first list
// succeeded, which New and every lifecycle operation wait for.
func (p *Provider) current() *state {
	st, _ := p.keys.Current()
	return st
}

// primary returns the cached primary version, or why there is none.
func (p *Provider) primary() (*version, error) {
	st, err := p.keys.Current()
	switch {
	case err != nil:
		return nil, err
	case st.primary == nil:
		return nil, fmt.Errorf("%s: %w", st.reason, providers.ErrKeyNotFound)
	}
	return st.primary, nil
}

// PrimaryKeyID returns the key_id Encrypt would stamp now, from cached
// state.
func (p *Provider) PrimaryKeyID(context.Context) (string, error) {
	v, err := p.primary()
	if err != nil {
		return "", fmt.Errorf("azurekv: primary: %w", err)
	}
	return v.keyID, nil
}

// Refresh reloads the version list (attributes and tags) and re-chooses the
// primary. The plugin calls it every few seconds; concurrent calls share
// one list. Lifecycle operations use p.keys.Reload instead, which lists
// itself: they must see their own write.
func (p *Provider) Refresh(ctx context.Context) error {
	return p.keys.Refresh(ctx)
}

// load is the KeyCache's load: one list of the key's versions.
func (p *Provider) load(ctx context.Context) (*state, error) {
	started := time.Now()
	var props []*azkeys.KeyProperties
	err := p.call(opList, p.cfg.KeyName, func() error {
		pager := p.client.NewListKeyPropertiesVersionsPager(p.cfg.KeyName, nil)
		for pager.More() {
			page, err := pager.NextPage(ctx)
			if err != nil {
				return err
			}
			props = append(props, page.Value...)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	if len(props) == 0 {
		return nil, fmt.Errorf("azurekv: list versions %s: no versions: %w", p.cfg.KeyName, providers.ErrKeyNotFound)
	}
	return newState(p.host, p.cfg.KeyName, p.cfg.KeyVersion, props, started), nil
}

// published logs primary changes and problems when a list is installed.
func (p *Provider) published(old, st *state) {
	var was, now string
	if old != nil && old.primary != nil {
		was = old.primary.keyID
	}
	if st.primary != nil {
		now = st.primary.keyID
	}
	if was != now {
		p.log.Info("primary key version changed", "from", was, "to", now, "key_id_hash", providers.HashKeyID(now))
	}
	if st.reason != "" && (old == nil || old.reason != st.reason) {
		p.log.Warn("primary key version problem", "reason", st.reason)
	}
}

// Check is the health probe: it reads the primary version from the vault
// and verifies it can wrap and unwrap. It also logs the pre-flight warnings
// (purgeable or exportable key) the first time it succeeds.
func (p *Provider) Check(ctx context.Context) error {
	v, err := p.primary()
	if err != nil {
		return fmt.Errorf("azurekv: check: %w", err)
	}
	var resp azkeys.GetKeyResponse
	err = p.call(opGet, p.cfg.KeyName+"/"+v.id, func() (err error) {
		resp, err = p.client.GetKey(ctx, p.cfg.KeyName, v.id, nil)
		return err
	})
	if err != nil {
		return err
	}
	a := resp.Attributes
	if a == nil || a.Enabled == nil || !*a.Enabled {
		return fmt.Errorf("azurekv: check: primary %s is disabled in the vault: %w", v.keyID, providers.ErrKeyDisabled)
	}
	if resp.Key == nil || resp.Key.Kty == nil || (*resp.Key.Kty != azkeys.KeyTypeRSA && *resp.Key.Kty != azkeys.KeyTypeRSAHSM) {
		return fmt.Errorf("azurekv: check: primary %s is not an RSA key; %s needs RSA or RSA-HSM: %w", v.keyID, p.alg, providers.ErrInvalidInput)
	}
	if !hasOps(resp.Key.KeyOps, azkeys.KeyOperationWrapKey, azkeys.KeyOperationUnwrapKey) {
		return fmt.Errorf("azurekv: check: primary %s does not permit wrapKey and unwrapKey; add them to its key_ops: %w", v.keyID, providers.ErrPermissionDenied)
	}
	p.warned.Do(func() { p.preflight(a) })
	return nil
}

// preflight logs key properties that make data loss or key theft possible.
func (p *Provider) preflight(a *azkeys.KeyAttributes) {
	if a.RecoveryLevel != nil && strings.Contains(*a.RecoveryLevel, "Purgeable") {
		p.log.Warn("pre-flight: the vault has no purge protection; an administrator can destroy the key for good and every Secret with it. Enable purge protection on the vault.",
			"key", p.cfg.KeyName, "recovery_level", *a.RecoveryLevel)
	}
	exportable := a.Exportable != nil && *a.Exportable
	for _, v := range p.current().ordered {
		exportable = exportable || v.exportable
	}
	if exportable {
		p.log.Warn("pre-flight: the key is exportable; its private key can leave the vault under its release policy. Prefer a non-exportable key.", "key", p.cfg.KeyName)
	}
}

func hasOps(ops []*azkeys.KeyOperation, want ...azkeys.KeyOperation) bool {
	for _, w := range want {
		found := false
		for _, o := range ops {
			found = found || (o != nil && *o == w)
		}
		if !found {
			return false
		}
	}
	return true
}

// Stats reports the primary's creation time (Key Vault's own attribute),
// the seed and key state caches' lookups, and the circuit breaker, all
// from memory.
func (p *Provider) Stats() providers.Stats {
	st := providers.Stats{
		Caches:  []providers.CacheStats{p.unwrapper.Stats(), p.keys.Stats()},
		Breaker: p.breaker.state(),
	}
	if v, err := p.primary(); err == nil {
		st.PrimaryCreated = v.created
	}
	return st
}

// Close drops cached seeds and idle connections.
func (p *Provider) Close() error {
	if p.closed.Swap(true) {
		return nil
	}
	p.unwrapper.Purge()
	p.hc.CloseIdleConnections()
	return nil
}

// create adds an enabled version that permits only wrapKey and unwrapKey.
func (p *Provider) create(ctx context.Context, kty azkeys.KeyType, size int32) (providers.KeyVersion, error) {
	var resp azkeys.CreateKeyResponse
	err := p.call(opCreate, p.cfg.KeyName, func() (err error) {
		resp, err = p.client.CreateKey(ctx, p.cfg.KeyName, azkeys.CreateKeyParameters{
			Kty:           &kty,
			KeySize:       &size,
			KeyOps:        []*azkeys.KeyOperation{to.Ptr(azkeys.KeyOperationWrapKey), to.Ptr(azkeys.KeyOperationUnwrapKey)},
			KeyAttributes: &azkeys.KeyAttributes{Enabled: to.Ptr(true), Exportable: to.Ptr(false)},
		}, nil)
		return err
	})
	if err != nil {
		return providers.KeyVersion{}, err
	}
	if resp.Key == nil || resp.Key.KID == nil || resp.Key.KID.Version() == "" {
		return providers.KeyVersion{}, fmt.Errorf("azurekv: create version %s: answer has no key ID: %w", p.cfg.KeyName, providers.ErrUnavailable)
	}
	kv := providers.KeyVersion{KeyID: formatKeyID(p.host, p.cfg.KeyName, resp.Key.KID.Version()), State: providers.StateEnabled}
	if resp.Attributes != nil && resp.Attributes.Created != nil {
		kv.Created = *resp.Attributes.Created
	}
	return kv, nil
}
