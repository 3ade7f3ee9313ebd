package providers

import (
	"context"
	"fmt"
	"sync/atomic"

	"golang.org/x/sync/singleflight"
)

// KeyCache holds a backend's latest snapshot of key state (its versions and
// primary) and reloads it. Snapshots are immutable values swapped
// atomically, so Encrypt reads its key and the key_id it stamps from one
// snapshot and never races a promote. A KeyCache is safe for concurrent use.
//
// Every backend follows the same rules, which is why they live here:
//   - a load that fails leaves the previous snapshot in use, so a backend
//     hiccup does not stop decryption with what is already known;
//   - concurrent Refresh calls share one load, so a burst of unknown key_ids
//     costs the backend one call;
//   - a slower load that started earlier never replaces the snapshot of one
//     that started later, or a slow background refresh could undo a promote
//     for one interval.
type KeyCache[S any] struct {
	load      func(context.Context) (S, error)
	published func(prev, next S)
	cur       atomic.Pointer[entry[S]]
	loads     atomic.Uint64 // loads started; numbers them in start order
	flight    singleflight.Group
	// hits and misses count LookupVersion calls answered from the
	// snapshot and those that had to reload, for the plugin's metrics.
	hits, misses atomic.Uint64
}

// entry is one published snapshot and the number of the load behind it.
type entry[S any] struct {
	val S
	seq uint64
}

// NewKeyCache returns a cache that reads key state with load and holds
// nothing until the first Refresh or Reload succeeds. published, if not
// nil, is called after each snapshot is installed, with the one it
// replaced (the zero S at first), so a backend can log a primary change; it
// runs on the loading goroutine, possibly concurrently with itself, and
// should be quick. load may return the current snapshot unchanged when it
// can tell nothing changed; published then sees prev equal to next.
func NewKeyCache[S any](load func(context.Context) (S, error), published func(prev, next S)) *KeyCache[S] {
	return &KeyCache[S]{load: load, published: published}
}

// Current returns the snapshot in use, without calling the backend. Before
// any load has succeeded it fails with ErrUnavailable.
func (c *KeyCache[S]) Current() (S, error) {
	e := c.cur.Load()
	if e == nil {
		var zero S
		return zero, fmt.Errorf("no key state loaded yet: %w", ErrUnavailable)
	}
	return e.val, nil
}

// Refresh reloads key state, sharing a load already in flight. That load
// may have started before the caller's reason to refresh; callers that must
// see a change they just made use Reload.
func (c *KeyCache[S]) Refresh(ctx context.Context) error {
	_, err, _ := c.flight.Do("", func() (any, error) { return nil, c.Reload(ctx) })
	return err
}

// Reload loads key state itself, never joining a load in flight: lifecycle
// operations call it after a write and must see that write.
func (c *KeyCache[S]) Reload(ctx context.Context) error {
	seq := c.loads.Add(1)
	val, err := c.load(ctx)
	if err != nil {
		return err
	}
	c.publish(&entry[S]{val: val, seq: seq})
	return nil
}

// publish installs next unless a load that started later already
// published.
func (c *KeyCache[S]) publish(next *entry[S]) {
	for {
		prev := c.cur.Load()
		if prev != nil && prev.seq > next.seq {
			return
		}
		if !c.cur.CompareAndSwap(prev, next) {
			continue
		}
		if c.published != nil {
			var was S
			if prev != nil {
				was = prev.val
			}
			c.published(was, next.val)
		}
		return
	}
}

// Stats counts LookupVersion calls answered from the snapshot (hits) and
// those that reloaded key state from the backend (misses) since the cache
// was made.
func (c *KeyCache[S]) Stats() CacheStats {
	return CacheStats{Cache: CacheKeyState, Hits: c.hits.Load(), Misses: c.misses.Load()}
}

// LookupVersion returns what find reports in the current snapshot. On a
// miss it refreshes once and looks again: a version another instance (or
// the backend's own rotation) just made reaches this instance before its
// next background refresh. The refresh it joins may have started before
// the miss and so predate the version; then it loads once more itself.
//
// found is false with a nil error when fresh state has no such version. A
// non-nil error is the failed load's; the caller decides whether that is an
// outage or a miss. Callers should refuse key_ids this instance could never
// have made before calling, so garbage cannot make it hammer the backend.
func LookupVersion[S, V any](ctx context.Context, c *KeyCache[S], find func(S) (V, bool)) (v V, found bool, err error) {
	if v, ok, _ := look(c, find); ok {
		c.hits.Add(1)
		return v, true, nil
	}
	c.misses.Add(1)
	miss := c.loads.Load()
	if err := c.Refresh(ctx); err != nil {
		return v, false, err
	}
	if v, ok, seq := look(c, find); ok || seq > miss {
		return v, ok, nil
	}
	if err := c.Reload(ctx); err != nil {
		return v, false, err
	}
	v, found, _ = look(c, find)
	return v, found, nil
}

// look runs find on the current snapshot and says which load made it.
func look[S, V any](c *KeyCache[S], find func(S) (V, bool)) (v V, ok bool, seq uint64) {
	e := c.cur.Load()
	if e == nil {
		return v, false, 0
	}
	v, ok = find(e.val)
	return v, ok, e.seq
}
