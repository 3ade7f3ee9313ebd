package azurekv

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/runtime"
	"github.com/Azure/azure-sdk-for-go/sdk/azidentity"

	"github.com/kms-v2/kms-plugin/providers"
)

// op names a Key Vault operation in errors and decides how a 400 is read.
type op string

const (
	opWrap   op = "wrapkey"
	opUnwrap op = "unwrapkey"
	opGet    op = "get key"
	opList   op = "list versions"
	opCreate op = "create version"
	opUpdate op = "update version"
)

// classify turns an SDK error into one wrapping a providers sentinel, with a
// one-line message naming the operation, the HTTP status and Key Vault's
// error code. The classes drive the plugin's gRPC codes, health and the
// circuit breaker, so they are decided here and nowhere else:
//
//	400 on unwrap          ErrInvalidCiphertext (not made by this version)
//	400 otherwise          ErrInvalidInput
//	401, 403               ErrPermissionDenied (ErrKeyDisabled when the key is disabled;
//	                       with ForbiddenByRbac, naming the refused action and the roles)
//	404                    ErrKeyNotFound
//	408, 429, 5xx, network ErrUnavailable
func classify(o op, target string, err error) error {
	if err == nil {
		return nil
	}
	prefix := fmt.Sprintf("azurekv: %s %s", o, target)
	var re *azcore.ResponseError
	if errors.As(err, &re) {
		code, inner, msg := errorBody(re)
		detail := fmt.Sprintf("%s: HTTP %d %s", prefix, re.StatusCode, code)
		if msg != "" {
			detail += ": " + msg
		}
		switch s := re.StatusCode; {
		case s == http.StatusBadRequest && o == opUnwrap:
			return fmt.Errorf("%s: %w", detail, providers.ErrInvalidCiphertext)
		case s == http.StatusBadRequest:
			return fmt.Errorf("%s: %w", detail, providers.ErrInvalidInput)
		case (s == http.StatusForbidden || s == http.StatusUnauthorized) &&
			(inner == "KeyDisabled" || strings.Contains(strings.ToLower(msg), "disabled key")):
			return fmt.Errorf("%s: %w", detail, providers.ErrKeyDisabled)
		case s == http.StatusForbidden && inner == "ForbiddenByRbac":
			return fmt.Errorf("%s: %s: %w", detail, rbacHint(re), providers.ErrPermissionDenied)
		case s == http.StatusUnauthorized || s == http.StatusForbidden:
			return fmt.Errorf("%s: %w", detail, providers.ErrPermissionDenied)
		case s == http.StatusNotFound:
			return fmt.Errorf("%s: %w", detail, providers.ErrKeyNotFound)
		case s == http.StatusConflict:
			return fmt.Errorf("%s: %w", detail, providers.ErrRefused)
		default:
			return fmt.Errorf("%s: %w", detail, providers.ErrUnavailable)
		}
	}
	var afe *azidentity.AuthenticationFailedError
	if errors.As(err, &afe) {
		detail := fmt.Sprintf("%s: getting a token: %s", prefix, strings.TrimSpace(firstLine(afe.Error())))
		r := afe.RawResponse
		if r != nil {
			detail += fmt.Sprintf(" HTTP %d", r.StatusCode)
			if b, err := runtime.Payload(r); err == nil {
				var body struct {
					Error       string `json:"error"`
					Description string `json:"error_description"`
				}
				if json.Unmarshal(b, &body) == nil && body.Error != "" {
					detail += " " + body.Error + ": " + firstLine(body.Description)
				}
			}
		}
		if r == nil || r.StatusCode == http.StatusTooManyRequests || r.StatusCode >= 500 {
			return fmt.Errorf("%s: %w", detail, providers.ErrUnavailable)
		}
		return fmt.Errorf("%s: %w", detail, providers.ErrPermissionDenied)
	}
	var cue interface{ CredentialUnavailable() }
	if errors.As(err, &cue) || strings.Contains(err.Error(), "credential unavailable") {
		return fmt.Errorf("%s: no usable credential: %s: %w", prefix, firstLine(err.Error()), providers.ErrPermissionDenied)
	}
	// Deadlines, cancellations and transport errors: the vault may answer
	// later. Context errors stay in the chain so the breaker can tell a
	// caller that gave up from a vault that is down.
	for _, ce := range []error{context.Canceled, context.DeadlineExceeded} {
		if errors.Is(err, ce) {
			return fmt.Errorf("%s: %w: %w", prefix, ce, providers.ErrUnavailable)
		}
	}
	return fmt.Errorf("%s: %s: %w", prefix, firstLine(err.Error()), providers.ErrUnavailable)
}

