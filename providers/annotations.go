package providers

import (
	"fmt"
	"strings"
)

// ValidateAnnotations checks annotations against the rules kube-apiserver
// applies: every key a fully qualified DNS name (at least two labels, lower
// case, no "/"), keys and values at most MaxAnnotationsSize bytes in total.
func ValidateAnnotations(annotations map[string][]byte) error {
	total := 0
	for k, v := range annotations {
		if err := validateAnnotationKey(k); err != nil {
			return err
		}
		total += len(k) + len(v)
	}
	if total > MaxAnnotationsSize {
		return fmt.Errorf("annotations: %d bytes in total, at most %d allowed: %w", total, MaxAnnotationsSize, ErrInvalidInput)
	}
	return nil
}

func validateAnnotationKey(k string) error {
	if len(k) > 253 {
		return fmt.Errorf("annotation key of %d bytes: a DNS name has at most 253: %w", len(k), ErrInvalidInput)
	}
	labels := strings.Split(k, ".")
	if len(labels) < 2 {
		return fmt.Errorf("annotation key %q: want a fully qualified domain name such as x.example.com: %w", k, ErrInvalidInput)
	}
	for _, l := range labels {
		if !isDNSLabel(l) {
			return fmt.Errorf("annotation key %q: %q is not a lower-case DNS label: %w", k, l, ErrInvalidInput)
		}
	}
	return nil
}

// isDNSLabel reports whether l is an RFC 1123 label.
func isDNSLabel(l string) bool {
	if len(l) == 0 || len(l) > 63 {
		return false
	}
	for i := 0; i < len(l); i++ {
		c := l[i]
		switch {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9':
		case c == '-' && i > 0 && i < len(l)-1:
		default:
			return false
		}
	}
	return true
}
