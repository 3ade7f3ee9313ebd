package emulator

import (
	"crypto/rand"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"math/big"
	"net/http"
	"net/url"
	"sort"
	"strconv"
	"strings"
	"time"
)

// pageSize is the most versions one list page holds, as in the service, so
// clients must follow nextLink.
const pageSize = 25

func (e *Emulator) serve(w http.ResponseWriter, r *http.Request) {
	parts := strings.Split(strings.TrimPrefix(r.URL.Path, "/"), "/")
	switch {
	case len(parts) >= 1 && parts[0] == "keys":
		e.serveVault(w, r, parts[1:])
	case len(parts) == 4 && parts[1] == "v2.0" && parts[2] == ".well-known" && parts[3] == "openid-configuration" && r.Method == http.MethodGet:
		e.serveOpenID(w, parts[0])
	case len(parts) == 4 && parts[1] == "oauth2" && parts[2] == "v2.0" && parts[3] == "token" && r.Method == http.MethodPost:
		e.serveToken(w, r, parts[0])
	default:
		writeError(w, http.StatusNotFound, "NotFound", "no such endpoint in the emulator: "+r.Method+" "+r.URL.Path, "")
	}
}

// serveOpenID answers OpenID discovery the way Entra ID does for a tenant.
func (e *Emulator) serveOpenID(w http.ResponseWriter, tenant string) {
	if tenant != e.TenantID {
		writeOAuthError(w, http.StatusBadRequest, "invalid_tenant", "unknown tenant "+tenant)
		return
	}
	base := e.URL + tenant
	writeJSON(w, http.StatusOK, map[string]any{
		"issuer":                                base + "/v2.0",
		"token_endpoint":                        base + "/oauth2/v2.0/token",
		"authorization_endpoint":                base + "/oauth2/v2.0/authorize",
		"device_authorization_endpoint":         base + "/oauth2/v2.0/devicecode",
		"jwks_uri":                              base + "/discovery/v2.0/keys",
		"response_types_supported":              []string{"code", "id_token", "code id_token", "id_token token"},
		"token_endpoint_auth_methods_supported": []string{"client_secret_post", "private_key_jwt", "client_secret_basic"},
		"tenant_region_scope":                   "EU",
	})
}

// serveToken implements the client-credentials grant with a client secret,
// or with a client assertion registered by AddFederatedToken (what workload
// identity sends).
func (e *Emulator) serveToken(w http.ResponseWriter, r *http.Request, tenant string) {
	if tenant != e.TenantID {
		writeOAuthError(w, http.StatusBadRequest, "invalid_tenant", "unknown tenant "+tenant)
		return
	}
	if err := r.ParseForm(); err != nil {
		writeOAuthError(w, http.StatusBadRequest, "invalid_request", "bad form")
		return
	}
	if g := r.PostForm.Get("grant_type"); g != "client_credentials" {
		writeOAuthError(w, http.StatusBadRequest, "unsupported_grant_type", "grant "+g+" not supported")
		return
	}
	// MSAL adds the OpenID scopes (openid, profile, offline_access).
	if s := r.PostForm.Get("scope"); !containsField(s, DefaultResource+"/.default") {
		writeOAuthError(w, http.StatusBadRequest, "invalid_scope", "scope "+s+" not served here")
		return
	}
	id := r.PostForm.Get("client_id")
	e.mu.Lock()
	want, known := e.clients[id]
	e.mu.Unlock()
	got := r.PostForm.Get("client_secret")
	if got == "" {
		got = r.PostForm.Get("client_assertion")
	}
	if !known || got == "" || subtle.ConstantTimeCompare([]byte(got), []byte(want)) != 1 {
		writeOAuthError(w, http.StatusUnauthorized, "invalid_client", "AADSTS7000215: Invalid client secret provided.")
		return
	}
	b := make([]byte, 24)
	_, _ = rand.Read(b)
	tok := hex.EncodeToString(b)
	e.mu.Lock()
	e.tokens[tok] = grant{client: id, expires: time.Now().Add(e.opts.TokenLifetime)}
	e.mu.Unlock()
	e.tokenCount.Add(1)
	secs := int(e.opts.TokenLifetime / time.Second)
	writeJSON(w, http.StatusOK, map[string]any{
		"token_type": "Bearer", "access_token": tok, "expires_in": secs, "ext_expires_in": secs,
	})
}

