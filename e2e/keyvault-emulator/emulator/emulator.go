// Package emulator is a small, local stand-in for Azure Key Vault (keys only)
// and for the Entra ID token endpoints, good enough for the real azkeys and
// azidentity SDKs to run their real flows against it: bearer challenge, OpenID
// discovery, client-credentials token, then key operations over HTTPS.
//
// It exists so the azurekv provider is tested through the SDK that production
// uses, including retries, paging and authentication, without an Azure
// subscription. It also has switches real Key Vault does not: injected
// throttling (429 with Retry-After), latency and outages, and counters of the
// operations it served, so tests can assert on how many calls reached it.
//
// Start one per test; an Emulator is safe for concurrent use.
package emulator

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"hash"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"
)

// DefaultTenantID is the tenant the emulator names in its bearer challenge
// when Options.TenantID is empty.
const DefaultTenantID = "00000000-0000-4000-8000-00000000e4a1"

// DefaultResource is the resource the bearer challenge asks tokens for, the
// same as the public cloud's Key Vault.
const DefaultResource = "https://vault.azure.net"

// Recovery levels as Key Vault reports them in attributes.recoveryLevel.
const (
	// RecoveryPurgeable: soft delete without purge protection; an
	// administrator can destroy the key for good.
	RecoveryPurgeable = "Recoverable+Purgeable"
	// RecoveryProtected: purge protection on; nobody can purge before the
	// retention period ends.
	RecoveryProtected = "Recoverable"
)

// Options configure Start. The zero value is usable.
type Options struct {
	// Addr to listen on; default "127.0.0.1:0" (a free loopback port).
	Addr string
	// Dir, when set, receives ca.pem, the CA that signed the server
	// certificate, for clients that take a file.
	Dir string
	// TenantID named in the bearer challenge; default DefaultTenantID.
	TenantID string
	// Clients maps client IDs to client secrets the token endpoint accepts.
	Clients map[string]string
	// Roles maps client IDs to their role on every key; a client without
	// one is a RoleCryptoOfficer, allowed everything the emulator serves.
	Roles map[string]Role
	// KeySize of generated RSA keys when a create request names none;
	// default 2048.
	KeySize int
	// RecoveryLevel reported for every key; default RecoveryProtected.
	RecoveryLevel string
	// TokenLifetime of issued access tokens; default one hour.
	TokenLifetime time.Duration
}

// Role is a client's Key Vault RBAC role, modelled on Azure's built-in
// ones, so tests can prove an identity cannot do what its role forbids:
// the plugin's identity needs only RoleCryptoServiceEncryptionUser, and
// only kmsctl's identity may create or change versions.
type Role string

const (
	// RoleCryptoOfficer is "Key Vault Crypto Officer": every key operation
	// the emulator serves (get, list, create, update, rotate, wrap, unwrap).
	RoleCryptoOfficer Role = "cryptoOfficer"
	// RoleCryptoServiceEncryptionUser is "Key Vault Crypto Service
	// Encryption User": read key metadata (get, list versions), wrapKey and
	// unwrapKey; nothing that creates or changes a version.
	RoleCryptoServiceEncryptionUser Role = "cryptoServiceEncryptionUser"
)

// ParseRole reads a role name as the CLI takes it.
func ParseRole(s string) (Role, error) {
	switch r := Role(s); r {
	case RoleCryptoOfficer, RoleCryptoServiceEncryptionUser:
		return r, nil
	}
	return "", fmt.Errorf("role %q: want %s or %s", s, RoleCryptoOfficer, RoleCryptoServiceEncryptionUser)
}

// allows reports whether the role grants the data action, as Azure RBAC
// decides it (Microsoft.KeyVault/vaults/keys/<action>).
func (r Role) allows(a action) bool {
	switch r {
	case RoleCryptoServiceEncryptionUser:
		return a == actionRead || a == actionWrap || a == actionUnwrap
	default:
		return true
	}
}

// Outage modes for SetOutage.
type Outage int

const (
	// OutageNone serves normally.
	OutageNone Outage = iota
	// OutageUnavailable answers every Key Vault request with 503.
	OutageUnavailable
	// OutageConnReset closes the connection without an answer.
	OutageConnReset
)

