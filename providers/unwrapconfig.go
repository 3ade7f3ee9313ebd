package providers

import (
	"fmt"
	"strings"
	"time"
)

// Defaults of the unwrap cache, for every provider that has one.
const (
	// DefaultUnwrapCacheSize bounds the cache: enough for every seed a
	// large cluster's apiservers hold at once (one per key_id change and
	// apiserver), small enough to be no memory concern.
	DefaultUnwrapCacheSize = 1000
	// DefaultUnwrapCacheTTL keeps unwrapped seeds only for the burst of
	// reads after an apiserver restart.
	DefaultUnwrapCacheTTL = 5 * time.Minute
)

// UnwrapCache is the `unwrapCache:` section of the providers whose unwrap
// is slow (Key Vault, a TPM). Unset: DefaultUnwrapCacheSize entries for
// DefaultUnwrapCacheTTL.
type UnwrapCache struct {
	// Size is the most entries kept; 0 turns the cache off.
	Size int `json:"size"`
	// TTL is how long an entry lives; default DefaultUnwrapCacheTTL.
	TTL Duration `json:"ttl,omitempty"`
}

// Validate checks the section; field names it in errors. A nil section is
// valid (the defaults).
func (uc *UnwrapCache) Validate(field string) error {
	switch {
	case uc == nil:
		return nil
	case uc.Size < 0 || uc.Size > 1_000_000:
		return fmt.Errorf("%s.size %d: want 0 (off) to 1000000", field, uc.Size)
	case uc.TTL < 0 || time.Duration(uc.TTL) > time.Hour:
		return fmt.Errorf("%s.ttl %s: want at most 1h (seeds stay in memory that long)", field, time.Duration(uc.TTL))
	}
	return nil
}

// Options turns the section (nil: the defaults) into an Unwrapper's.
func (uc *UnwrapCache) Options(noCoalescing bool) UnwrapOptions {
	o := UnwrapOptions{CacheSize: DefaultUnwrapCacheSize, CacheTTL: DefaultUnwrapCacheTTL, NoCoalescing: noCoalescing}
	if uc != nil {
		o.CacheSize = uc.Size
		if uc.TTL > 0 {
			o.CacheTTL = time.Duration(uc.TTL)
		}
	}
	return o
}

// Duration is a time.Duration written in YAML as a Go duration string
// ("5m"), for backend sections (package config has its own and imports no
// backend).
type Duration time.Duration

// MarshalJSON writes d as a duration string.
func (d Duration) MarshalJSON() ([]byte, error) {
	return []byte(`"` + time.Duration(d).String() + `"`), nil
}

// UnmarshalJSON reads a duration string such as "5m".
func (d *Duration) UnmarshalJSON(b []byte) error {
	v, err := time.ParseDuration(strings.Trim(string(b), `"`))
	if err != nil {
		return fmt.Errorf("duration %s: want a value such as 30s or 5m", b)
	}
	*d = Duration(v)
	return nil
}