// AddFederatedToken lets clientID authenticate with token as its client
// assertion, as a workload-identity credential does with its projected
// service-account token.
func (e *Emulator) AddFederatedToken(clientID, token string) { e.AddClient(clientID, token) }

// authorized returns the client a request's bearer token was issued to,
// or false when it has no valid token.
func (e *Emulator) authorized(r *http.Request) (client string, ok bool) {
	tok, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !ok {
		return "", false
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	g, ok := e.tokens[tok]
	if !ok || !time.Now().Before(g.expires) {
		return "", false
	}
	return g.client, true
}

func (e *Emulator) serveVault(w http.ResponseWriter, r *http.Request, p []string) {
	e.requests.Add(1)
	switch Outage(e.outage.Load()) {
	case OutageUnavailable:
		writeError(w, http.StatusServiceUnavailable, "ServiceUnavailable", "The service is temporarily unavailable.", "")
		return
	case OutageConnReset:
		if hj, ok := w.(http.Hijacker); ok {
			if c, _, err := hj.Hijack(); err == nil {
				c.Close()
				return
			}
		}
		panic(http.ErrAbortHandler)
	}
	if d := time.Duration(e.latency.Load()); d > 0 {
		select {
		case <-time.After(d):
		case <-r.Context().Done():
			return
		}
	}
	if e.takeThrottle() {
		e.throttled.Add(1)
		ra := time.Duration(e.throttleRA.Load())
		w.Header().Set("Retry-After", strconv.Itoa(int((ra+time.Second-1)/time.Second)))
		w.Header().Set("retry-after-ms", strconv.FormatInt(ra.Milliseconds(), 10))
		writeError(w, http.StatusTooManyRequests, "Throttled", "Request was not processed because too many requests were received.", "")
		return
	}
	client, ok := e.authorized(r)
	if !ok {
		w.Header().Set("WWW-Authenticate", fmt.Sprintf(`Bearer authorization="%s%s", resource="%s"`, e.URL, e.TenantID, DefaultResource))
		writeError(w, http.StatusUnauthorized, "Unauthorized", "AKV10000: Request is missing a Bearer or PoP token.", "")
		return
	}
	if e.revoked.Load() {
		writeForbiddenByRbac(w, " (access revoked in the emulator)")
		return
	}
	if r.URL.Query().Get("api-version") == "" {
		writeError(w, http.StatusBadRequest, "BadParameter", "The 'api-version' query parameter is missing.", "")
		return
	}
	if len(p) == 0 || p[0] == "" {
		writeError(w, http.StatusNotFound, "NotFound", "no key name in "+r.URL.Path, "")
		return
	}
	name := p[0]
	rest := p[1:]
	if len(rest) > 0 && rest[len(rest)-1] == "" {
		rest = rest[:len(rest)-1]
	}
	o, ok := route(r.Method, rest)
	if !ok {
		writeError(w, http.StatusNotFound, "NotFound", "no such operation in the emulator: "+r.Method+" "+r.URL.Path, "")
		return
	}
	if !e.allowed(client, o.action()) {
		writeForbiddenByRbac(w, "", "Caller: appid="+client, "Action: '"+string(o.action())+"'",
			"Resource: 'keys/"+name+"'", "Assignment: (not found)", "DecisionReason: 'DeniedWithNoValidRBAC'")
		return
	}
	e.dispatch(w, r, o, name, rest)
}

// operation is one Key Vault key operation the emulator serves.
type operation int

const (
	opGet operation = iota
	opList
	opCreate
	opRotate
	opUpdate
	opWrap
	opUnwrap
)

// action is an Azure RBAC data action on keys, as the service names it in
// a ForbiddenByRbac answer.
type action string

const (
	actionRead   action = "Microsoft.KeyVault/vaults/keys/read"
	actionCreate action = "Microsoft.KeyVault/vaults/keys/create/action"
	actionUpdate action = "Microsoft.KeyVault/vaults/keys/update/action"
	actionRotate action = "Microsoft.KeyVault/vaults/keys/rotate/action"
	actionWrap   action = "Microsoft.KeyVault/vaults/keys/wrap/action"
	actionUnwrap action = "Microsoft.KeyVault/vaults/keys/unwrap/action"
)

// action is the data action a role must grant for o.
func (o operation) action() action {
	return [...]action{opGet: actionRead, opList: actionRead, opCreate: actionCreate, opRotate: actionRotate,
		opUpdate: actionUpdate, opWrap: actionWrap, opUnwrap: actionUnwrap}[o]
}

// route names the operation of a request on /keys/{name}/rest..., or
// false when the emulator serves no such operation.
func route(method string, rest []string) (operation, bool) {
	switch {
	case len(rest) == 0 && method == http.MethodGet:
		return opGet, true
	case len(rest) == 1 && rest[0] == "versions" && method == http.MethodGet:
		return opList, true
	case len(rest) == 1 && rest[0] == "create" && method == http.MethodPost:
		return opCreate, true
	case len(rest) == 1 && rest[0] == "rotate" && method == http.MethodPost:
		return opRotate, true
	case len(rest) == 1 && method == http.MethodGet:
		return opGet, true
	case len(rest) == 1 && method == http.MethodPatch:
		return opUpdate, true
	case len(rest) == 2 && rest[1] == "wrapkey" && method == http.MethodPost:
		return opWrap, true
	case len(rest) == 2 && rest[1] == "unwrapkey" && method == http.MethodPost:
		return opUnwrap, true
	}
	return 0, false
}

// allowed reports whether client's role grants a.
func (e *Emulator) allowed(client string, a action) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.role(client).allows(a)
}