// Counts are the requests the emulator has seen since the last ResetCounts.
type Counts struct {
	// Requests is every Key Vault request, including challenges, throttled
	// and failed ones: the load a real vault would have seen.
	Requests int64
	// Throttled requests got a 429.
	Throttled int64
	// Wrap and Unwrap count key operations that reached the key (after
	// authentication, throttling and outage switches), successful or not.
	Wrap, Unwrap int64
	// Get, List, Create, Update and Rotate count the other operations.
	Get, List, Create, Update, Rotate int64
	// Tokens issued by the token endpoint.
	Tokens int64
}

// Emulator is a running emulator.
type Emulator struct {
	// URL is the base URL of both the vault and the authority host, with a
	// trailing slash: https://127.0.0.1:PORT/.
	URL string
	// CAPool trusts the emulator's certificate.
	CAPool *x509.CertPool
	// CAFile is Dir/ca.pem, or "" when Options.Dir was empty.
	CAFile string
	// TenantID the emulator expects tokens to be requested for.
	TenantID string

	opts     Options
	srv      *http.Server
	listener net.Listener

	mu       sync.Mutex
	keys     map[string]*key
	clients  map[string]string
	roles    map[string]Role
	tokens   map[string]grant
	lastTime time.Time

	latency    atomic.Int64 // time.Duration
	outage     atomic.Int32
	revoked    atomic.Bool
	throttleN  atomic.Int64 // >0: that many more; <0: until cleared
	throttleRA atomic.Int64 // time.Duration

	requests, throttled, wraps, unwraps, gets, lists, creates, updates, rotates, tokenCount atomic.Int64
}

// grant is an issued access token: whose it is, so every Key Vault request
// is checked against that client's role, and until when it is valid.
type grant struct {
	client  string
	expires time.Time
}

type key struct {
	name     string
	versions []*version // creation order
}

type version struct {
	id         string
	kty        string
	priv       *rsa.PrivateKey
	ops        []string
	enabled    bool
	exportable bool
	nbf, exp   *time.Time
	created    time.Time
	updated    time.Time
	tags       map[string]string
}

// Start serves a new emulator on loopback until Close.
func Start(opts Options) (*Emulator, error) {
	if opts.Addr == "" {
		opts.Addr = "127.0.0.1:0"
	}
	if opts.TenantID == "" {
		opts.TenantID = DefaultTenantID
	}
	if opts.KeySize == 0 {
		opts.KeySize = 2048
	}
	if opts.RecoveryLevel == "" {
		opts.RecoveryLevel = RecoveryProtected
	}
	if opts.TokenLifetime == 0 {
		opts.TokenLifetime = time.Hour
	}
	ln, err := net.Listen("tcp", opts.Addr)
	if err != nil {
		return nil, fmt.Errorf("emulator: listen: %w", err)
	}
	host, _, _ := net.SplitHostPort(ln.Addr().String())
	caPEM, cert, err := newCertificate(host)
	if err != nil {
		ln.Close()
		return nil, err
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	e := &Emulator{
		URL:      "https://" + ln.Addr().String() + "/",
		CAPool:   pool,
		TenantID: opts.TenantID,
		opts:     opts,
		listener: ln,
		keys:     map[string]*key{},
		clients:  map[string]string{},
		roles:    map[string]Role{},
		tokens:   map[string]grant{},
	}
	for id, secret := range opts.Clients {
		e.clients[id] = secret
	}
	for id, role := range opts.Roles {
		e.roles[id] = role
	}
	if opts.Dir != "" {
		e.CAFile = filepath.Join(opts.Dir, "ca.pem")
		if err := os.WriteFile(e.CAFile, caPEM, 0o644); err != nil {
			ln.Close()
			return nil, fmt.Errorf("emulator: write CA: %w", err)
		}
	}
	e.srv = &http.Server{
		Handler:           http.HandlerFunc(e.serve),
		ReadHeaderTimeout: 10 * time.Second,
		TLSConfig:         &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12},
		// HTTP/1.1 only, so an outage can hijack and drop the connection.
		TLSNextProto: map[string]func(*http.Server, *tls.Conn, http.Handler){},
	}
	go func() { _ = e.srv.ServeTLS(ln, "", "") }()
	return e, nil
}

// Close stops the server.
func (e *Emulator) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := e.srv.Shutdown(ctx); err != nil {
		return e.srv.Close()
	}
	return nil
}

// AddClient registers a client ID and secret with the token endpoint.
func (e *Emulator) AddClient(id, secret string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.clients[id] = secret
}

