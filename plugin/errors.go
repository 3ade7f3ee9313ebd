package plugin

import (
	"context"
	"errors"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/kms-v2/kms-plugin/providers"
)

// errorClass names the kind of a provider failure. It is the one place that
// maps sentinel errors to gRPC codes, and the class labels metrics and health
// without ever carrying error text (which could name a backend detail).
type errorClass struct {
	code  codes.Code
	label string
}

// classify maps an error from a provider to its class.
func classify(err error) errorClass {
	switch {
	case err == nil:
		return errorClass{codes.OK, "ok"}
	case errors.Is(err, providers.ErrInvalidInput):
		return errorClass{codes.InvalidArgument, "invalid_input"}
	case errors.Is(err, providers.ErrInvalidCiphertext):
		return errorClass{codes.InvalidArgument, "invalid_ciphertext"}
	case errors.Is(err, providers.ErrKeyNotFound):
		return errorClass{codes.NotFound, "key_not_found"}
	case errors.Is(err, providers.ErrKeyDisabled):
		return errorClass{codes.FailedPrecondition, "key_disabled"}
	case errors.Is(err, providers.ErrPermissionDenied):
		return errorClass{codes.PermissionDenied, "permission_denied"}
	case errors.Is(err, providers.ErrUnavailable):
		return errorClass{codes.Unavailable, "unavailable"}
	case errors.Is(err, providers.ErrRefused):
		return errorClass{codes.FailedPrecondition, "refused"}
	case errors.Is(err, context.DeadlineExceeded):
		return errorClass{codes.DeadlineExceeded, "deadline_exceeded"}
	case errors.Is(err, context.Canceled):
		return errorClass{codes.Canceled, "canceled"}
	}
	return errorClass{codes.Internal, "internal"}
}

// errorClasses are every failure label classify returns, so the error
// series can exist at 0 before the first failure (TestErrorClasses keeps
// the list and classify in step).
var errorClasses = []string{
	"invalid_input", "invalid_ciphertext", "key_not_found", "key_disabled", "permission_denied",
	"unavailable", "refused", "deadline_exceeded", "canceled", "internal",
}

// grpcError turns a provider error into the gRPC status the apiserver sees.
func grpcError(op string, err error) error {
	if err == nil {
		return nil
	}
	return status.Errorf(classify(err).code, "%s: %v", op, err)
}