// dispatch runs an authorized operation and counts it.
func (e *Emulator) dispatch(w http.ResponseWriter, r *http.Request, o operation, name string, rest []string) {
	switch o {
	case opGet:
		e.gets.Add(1)
		ver := ""
		if len(rest) == 1 {
			ver = rest[0]
		}
		e.getKey(w, name, ver)
	case opList:
		e.lists.Add(1)
		e.listVersions(w, r, name)
	case opCreate:
		e.creates.Add(1)
		e.createKey(w, r, name)
	case opRotate:
		e.rotates.Add(1)
		v, err := e.rotate(name)
		if err != nil {
			writeNotFound(w, name)
			return
		}
		e.writeBundle(w, name, v)
	case opUpdate:
		e.updates.Add(1)
		e.updateKey(w, r, name, rest[0])
	case opWrap:
		e.wraps.Add(1)
		e.keyOp(w, r, name, rest[0], "wrapKey")
	case opUnwrap:
		e.unwraps.Add(1)
		e.keyOp(w, r, name, rest[0], "unwrapKey")
	}
}

// takeThrottle reports whether this request is throttled, consuming one of
// the remaining throttled requests.
func (e *Emulator) takeThrottle() bool {
	for {
		n := e.throttleN.Load()
		switch {
		case n == 0:
			return false
		case n < 0:
			return true
		case e.throttleN.CompareAndSwap(n, n-1):
			return true
		}
	}
}

func (e *Emulator) getKey(w http.ResponseWriter, name, ver string) {
	e.mu.Lock()
	v := e.find(name, ver)
	e.mu.Unlock()
	if v == nil {
		writeNotFound(w, name)
		return
	}
	e.writeBundle(w, name, v)
}