// AddClientWithRole registers a client like AddClient, with its role on
// every key; the role applies at once, also to tokens already issued, as a
// role assignment change does in Azure (minus the propagation delay).
func (e *Emulator) AddClientWithRole(id, secret string, role Role) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.clients[id] = secret
	e.roles[id] = role
}

// role is the client's role; default RoleCryptoOfficer. Callers hold e.mu.
func (e *Emulator) role(client string) Role {
	if r, ok := e.roles[client]; ok {
		return r
	}
	return RoleCryptoOfficer
}

// RevokeTokens forgets every issued token, so the next Key Vault request
// is challenged again (as after token expiry).
func (e *Emulator) RevokeTokens() {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.tokens = map[string]grant{}
}

// SetLatency delays every Key Vault request by d (0 turns it off).
func (e *Emulator) SetLatency(d time.Duration) { e.latency.Store(int64(d)) }

// Throttle answers the next n Key Vault requests with 429 and a Retry-After
// of retryAfter (sent in whole seconds as Retry-After and in milliseconds as
// retry-after-ms, as the service does). n < 0 throttles until Throttle(0, 0).
func (e *Emulator) Throttle(n int, retryAfter time.Duration) {
	e.throttleRA.Store(int64(retryAfter))
	e.throttleN.Store(int64(n))
}

// SetAccessRevoked, while true, answers every authenticated Key Vault
// request with 403 Forbidden (inner code ForbiddenByRbac), as the service
// does once the caller's role assignment or access policy is removed: the
// token stays valid, the identity is no longer allowed. False restores
// access; tokens issued meanwhile keep working.
func (e *Emulator) SetAccessRevoked(revoked bool) { e.revoked.Store(revoked) }

// SetOutage switches the Key Vault endpoints into an outage mode. The token
// endpoints keep working: an Entra outage is a different failure.
func (e *Emulator) SetOutage(o Outage) { e.outage.Store(int32(o)) }

// Counts returns the counters.
func (e *Emulator) Counts() Counts {
	return Counts{
		Requests: e.requests.Load(), Throttled: e.throttled.Load(),
		Wrap: e.wraps.Load(), Unwrap: e.unwraps.Load(),
		Get: e.gets.Load(), List: e.lists.Load(), Create: e.creates.Load(),
		Update: e.updates.Load(), Rotate: e.rotates.Load(), Tokens: e.tokenCount.Load(),
	}
}

// ResetCounts zeroes the counters.
func (e *Emulator) ResetCounts() {
	for _, c := range []*atomic.Int64{&e.requests, &e.throttled, &e.wraps, &e.unwraps, &e.gets, &e.lists, &e.creates, &e.updates, &e.rotates, &e.tokenCount} {
		c.Store(0)
	}
}

// KeyOptions describe a key created with CreateKey.
type KeyOptions struct {
	// Kty is "RSA" (default) or "RSA-HSM".
	Kty string
	// Exportable marks the key as exportable (a pre-flight warning).
	Exportable bool
	// Disabled creates the version disabled.
	Disabled bool
	// Tags of the new version.
	Tags map[string]string
}

// CreateKey adds a version to key name (creating the key), as an
// administrator would in the portal, and returns the new version's kid.
func (e *Emulator) CreateKey(name string, o KeyOptions) (string, error) {
	if o.Kty == "" {
		o.Kty = "RSA"
	}
	v, err := e.newVersion(name, o.Kty, e.opts.KeySize, nil, !o.Disabled, o.Exportable, o.Tags)
	if err != nil {
		return "", err
	}
	return e.kid(name, v.id), nil
}

// RotateKey adds a version like Key Vault's rotation policy does: same key
// type and size as the newest version, enabled, without tags. It returns the
// new version's kid.
func (e *Emulator) RotateKey(name string) (string, error) {
	v, err := e.rotate(name)
	if err != nil {
		return "", err
	}
	return e.kid(name, v.id), nil
}

// SetEnabled enables or disables one version directly, as an administrator
// could in the portal.
func (e *Emulator) SetEnabled(name, versionID string, enabled bool) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	v := e.find(name, versionID)
	if v == nil {
		return fmt.Errorf("emulator: no version %s/%s", name, versionID)
	}
	v.enabled = enabled
	v.updated = e.tick()
	return nil
}

func (e *Emulator) kid(name, ver string) string {
	return e.URL + "keys/" + name + "/" + ver
}

