package providers

import (
	"context"
	"testing"
	"time"
)

// TestUnwrapperStats: a cached seed counts a hit, a call that reaches the
// device (whether it fails or not) a miss.
func TestUnwrapperStats(t *testing.T) {
	u := NewUnwrapper(UnwrapOptions{CacheSize: 10, CacheTTL: time.Minute})
	ok := func(context.Context) ([]byte, error) { return []byte("seed"), nil }
	failing := func(context.Context) ([]byte, error) { return nil, ErrUnavailable }
	ctx := context.Background()
	u.Unwrap(ctx, "k:1", []byte{1}, ok)      // miss, cached
	u.Unwrap(ctx, "k:1", []byte{1}, ok)      // hit
	u.Unwrap(ctx, "k:1", []byte{1}, ok)      // hit
	u.Unwrap(ctx, "k:2", []byte{1}, failing) // miss, not cached
	got, want := u.Stats(), CacheStats{Cache: CacheUnwrap, Hits: 2, Misses: 2}
	if got != want {
		t.Errorf("Stats() = %+v, want %+v", got, want)
	}
}

// TestKeyCacheStats: a key_id found in the snapshot is a hit; one that
// made the cache reload is a miss, found or not.
func TestKeyCacheStats(t *testing.T) {
	b, c := loadedCache(t, "a")
	ctx := context.Background()
	LookupVersion(ctx, c, has("a")) // hit
	b.set("a", "b")
	LookupVersion(ctx, c, has("b"))   // miss, found after a reload
	LookupVersion(ctx, c, has("b"))   // hit
	LookupVersion(ctx, c, has("zzz")) // miss
	got, want := c.Stats(), CacheStats{Cache: CacheKeyState, Hits: 2, Misses: 2}
	if got != want {
		t.Errorf("Stats() = %+v, want %+v", got, want)
	}
}
