package etcdlayout

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"
	"sync"
	"testing"
)

// pagedStore is a sorted in-memory Store that counts its Range calls and
// how many pages are out at once (fetched, not yet passed on).
type pagedStore struct {
	keys []string
	mu   sync.Mutex
	gets int
}

func newPagedStore(n int) *pagedStore {
	s := &pagedStore{}
	for i := range n {
		s.keys = append(s.keys, fmt.Sprintf("/registry/secrets/ns/s-%04d", i))
	}
	sort.Strings(s.keys)
	return s
}

func (s *pagedStore) Describe() string { return "paged store" }

func (s *pagedStore) Range(ctx context.Context, from, end string, limit int64) ([]KeyValue, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	s.mu.Lock()
	s.gets++
	s.mu.Unlock()
	var out []KeyValue
	for _, k := range s.keys {
		if k >= from && k < end && int64(len(out)) < limit {
			out = append(out, KeyValue{Key: k})
		}
	}
	return out, nil
}

// Scan visits every key once, in order, across pages fetched ahead.
func TestScanVisitsEveryKeyInOrder(t *testing.T) {
	for _, n := range []int{0, 1, 10, 11, 25} {
		s := newPagedStore(n)
		var got []string
		err := Scan(context.Background(), s, "/registry/secrets/", 5, func(kv KeyValue) error {
			got = append(got, kv.Key)
			return nil
		})
		if err != nil {
			t.Fatalf("%d keys: %v", n, err)
		}
		if !slices.Equal(got, s.keys) {
			t.Errorf("%d keys: visited %d, want every key once in order", n, len(got))
		}
	}
}

// An error from fn stops the scan with that error, and the fetcher does
// not run on through the rest of the prefix.
func TestScanStopsAtTheFirstError(t *testing.T) {
	s := newPagedStore(100)
	stop := errors.New("stop here")
	seen := 0
	err := Scan(context.Background(), s, "/registry/secrets/", 5, func(KeyValue) error {
		seen++
		if seen == 7 {
			return stop
		}
		return nil
	})
	if !errors.Is(err, stop) || seen != 7 {
		t.Fatalf("got %v after %d keys, want the fn's error after 7", err, seen)
	}
	if s.gets > 4 {
		t.Errorf("%d pages fetched for 7 keys in pages of 5; the fetcher ran on", s.gets)
	}
}
