// Package file is the local key file provider: a Tink keyset of AES-256-GCM
// key versions in one JSON file, managed by `kmsctl keys`, followed by every
// plugin that reads the file.
//
// Tink (github.com/tink-crypto/tink-go/v2, the maintained successor of
// github.com/google/tink/go) manages the keyset: key generation, unique key
// IDs, enabled/disabled status, and the primary, with its rules enforced as
// refusals. Sealing uses the Go standard library's random-nonce AES-256-GCM
// behind a small seam (newAEAD), because tink-go's AEAD refuses to run in
// FIPS 140-3 mode (GODEBUG=fips140=only) while the standard library's is a
// validated module. The key_id ("file:<keyset name>/<tink key id>") is the
// associated data, so a ciphertext cannot be replayed under another key_id.
//
// A Provider is safe for concurrent use. Its state is an immutable snapshot
// held in a providers.KeyCache, so Encrypt reads the primary key and its
// key_id from one snapshot and never races a concurrent promote.
package file

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/tink-crypto/tink-go/v2/aead"
	"github.com/tink-crypto/tink-go/v2/insecurecleartextkeyset"
	"github.com/tink-crypto/tink-go/v2/keyset"
	gcmpb "github.com/tink-crypto/tink-go/v2/proto/aes_gcm_go_proto"
	tinkpb "github.com/tink-crypto/tink-go/v2/proto/tink_go_proto"
	"google.golang.org/protobuf/proto"

	"github.com/kms-v2/kms-plugin/providers"
)

// Backend is the key_id prefix of this provider.
const Backend = "file"

// formatV1 is the first byte of every ciphertext: nonce (12) || GCM
// ciphertext || tag (16) follow. A new format gets a new byte.
const formatV1 = 0x01

const aesGCMTypeURL = "type.googleapis.com/google.crypto.tink.AesGcmKey"

// newAEAD is the cipher seam: the standard library's AES-256-GCM with a
// random 96-bit nonce prepended by Seal.
var newAEAD = func(key []byte) (cipher.AEAD, error) {
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCMWithRandomNonce(block)
}

// Provider serves one keyset file. Create it with New.
type Provider struct {
	path   string
	logger hclog.Logger
	keys   *providers.KeyCache[*state]
}

// state is one immutable snapshot of the keyset.
type state struct {
	name    string
	primary *keyEntry
	keys    map[string]*keyEntry // by key_id
	order   []*keyEntry          // creation order
	stamp   fileStamp
}

type keyEntry struct {
	keyID   string
	tinkID  uint32
	enabled bool
	created time.Time
	aead    cipher.AEAD
}

var (
	_ providers.Provider  = (*Provider)(nil)
	_ providers.Rotator   = (*Provider)(nil)
	_ providers.Refresher = (*Provider)(nil)
	_ providers.Reporter  = (*Provider)(nil)
)

// New opens the keyset file named by cfg. It fails when the file is missing
// (create it with `kmsctl keys init`), readable by group or others, or not a
// valid keyset.
func New(ctx context.Context, cfg Config, logger hclog.Logger) (*Provider, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("file provider: %w", err)
	}
	if logger == nil {
		logger = hclog.NewNullLogger()
	}
	p := &Provider{path: cfg.Path, logger: logger.Named("file")}
	p.keys = providers.NewKeyCache(p.load, p.published)
	if err := p.keys.Reload(ctx); err != nil {
		return nil, fmt.Errorf("file provider: %w", err)
	}
	return p, nil
}

// Init creates the keyset file with one primary key. It refuses to replace
// an existing file.
func Init(ctx context.Context, cfg Config, logger hclog.Logger) (providers.KeyVersion, error) {
	if err := cfg.Validate(); err != nil {
		return providers.KeyVersion{}, fmt.Errorf("file provider: %w", err)
	}
	if _, err := os.Lstat(cfg.Path); err == nil {
		return providers.KeyVersion{}, fmt.Errorf("keys init: keyset %s already exists; use `kmsctl keys create` to add a version: %w", cfg.Path, providers.ErrRefused)
	}
	w, err := beginWrite(ctx, cfg.Path)
	if err != nil {
		return providers.KeyVersion{}, fmt.Errorf("keys init: %w", err)
	}
	defer w.end()
	if _, err := os.Lstat(w.target); err == nil {
		return providers.KeyVersion{}, fmt.Errorf("keys init: keyset %s already exists; use `kmsctl keys create` to add a version: %w", cfg.Path, providers.ErrRefused)
	}
	name, err := newName()
	if err != nil {
		return providers.KeyVersion{}, err
	}
	m := keyset.NewManager()
	id, err := m.Add(aead.AES256GCMKeyTemplate())
	if err != nil {
		return providers.KeyVersion{}, fmt.Errorf("keys init: %w", err)
	}
	if err := m.SetPrimary(id); err != nil {
		return providers.KeyVersion{}, fmt.Errorf("keys init: %w", err)
	}
	h, err := m.Handle()
	if err != nil {
		return providers.KeyVersion{}, fmt.Errorf("keys init: %w", err)
	}
	now := time.Now().UTC().Truncate(time.Second)
	doc := document{Name: name, Created: map[string]time.Time{idString(id): now}}
	data, err := encode(doc, h)
	if err != nil {
		return providers.KeyVersion{}, fmt.Errorf("keys init: %w", err)
	}
	if err := w.write(data); err != nil {
		return providers.KeyVersion{}, fmt.Errorf("keys init: %w", err)
	}
	v := providers.KeyVersion{KeyID: keyID(name, id), State: providers.StatePrimary, Created: now}
	if logger != nil {
		logger.Info("keyset created", "path", cfg.Path, "key_id", v.KeyID)
	}
	return v, nil
}

