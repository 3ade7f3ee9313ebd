//go:build !linux

package rotation

import "errors"

// signalZero is not used outside Linux: no holder is provably dead there.
func signalZero(int) error { return errors.ErrUnsupported }