// errorBody reads Key Vault's {"error": {"code", "message", "innererror"}}.
func errorBody(re *azcore.ResponseError) (code, inner, msg string) {
	code = re.ErrorCode
	if re.RawResponse == nil {
		return code, "", ""
	}
	b, err := runtime.Payload(re.RawResponse)
	if err != nil {
		return code, "", ""
	}
	var body struct {
		Error struct {
			Code       string `json:"code"`
			Message    string `json:"message"`
			InnerError *struct {
				Code string `json:"code"`
			} `json:"innererror"`
		} `json:"error"`
	}
	if json.Unmarshal(b, &body) != nil {
		return code, "", ""
	}
	if body.Error.Code != "" {
		code = body.Error.Code
	}
	if body.Error.InnerError != nil {
		inner = body.Error.InnerError.Code
	}
	return code, inner, strings.TrimSpace(firstLine(body.Error.Message))
}

// rbacHint says what a ForbiddenByRbac answer means and what to do: the
// service names the refused data action on a later line of its message
// ("Action: 'Microsoft.KeyVault/vaults/keys/create/action'"), which the
// one-line error would otherwise drop.
func rbacHint(re *azcore.ResponseError) string {
	what := "this operation"
	if b, err := payload(re); err == nil {
		var body struct {
			Error struct{ Message string } `json:"error"`
		}
		if json.Unmarshal(b, &body) == nil {
			for _, line := range strings.Split(body.Error.Message, "\n") {
				if a, ok := strings.CutPrefix(strings.TrimSpace(line), "Action:"); ok {
					what = strings.Trim(strings.TrimSpace(a), "'")
				}
			}
		}
	}
	return "this identity's Key Vault role does not grant " + what +
		"; the plugin needs Key Vault Crypto Service Encryption User on the key, and creating, promoting or disabling versions needs Key Vault Crypto Officer" +
		" (run kmsctl with its own identity's config, see docs/identities.md)"
}

// payload is the response body, or an error when there is no response.
func payload(re *azcore.ResponseError) ([]byte, error) {
	if re.RawResponse == nil {
		return nil, errors.New("no response")
	}
	return runtime.Payload(re.RawResponse)
}

// retryAfter returns the delay a throttled or unavailable answer asked for.
func retryAfter(err error) time.Duration {
	var re *azcore.ResponseError
	if !errors.As(err, &re) || re.RawResponse == nil {
		return 0
	}
	h := re.RawResponse.Header
	for _, name := range []string{"retry-after-ms", "x-ms-retry-after-ms"} {
		if v := h.Get(name); v != "" {
			var ms int64
			if _, err := fmt.Sscan(v, &ms); err == nil && ms > 0 {
				return time.Duration(ms) * time.Millisecond
			}
		}
	}
	if v := h.Get("Retry-After"); v != "" {
		var s int64
		if _, err := fmt.Sscan(v, &s); err == nil && s > 0 {
			return time.Duration(s) * time.Second
		}
		if t, err := http.ParseTime(v); err == nil {
			return time.Until(t)
		}
	}
	return 0
}

// countsAsOutage reports whether err says the backend is unhealthy (as
// opposed to a bad request or the caller giving up).
func countsAsOutage(err error) bool {
	return errors.Is(err, providers.ErrUnavailable) && !errors.Is(err, context.Canceled)
}

func firstLine(s string) string {
	s, _, _ = strings.Cut(s, "\n")
	return s
}