func idString(id uint32) string { return strconv.FormatUint(uint64(id), 10) }

func keyID(name string, id uint32) string { return Backend + ":" + name + "/" + idString(id) }

// buildState turns a parsed keyset into a snapshot, validating every key.
func buildState(l *loaded) (*state, error) {
	ks := insecurecleartextkeyset.KeysetMaterial(l.handle)
	st := &state{name: l.doc.Name, keys: map[string]*keyEntry{}, stamp: l.stamp}
	for _, k := range ks.GetKey() {
		if k.GetStatus() == tinkpb.KeyStatusType_DESTROYED {
			continue
		}
		kd := k.GetKeyData()
		if kd.GetTypeUrl() != aesGCMTypeURL {
			return nil, fmt.Errorf("key %d has type %s; only AES-GCM keys are supported", k.GetKeyId(), kd.GetTypeUrl())
		}
		var gk gcmpb.AesGcmKey
		if err := proto.Unmarshal(kd.GetValue(), &gk); err != nil {
			return nil, fmt.Errorf("key %d: %v", k.GetKeyId(), err)
		}
		if len(gk.GetKeyValue()) != 32 {
			return nil, fmt.Errorf("key %d is AES-%d; only AES-256 keys are supported", k.GetKeyId(), 8*len(gk.GetKeyValue()))
		}
		a, err := newAEAD(gk.GetKeyValue())
		if err != nil {
			return nil, fmt.Errorf("key %d: %v", k.GetKeyId(), err)
		}
		e := &keyEntry{
			keyID:   keyID(l.doc.Name, k.GetKeyId()),
			tinkID:  k.GetKeyId(),
			enabled: k.GetStatus() == tinkpb.KeyStatusType_ENABLED,
			created: l.doc.Created[idString(k.GetKeyId())],
			aead:    a,
		}
		st.keys[e.keyID] = e
		st.order = append(st.order, e)
		if k.GetKeyId() == ks.GetPrimaryKeyId() {
			st.primary = e
		}
	}
	if st.primary == nil || !st.primary.enabled {
		return nil, errors.New("keyset has no enabled primary key")
	}
	sort.SliceStable(st.order, func(i, j int) bool { return st.order[i].created.Before(st.order[j].created) })
	return st, nil
}

// Encrypt seals a 32-byte seed with the primary key.
func (p *Provider) Encrypt(_ context.Context, plaintext []byte) (providers.Sealed, error) {
	if len(plaintext) != providers.SeedSize {
		return providers.Sealed{}, fmt.Errorf("encrypt: plaintext is %d bytes, want %d: %w", len(plaintext), providers.SeedSize, providers.ErrInvalidInput)
	}
	k := p.current().primary
	out := make([]byte, 1, 1+12+len(plaintext)+16)
	out[0] = formatV1
	out = k.aead.Seal(out, nil, plaintext, []byte(k.keyID)) //nolint:gosec // G407: NewGCMWithRandomNonce draws the nonce; nil is its required argument
	return providers.Sealed{KeyID: k.keyID, Ciphertext: out}, nil
}