func (e *Emulator) listVersions(w http.ResponseWriter, r *http.Request, name string) {
	skip, _ := strconv.Atoi(r.URL.Query().Get("$skiptoken"))
	max := pageSize
	if m, err := strconv.Atoi(r.URL.Query().Get("maxresults")); err == nil && m > 0 && m < max {
		max = m
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	k := e.keys[name]
	if k == nil {
		writeNotFound(w, name)
		return
	}
	items := []map[string]any{}
	for i := skip; i < len(k.versions) && len(items) < max; i++ {
		v := k.versions[i]
		items = append(items, map[string]any{
			"kid": e.kid(name, v.id), "attributes": e.attributes(v), "tags": v.tags, "managed": false,
		})
	}
	out := map[string]any{"value": items, "nextLink": nil}
	if next := skip + len(items); next < len(k.versions) {
		q := url.Values{"api-version": {r.URL.Query().Get("api-version")}, "$skiptoken": {strconv.Itoa(next)}, "maxresults": {strconv.Itoa(max)}}
		out["nextLink"] = e.URL + "keys/" + name + "/versions?" + q.Encode()
	}
	writeJSON(w, http.StatusOK, out)
}

type attributesIn struct {
	Enabled    *bool  `json:"enabled"`
	Exportable *bool  `json:"exportable"`
	NotBefore  *int64 `json:"nbf"`
	Expires    *int64 `json:"exp"`
}

func (e *Emulator) createKey(w http.ResponseWriter, r *http.Request, name string) {
	var in struct {
		Kty        string            `json:"kty"`
		KeySize    int               `json:"key_size"`
		KeyOps     []string          `json:"key_ops"`
		Attributes *attributesIn     `json:"attributes"`
		Tags       map[string]string `json:"tags"`
	}
	if err := json.NewDecoder(r.Body).Decode(&in); err != nil {
		writeError(w, http.StatusBadRequest, "BadParameter", "Request body is not valid JSON.", "")
		return
	}
	enabled, exportable := true, false
	if a := in.Attributes; a != nil {
		if a.Enabled != nil {
			enabled = *a.Enabled
		}
		if a.Exportable != nil {
			exportable = *a.Exportable
		}
	}
	v, err := e.newVersion(name, in.Kty, in.KeySize, in.KeyOps, enabled, exportable, in.Tags)
	if err != nil {
		writeError(w, http.StatusBadRequest, "BadParameter", err.Error(), "")
		return
	}
	if a := in.Attributes; a != nil {
		e.mu.Lock()
		v.nbf, v.exp = unixPtr(a.NotBefore), unixPtr(a.Expires)
		e.mu.Unlock()
	}
	e.writeBundle(w, name, v)
}

func (e *Emulator) updateKey(w http.ResponseWriter, r *http.Request, name, ver string) {
	var in struct {
		Attributes *attributesIn      `json:"attributes"`
		KeyOps     []string           `json:"key_ops"`
		Tags       *map[string]string `json:"tags"`
	}
	if err := json.NewDecoder(r.Body).Decode(&in); err != nil {
		writeError(w, http.StatusBadRequest, "BadParameter", "Request body is not valid JSON.", "")
		return
	}
	e.mu.Lock()
	v := e.find(name, ver)
	if v == nil || ver == "" {
		e.mu.Unlock()
		writeNotFound(w, name)
		return
	}
	if a := in.Attributes; a != nil {
		if a.Enabled != nil {
			v.enabled = *a.Enabled
		}
		if a.NotBefore != nil {
			v.nbf = unixPtr(a.NotBefore)
		}
		if a.Expires != nil {
			v.exp = unixPtr(a.Expires)
		}
	}
	if in.KeyOps != nil {
		v.ops = in.KeyOps
	}
	if in.Tags != nil {
		v.tags = map[string]string{}
		for k, val := range *in.Tags {
			v.tags[k] = val
		}
	}
	v.updated = e.tick()
	e.mu.Unlock()
	e.writeBundle(w, name, v)
}

// keyOp runs wrapKey or unwrapKey with one explicit version.
func (e *Emulator) keyOp(w http.ResponseWriter, r *http.Request, name, ver, op string) {
	var in struct {
		Alg   string `json:"alg"`
		Value string `json:"value"`
	}
	if err := json.NewDecoder(r.Body).Decode(&in); err != nil {
		writeError(w, http.StatusBadRequest, "BadParameter", "Request body is not valid JSON.", "")
		return
	}
	data, err := decodeB64URL(in.Value)
	if err != nil {
		writeError(w, http.StatusBadRequest, "BadParameter", "The parameter value is not valid base64url.", "")
		return
	}
	e.mu.Lock()
	v := e.find(name, ver)
	var enabled, permitted bool
	if v != nil {
		enabled = v.enabled
		for _, o := range v.ops {
			permitted = permitted || o == op
		}
	}
	e.mu.Unlock()
	switch {
	case v == nil:
		writeNotFound(w, name+"/"+ver)
		return
	case !enabled:
		writeError(w, http.StatusForbidden, "Forbidden", "Operation "+op+" is not allowed on a disabled key.", "KeyDisabled")
		return
	case !permitted:
		writeError(w, http.StatusForbidden, "Forbidden", "Operation "+op+" is not permitted on this key.", "KeyOperationForbidden")
		return
	}
	if _, ok := oaepHash(in.Alg); !ok {
		writeError(w, http.StatusBadRequest, "BadParameter", "Invalid algorithm "+in.Alg+".", "")
		return
	}
	var out []byte
	if op == "wrapKey" {
		out, err = wrap(v, in.Alg, data)
	} else {
		out, err = unwrap(v, in.Alg, data)
	}
	if err != nil {
		// The service answers a ciphertext it cannot unwrap with this
		// terse 400, whatever the reason.
		writeError(w, http.StatusBadRequest, "BadParameter", "The parameter is incorrect.", "")
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"kid": e.kid(name, v.id), "value": base64.RawURLEncoding.EncodeToString(out)})
}