// tick returns the current time in whole seconds (Key Vault's resolution),
// strictly after the previous tick, so versions made in a burst still have a
// well-defined creation order, as versions made seconds apart do in a real
// vault. Callers hold e.mu.
func (e *Emulator) tick() time.Time {
	t := time.Now().Truncate(time.Second)
	if !t.After(e.lastTime) {
		t = e.lastTime.Add(time.Second)
	}
	e.lastTime = t
	return t
}

func (e *Emulator) find(name, ver string) *version {
	k := e.keys[name]
	if k == nil || len(k.versions) == 0 {
		return nil
	}
	if ver == "" {
		return k.versions[len(k.versions)-1]
	}
	for _, v := range k.versions {
		if v.id == ver {
			return v
		}
	}
	return nil
}

func (e *Emulator) newVersion(name, kty string, size int, ops []string, enabled, exportable bool, tags map[string]string) (*version, error) {
	if kty != "RSA" && kty != "RSA-HSM" {
		return nil, fmt.Errorf("emulator: key type %q not supported, want RSA or RSA-HSM", kty)
	}
	if size == 0 {
		size = e.opts.KeySize
	}
	if size < 1024 || size > 4096 {
		return nil, fmt.Errorf("emulator: key size %d not supported", size)
	}
	priv, err := rsa.GenerateKey(rand.Reader, size)
	if err != nil {
		return nil, err
	}
	idb := make([]byte, 16)
	if _, err := rand.Read(idb); err != nil {
		return nil, err
	}
	if len(ops) == 0 {
		ops = []string{"encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey"}
	}
	t := map[string]string{}
	for k, v := range tags {
		t[k] = v
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	now := e.tick()
	v := &version{id: hex.EncodeToString(idb), kty: kty, priv: priv, ops: ops, enabled: enabled,
		exportable: exportable, created: now, updated: now, tags: t}
	k := e.keys[name]
	if k == nil {
		k = &key{name: name}
		e.keys[name] = k
	}
	k.versions = append(k.versions, v)
	return v, nil
}

func (e *Emulator) rotate(name string) (*version, error) {
	e.mu.Lock()
	cur := e.find(name, "")
	e.mu.Unlock()
	if cur == nil {
		return nil, errNotFound
	}
	return e.newVersion(name, cur.kty, cur.priv.N.BitLen(), cur.ops, true, cur.exportable, nil)
}

var errNotFound = errors.New("not found")

// oaepHash returns the hash an RSA-OAEP algorithm name stands for.
func oaepHash(alg string) (func() hash.Hash, bool) {
	switch alg {
	case "RSA-OAEP-256":
		return sha256.New, true
	case "RSA-OAEP":
		return sha1.New, true
	}
	return nil, false
}

func wrap(v *version, alg string, pt []byte) ([]byte, error) {
	h, ok := oaepHash(alg)
	if !ok {
		return nil, fmt.Errorf("algorithm %q not supported", alg)
	}
	return rsa.EncryptOAEP(h(), rand.Reader, &v.priv.PublicKey, pt, nil)
}

func unwrap(v *version, alg string, ct []byte) ([]byte, error) {
	h, ok := oaepHash(alg)
	if !ok {
		return nil, fmt.Errorf("algorithm %q not supported", alg)
	}
	return rsa.DecryptOAEP(h(), nil, v.priv, ct, nil)
}

// newCertificate makes a throwaway CA and a server certificate for host,
// localhost, 127.0.0.1 and ::1.
func newCertificate(host string) ([]byte, tls.Certificate, error) {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, tls.Certificate{}, err
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "keyvault-emulator CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(7 * 24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return nil, tls.Certificate{}, err
	}
	caCert, err := x509.ParseCertificate(caDER)
	if err != nil {
		return nil, tls.Certificate{}, err
	}
	leafKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, tls.Certificate{}, err
	}
	leafTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "keyvault-emulator"},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(7 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:     []string{"localhost"},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
	}
	if ip := net.ParseIP(host); ip != nil && !ip.IsLoopback() {
		leafTmpl.IPAddresses = append(leafTmpl.IPAddresses, ip)
	}
	leafDER, err := x509.CreateCertificate(rand.Reader, leafTmpl, caCert, &leafKey.PublicKey, caKey)
	if err != nil {
		return nil, tls.Certificate{}, err
	}
	caPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})
	return caPEM, tls.Certificate{Certificate: [][]byte{leafDER, caDER}, PrivateKey: leafKey}, nil
}
