package azurekv

import (
	"container/list"
	"crypto/sha256"
	"sync"
	"time"
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
// memory instead of Key Vault. It is an LRU bounded in entries and age;
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