// Decrypt opens a ciphertext made by Encrypt under any enabled version.
func (p *Provider) Decrypt(ctx context.Context, s providers.Sealed) ([]byte, error) {
	k, err := p.lookup(ctx, s.KeyID)
	if err != nil {
		return nil, fmt.Errorf("decrypt: %w", err)
	}
	if len(s.Ciphertext) > providers.MaxCiphertextSize || len(s.Ciphertext) < 1+12+16 || s.Ciphertext[0] != formatV1 {
		return nil, fmt.Errorf("decrypt: malformed ciphertext for %s: %w", s.KeyID, providers.ErrInvalidCiphertext)
	}
	pt, err := k.aead.Open(nil, nil, s.Ciphertext[1:], []byte(k.keyID))
	if err != nil {
		return nil, fmt.Errorf("decrypt: authentication failed for %s: %w", s.KeyID, providers.ErrInvalidCiphertext)
	}
	return pt, nil
}

// lookup finds an enabled key by key_id, refreshing once on a miss. A
// refresh that fails is logged and the key_id reported unknown: the
// background check reports the file's problem.
func (p *Provider) lookup(ctx context.Context, id string) (*keyEntry, error) {
	kid, err := providers.ParseKeyID(id)
	if err != nil {
		return nil, err
	}
	if kid.Backend != Backend {
		return nil, fmt.Errorf("key_id %s belongs to backend %q, not %q: %w", id, kid.Backend, Backend, providers.ErrKeyNotFound)
	}
	k, ok, err := providers.LookupVersion(ctx, p.keys, func(st *state) (*keyEntry, bool) {
		k, ok := st.keys[id]
		return k, ok
	})
	if err != nil {
		p.logger.Warn("refresh after unknown key_id failed", "key_id", id, "error", err)
	}
	if !ok {
		return nil, fmt.Errorf("%s: %w", id, providers.ErrKeyNotFound)
	}
	if !k.enabled {
		return nil, fmt.Errorf("%s: %w", id, providers.ErrKeyDisabled)
	}
	return k, nil
}

// PrimaryKeyID returns the primary's key_id from the current snapshot.
func (p *Provider) PrimaryKeyID(context.Context) (string, error) {
	return p.current().primary.keyID, nil
}

// Stats reports the primary's creation time (kept in the keyset file
// next to the keyset; zero for a version made before it was kept) and the
// key state cache's lookups.
func (p *Provider) Stats() providers.Stats {
	return providers.Stats{PrimaryCreated: p.current().primary.created, Caches: []providers.CacheStats{p.keys.Stats()}}
}

// current is the snapshot in use. New loads one before it returns, and a
// failed load keeps the previous one, so there always is one.
func (p *Provider) current() *state {
	st, _ := p.keys.Current()
	return st
}

// Owns reports whether keyID names a version of this keyset: backend "file"
// and the loaded keyset's name, which is chosen at init and never changes.
func (p *Provider) Owns(keyID string) bool {
	name, ok := keysetOf(keyID)
	return ok && name == p.current().name
}

// keysetOf returns the keyset name of a key_id of the form
// "file:<keyset name>/<tink key id>", the form keyID builds.
func keysetOf(keyID string) (string, bool) {
	kid, err := providers.ParseKeyID(keyID)
	if err != nil || kid.Backend != Backend {
		return "", false
	}
	name, id, ok := strings.Cut(kid.Name, "/")
	n, err := strconv.ParseUint(id, 10, 32)
	return name, ok && err == nil && idString(uint32(n)) == id
}

// Check reports whether the keyset file is still present, private and
// valid; it reloads the file when it changed.
func (p *Provider) Check(ctx context.Context) error {
	return p.Refresh(ctx)
}

// Refresh reloads the keyset when the file changed since the last load;
// concurrent calls share one read. On error the previous snapshot stays in
// use.
func (p *Provider) Refresh(ctx context.Context) error {
	if err := p.keys.Refresh(ctx); err != nil {
		return fmt.Errorf("refresh: %w", err)
	}
	return nil
}

// load is the KeyCache's load: it checks the file and its folders are
// still trusted on every call (a chmod or chown does not change the
// stamp), and parses it only when it changed.
func (p *Provider) load(context.Context) (*state, error) {
	f, fi, err := openKeyset(p.path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w: %w", err, providers.ErrUnavailable)
	}
	if err != nil {
		return nil, fmt.Errorf("%w: %w", err, providers.ErrPermissionDenied)
	}
	defer f.Close()
	old, _ := p.keys.Current()
	if old != nil && stampOf(fi) == old.stamp {
		return old, nil
	}
	l, err := parseOpened(p.path, f, fi)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", err, providers.ErrUnavailable)
	}
	st, err := buildState(l)
	if err != nil {
		return nil, fmt.Errorf("keyset %s: %w: %w", p.path, err, providers.ErrUnavailable)
	}
	if old != nil && st.name != old.name {
		// A different keyset under the same path would make every existing
		// key_id unknown; keep serving the one we have and say so.
		return nil, fmt.Errorf("keyset %s now has name %q, was %q; refusing to switch keysets under a running plugin: %w", p.path, st.name, old.name, providers.ErrRefused)
	}
	return st, nil
}

