package providers

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func TestCache(t *testing.T) {
	now := time.Unix(1000, 0)
	c := newUnwrapCache(2, time.Minute)
	c.now = func() time.Time { return now }
	k1, k2, k3 := newCacheKey("a", []byte{1}), newCacheKey("a", []byte{2}), newCacheKey("b", []byte{1})
	if k1 == k3 {
		t.Fatal("the cache key ignores the key_id")
	}
	c.put(k1, []byte("one"))
	c.put(k2, []byte("two"))
	got, _ := c.get(k1) // k1 is now most recent
	got[0] = 'X'        // callers get copies
	c.put(k3, []byte("three"))
	if _, ok := c.get(k2); ok {
		t.Error("the least recently used entry survived an overflow")
	}
	if v, ok := c.get(k1); !ok || string(v) != "one" {
		t.Errorf("get(k1) = %q, %v; want \"one\"", v, ok)
	}
	now = now.Add(time.Minute)
	if _, ok := c.get(k3); ok {
		t.Error("an expired entry was served")
	}
	if newUnwrapCache(0, time.Minute) != nil {
		t.Error("size 0 did not turn the cache off")
	}
}

// TestUnwrapperCoalescesAndCaches: identical concurrent requests make one
// call, the seed is then served from memory, a failure is not cached, and
// a caller that gives up does not fail the others.
func TestUnwrapperCoalescesAndCaches(t *testing.T) {
	u := NewUnwrapper(UnwrapOptions{CacheSize: 10, CacheTTL: time.Minute})
	var calls atomic.Int64
	release := make(chan struct{})
	slow := func(context.Context) ([]byte, error) {
		calls.Add(1)
		<-release
		return []byte("seed"), nil
	}
	var wg sync.WaitGroup
	for range 20 {
		wg.Go(func() {
			if got, err := u.Unwrap(context.Background(), "k:1", []byte{1}, slow); err != nil || string(got) != "seed" {
				t.Errorf("Unwrap = %q, %v", got, err)
			}
		})
	}
	gone, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := u.Unwrap(gone, "k:1", []byte{1}, slow); !errors.Is(err, ErrUnavailable) {
		t.Errorf("a caller that gave up: %v, want ErrUnavailable", err)
	}
	time.Sleep(20 * time.Millisecond)
	close(release)
	wg.Wait()
	if _, err := u.Unwrap(context.Background(), "k:1", []byte{1}, slow); err != nil || calls.Load() != 1 {
		t.Errorf("calls = %d (err %v), want 1: coalesced, then cached", calls.Load(), err)
	}
	failing := func(context.Context) ([]byte, error) { calls.Add(1); return nil, ErrUnavailable }
	u.Unwrap(context.Background(), "k:2", []byte{1}, failing)
	u.Unwrap(context.Background(), "k:2", []byte{1}, failing)
	if calls.Load() != 3 {
		t.Errorf("calls = %d, want 3: a failure is not cached", calls.Load())
	}
	u.Purge()
	if _, ok := u.cache.get(newCacheKey("k:1", []byte{1})); ok {
		t.Error("Purge left a seed")
	}
}
