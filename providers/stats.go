package providers

import "time"

// Reporter is the optional capability of providers that report their own
// state for the plugin's metrics. The plugin reads it on every scrape, so
// Stats must be cheap, make no backend call, and never carry key material
// or plaintext (a key_id is public but is not reported here either: the
// plugin's metrics label key_ids only by hash).
type Reporter interface {
	Stats() Stats
}

// Stats is one reading of a provider's counters and state.
type Stats struct {
	// PrimaryCreated is when the version Encrypt uses was created, from
	// cached state; zero when the backend did not record it (a keyset
	// written before creation times were kept), in which case no creation
	// time is exported rather than a made-up one.
	PrimaryCreated time.Time
	// Caches are the provider's caches, each with its lookups since the
	// provider opened.
	Caches []CacheStats
	// Breaker is the state of the provider's circuit breaker; empty when
	// it has none.
	Breaker BreakerState
}

// CacheStats counts lookups in one cache since the provider opened.
type CacheStats struct {
	// Cache names the cache: CacheUnwrap or CacheKeyState.
	Cache  string
	Hits   uint64
	Misses uint64
}

// Cache names, as the plugin's metrics label them.
const (
	// CacheUnwrap is the seed cache in front of a slow unwrap (Unwrapper):
	// a hit is a Decrypt answered from memory, a miss one that went to the
	// device (or joined an identical call in flight).
	CacheUnwrap = "unwrap"
	// CacheKeyState is the snapshot of key versions (KeyCache): a hit is a
	// Decrypt whose key_id was in the snapshot, a miss one that made the
	// provider reload key state from the backend.
	CacheKeyState = "key_state"
)

// BreakerState is a circuit breaker's state.
type BreakerState string

// Breaker states.
const (
	// BreakerClosed: calls go to the backend.
	BreakerClosed BreakerState = "closed"
	// BreakerOpen: calls fail at once, until the open period ends and a
	// probe call is let through.
	BreakerOpen BreakerState = "open"
	// BreakerHalfOpen: one probe call is in flight; its result closes the
	// breaker or opens it again.
	BreakerHalfOpen BreakerState = "half_open"
)

// BreakerStates are every BreakerState, in the order above.
var BreakerStates = []BreakerState{BreakerClosed, BreakerOpen, BreakerHalfOpen}