// published logs what a load changed.
func (p *Provider) published(old, st *state) {
	switch {
	case old == nil:
		p.logger.Info("keyset loaded", "path", p.path, "primary_key_id", st.primary.keyID, "versions", len(st.order))
	case old == st:
	case st.primary.keyID != old.primary.keyID:
		p.logger.Info("primary key changed", "old_key_id", old.primary.keyID, "new_key_id", st.primary.keyID)
	default:
		p.logger.Debug("keyset reloaded", "versions", len(st.order))
	}
}

// Close releases nothing: the provider holds no open files.
func (p *Provider) Close() error { return nil }

// Versions lists every key version, oldest first, as the file holds them
// now.
func (p *Provider) Versions(ctx context.Context) ([]providers.KeyVersion, error) {
	if err := p.keys.Reload(ctx); err != nil {
		return nil, fmt.Errorf("versions: refresh: %w", err)
	}
	st := p.current()
	return providers.ListVersions(st.order, st.primary, func(k *keyEntry) (string, bool, time.Time) {
		return k.keyID, k.enabled, k.created
	}), nil
}

// CreateVersion adds an enabled, non-primary AES-256-GCM key.
func (p *Provider) CreateVersion(ctx context.Context) (providers.KeyVersion, error) {
	var v providers.KeyVersion
	err := p.modify(ctx, "create", func(doc *document, m *keyset.Manager, _ *state) error {
		id, err := m.Add(aead.AES256GCMKeyTemplate())
		if err != nil {
			return err
		}
		now := time.Now().UTC().Truncate(time.Second)
		if doc.Created == nil {
			doc.Created = map[string]time.Time{}
		}
		doc.Created[idString(id)] = now
		v = providers.KeyVersion{KeyID: keyID(doc.Name, id), State: providers.StateEnabled, Created: now}
		return nil
	})
	return v, err
}

// Promote makes an enabled version the primary.
func (p *Provider) Promote(ctx context.Context, id string) error {
	return p.modify(ctx, "promote", func(_ *document, m *keyset.Manager, st *state) error {
		k, err := find(st, id)
		if err != nil {
			return err
		}
		if !k.enabled {
			return fmt.Errorf("%s is disabled; enable it first: %w", id, providers.ErrRefused)
		}
		return m.SetPrimary(k.tinkID)
	})
}

// Disable stops a non-primary version from decrypting.
func (p *Provider) Disable(ctx context.Context, id string) error {
	return p.modify(ctx, "disable", func(_ *document, m *keyset.Manager, st *state) error {
		k, err := find(st, id)
		if err != nil {
			return err
		}
		if k == st.primary {
			return fmt.Errorf("%s is the primary; promote another version first: %w", id, providers.ErrRefused)
		}
		return m.Disable(k.tinkID)
	})
}

// Enable lets a disabled version decrypt again.
func (p *Provider) Enable(ctx context.Context, id string) error {
	return p.modify(ctx, "enable", func(_ *document, m *keyset.Manager, st *state) error {
		k, err := find(st, id)
		if err != nil {
			return err
		}
		return m.Enable(k.tinkID)
	})
}

func find(st *state, id string) (*keyEntry, error) {
	k, ok := st.keys[id]
	if !ok {
		if strings.HasPrefix(id, Backend+":") {
			return nil, fmt.Errorf("%s is not in keyset %q: %w", id, st.name, providers.ErrKeyNotFound)
		}
		return nil, fmt.Errorf("%s is not a file provider key_id: %w", id, providers.ErrKeyNotFound)
	}
	return k, nil
}

// modify runs one locked read-modify-write cycle on the keyset file, then
// loads the result into this provider.
func (p *Provider) modify(ctx context.Context, op string, change func(*document, *keyset.Manager, *state) error) error {
	w, err := beginWrite(ctx, p.path)
	if err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	defer w.end()
	l, err := readKeyset(w.target)
	if err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	st, err := buildState(l)
	if err != nil {
		return fmt.Errorf("%s: keyset %s: %w", op, p.path, err)
	}
	m := keyset.NewManagerFromHandle(l.handle)
	doc := l.doc
	if err := change(&doc, m, st); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	h, err := m.Handle()
	if err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	data, err := encode(doc, h)
	if err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	if err := w.write(data); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	// Reload, not Refresh: a refresh already in flight may have read the
	// file before this write.
	if err := p.keys.Reload(ctx); err != nil {
		return fmt.Errorf("%s: written, but reloading failed: %w", op, err)
	}
	return nil
}