func (e *Emulator) attributes(v *version) map[string]any {
	a := map[string]any{
		"enabled":         v.enabled,
		"created":         v.created.Unix(),
		"updated":         v.updated.Unix(),
		"recoveryLevel":   e.opts.RecoveryLevel,
		"recoverableDays": 90,
		"exportable":      v.exportable,
	}
	if v.nbf != nil {
		a["nbf"] = v.nbf.Unix()
	}
	if v.exp != nil {
		a["exp"] = v.exp.Unix()
	}
	return a
}

func (e *Emulator) writeBundle(w http.ResponseWriter, name string, v *version) {
	e.mu.Lock()
	defer e.mu.Unlock()
	tags := map[string]string{}
	for k, val := range v.tags {
		tags[k] = val
	}
	ops := append([]string(nil), v.ops...)
	sort.Strings(ops)
	writeJSON(w, http.StatusOK, map[string]any{
		"key": map[string]any{
			"kid":     e.kid(name, v.id),
			"kty":     v.kty,
			"key_ops": ops,
			"n":       base64.RawURLEncoding.EncodeToString(v.priv.N.Bytes()),
			"e":       base64.RawURLEncoding.EncodeToString(big.NewInt(int64(v.priv.E)).Bytes()),
		},
		"attributes": e.attributes(v),
		"tags":       tags,
	})
}

func unixPtr(s *int64) *time.Time {
	if s == nil {
		return nil
	}
	t := time.Unix(*s, 0)
	return &t
}

func decodeB64URL(s string) ([]byte, error) {
	return base64.RawURLEncoding.DecodeString(strings.TrimRight(s, "="))
}

func writeNotFound(w http.ResponseWriter, name string) {
	writeError(w, http.StatusNotFound, "KeyNotFound", "A key with (name/id) "+name+" was not found in this key vault.", "")
}

// writeForbiddenByRbac answers 403 as Key Vault does when the caller's
// token is valid but no role assignment grants the action: code Forbidden,
// inner code ForbiddenByRbac, and a message whose first line is the
// service's (plus note), followed, when given, by the detail lines the
// service sends (Caller, Action, Resource, decision), separated by CRLF.
func writeForbiddenByRbac(w http.ResponseWriter, note string, detail ...string) {
	msg := "Caller is not authorized to perform action on resource." + note
	if len(detail) > 0 {
		lines := append([]string{msg, "If role assignments, deny assignments or role definitions were changed recently, please observe propagation time."}, detail...)
		msg = strings.Join(lines, "\r\n") + "\r\n"
	}
	writeError(w, http.StatusForbidden, "Forbidden", msg, "ForbiddenByRbac")
}

func writeError(w http.ResponseWriter, status int, code, msg, inner string) {
	body := map[string]any{"code": code, "message": msg}
	if inner != "" {
		body["innererror"] = map[string]any{"code": inner}
	}
	writeJSON(w, status, map[string]any{"error": body})
}

func writeOAuthError(w http.ResponseWriter, status int, code, desc string) {
	writeJSON(w, status, map[string]any{"error": code, "error_description": desc, "error_codes": []int{7000215}})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

func containsField(s, want string) bool {
	for _, f := range strings.Fields(s) {
		if f == want {
			return true
		}
	}
	return false
}
