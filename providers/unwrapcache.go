package providers

import (
	"bytes"
	"container/list"
	"context"
	"crypto/sha256"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/singleflight"
)

// cacheKey identifies one (key_id, ciphertext) pair without keeping the
// ciphertext: sha256(key_id || 0x00 || ciphertext).
type cacheKey [sha256.Size]byte

func newCacheKey(keyID string, ciphertext []byte) cacheKey {
	h := sha256.New()
	h.Write([]byte(keyID))
	h.Write([]byte{0})
	h.Write(ciphertext)
	var k cacheKey
	h.Sum(k[:0])
	return k
}

// unwrapCache keeps recently unwrapped seeds so that the read burst after an
// apiserver restart (every object's seed unwrapped once per apiserver) hits
// memory instead of a slow device (Key Vault, a TPM). It is an LRU bounded in entries and age;
// evicted seeds are zeroed. Safe for concurrent use.
type unwrapCache struct {
	size int
	ttl  time.Duration
	now  func() time.Time

	mu sync.Mutex
	ll *list.List // of *cacheEntry, most recent first
	m  map[cacheKey]*list.Element
}

type cacheEntry struct {
	key     cacheKey
	seed    []byte
	expires time.Time
}

func newUnwrapCache(size int, ttl time.Duration) *unwrapCache {
	if size <= 0 {
		return nil
	}
	return &unwrapCache{size: size, ttl: ttl, now: time.Now, ll: list.New(), m: map[cacheKey]*list.Element{}}
}

// get returns a copy of the cached seed.
func (c *unwrapCache) get(k cacheKey) ([]byte, bool) {
	if c == nil {
		return nil, false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	el, ok := c.m[k]
	if !ok {
		return nil, false
	}
	e := el.Value.(*cacheEntry)
	if !c.now().Before(e.expires) {
		c.remove(el)
		return nil, false
	}
	c.ll.MoveToFront(el)
	return append([]byte(nil), e.seed...), true
}

// put stores a copy of seed.
func (c *unwrapCache) put(k cacheKey, seed []byte) {
	if c == nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if el, ok := c.m[k]; ok {
		c.remove(el)
	}
	c.m[k] = c.ll.PushFront(&cacheEntry{key: k, seed: append([]byte(nil), seed...), expires: c.now().Add(c.ttl)})
	for c.ll.Len() > c.size {
		c.remove(c.ll.Back())
	}
}

// purge drops every entry, zeroing the seeds.
func (c *unwrapCache) purge() {
	if c == nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for el := c.ll.Front(); el != nil; el = c.ll.Front() {
		c.remove(el)
	}
}

func (c *unwrapCache) remove(el *list.Element) {
	e := c.ll.Remove(el).(*cacheEntry)
	clear(e.seed)
	delete(c.m, e.key)
}

// Unwrapper stands in front of a slow unwrap (a Key Vault call, a TPM
// decrypt): identical concurrent requests share one call, and results are
// kept in a bounded, zeroised LRU cache. Callers check that the key version
// may decrypt before asking, so a disabled version is never served from
// memory. Safe for concurrent use.
type Unwrapper struct {
	cache    *unwrapCache
	group    singleflight.Group
	coalesce bool
	shared   time.Duration
	// hits and misses count Unwrap calls answered from the cache and not,
	// for the plugin's metrics (see Stats).
	hits, misses atomic.Uint64
}

// UnwrapOptions shape an Unwrapper.
type UnwrapOptions struct {
	// CacheSize bounds the cached seeds; 0 turns the cache off.
	CacheSize int
	// CacheTTL is how long a seed stays cached.
	CacheTTL time.Duration
	// NoCoalescing makes every request call the device (benchmarks only).
	NoCoalescing bool
	// SharedTimeout bounds a coalesced call, which runs detached from any
	// one caller so a caller giving up does not fail the others (default 5 s).
	SharedTimeout time.Duration
}

// NewUnwrapper returns an Unwrapper.
func NewUnwrapper(o UnwrapOptions) *Unwrapper {
	if o.SharedTimeout <= 0 {
		o.SharedTimeout = 5 * time.Second
	}
	return &Unwrapper{cache: newUnwrapCache(o.CacheSize, o.CacheTTL), coalesce: !o.NoCoalescing, shared: o.SharedTimeout}
}

// Unwrap returns the seed of (keyID, ciphertext): a copy from the cache,
// else the result of unwrap, called once for all identical concurrent
// requests and cached on success.
func (u *Unwrapper) Unwrap(ctx context.Context, keyID string, ciphertext []byte, unwrap func(context.Context) ([]byte, error)) ([]byte, error) {
	k := newCacheKey(keyID, ciphertext)
	if seed, ok := u.cache.get(k); ok {
		u.hits.Add(1)
		return seed, nil
	}
	u.misses.Add(1)
	call := func(ctx context.Context) ([]byte, error) {
		seed, err := unwrap(ctx)
		if err == nil {
			u.cache.put(k, seed)
		}
		return seed, err
	}
	if !u.coalesce {
		return call(ctx)
	}
	ch := u.group.DoChan(string(k[:]), func() (any, error) {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), u.shared)
		defer cancel()
		return call(ctx)
	})
	select {
	case r := <-ch:
		if r.Err != nil {
			return nil, r.Err
		}
		return bytes.Clone(r.Val.([]byte)), nil
	case <-ctx.Done():
		return nil, fmt.Errorf("unwrap under %s: %w: %w", keyID, ctx.Err(), ErrUnavailable)
	}
}

// Purge drops every cached seed, zeroing it.
func (u *Unwrapper) Purge() { u.cache.purge() }

// Stats counts Unwrap calls answered from the cache (hits) and not
// (misses) since the Unwrapper was made. With the cache off every call is
// a miss.
func (u *Unwrapper) Stats() CacheStats {
	return CacheStats{Cache: CacheUnwrap, Hits: u.hits.Load(), Misses: u.misses.Load()}
}
