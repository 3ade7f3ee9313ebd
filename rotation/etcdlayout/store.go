package etcdlayout

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// KeyValue is one etcd entry. ModRevision is the object's resourceVersion,
// which lets a rewrite patch a stale object straight from a scan.
type KeyValue struct {
	Key         string
	Value       []byte
	ModRevision int64
}

// Store is the read-only view of etcd a census needs: one page of a key
// range at a time, so memory stays bounded by the page size. It is an
// interface so the layer above can be tested with an in-memory fake.
type Store interface {
	// Range returns at most limit entries with from <= key < end, in key
	// order.
	Range(ctx context.Context, from, end string, limit int64) ([]KeyValue, error)
	// Describe names the store in messages (its endpoints).
	Describe() string
}

// DefaultRequestTimeout bounds one etcd request. An etcd that refuses the
// connection, or accepts it and never answers, fails within it rather than
// hanging a census.
const DefaultRequestTimeout = 10 * time.Second

// EtcdStore reads through an etcd v3 client. It never writes.
type EtcdStore struct {
	KV clientv3.KV
	// Endpoints name the etcd in messages.
	Endpoints []string
	// Timeout bounds each request (default DefaultRequestTimeout).
	Timeout time.Duration
	// Diagnose, if set, is asked why etcd did not answer within Timeout
	// (a refused TLS handshake looks like silence to the client, which
	// keeps retrying it); its error, naming the fix, replaces the generic
	// one. It returns nil when it cannot tell.
	Diagnose func(context.Context) error
}

// Describe implements Store.
func (s EtcdStore) Describe() string { return "etcd " + strings.Join(s.Endpoints, ",") }

// Range implements Store with one linearizable Get, bounded by Timeout.
func (s EtcdStore) Range(ctx context.Context, from, end string, limit int64) ([]KeyValue, error) {
	timeout := s.Timeout
	if timeout <= 0 {
		timeout = DefaultRequestTimeout
	}
	rctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	resp, err := s.KV.Get(rctx, from, clientv3.WithRange(end), clientv3.WithLimit(limit))
	if err != nil {
		if ctx.Err() == nil && errors.Is(rctx.Err(), context.DeadlineExceeded) {
			if s.Diagnose != nil {
				if why := s.Diagnose(ctx); why != nil {
					return nil, fmt.Errorf("%s did not answer within %s: %w", s.Describe(), timeout, why)
				}
			}
			return nil, fmt.Errorf("%s did not answer within %s (is it running, and are --etcd-endpoints and its TLS flags right?)", s.Describe(), timeout)
		}
		return nil, fmt.Errorf("%s: range %s: %w", s.Describe(), from, err)
	}
	out := make([]KeyValue, len(resp.Kvs))
	for i, kv := range resp.Kvs {
		out[i] = KeyValue{Key: string(kv.Key), Value: kv.Value, ModRevision: kv.ModRevision}
	}
	return out, nil
}

// Get reads one key, or returns ok false when it does not exist.
func Get(ctx context.Context, s Store, key string) (KeyValue, bool, error) {
	kvs, err := s.Range(ctx, key, key+"\x00", 1)
	if err != nil || len(kvs) == 0 {
		return KeyValue{}, false, err
	}
	return kvs[0], true, nil
}

// DefaultPageSize is how many values one scan request fetches: cheap, and
// small enough that memory does not depend on the cluster's size.
const DefaultPageSize = 500

// Scan calls fn for every entry under prefix, in key order, page by page.
// The next page is fetched while fn handles the current one, so a census
// takes about as long as the reads alone rather than reads plus judging;
// at most three pages are held at once, whatever the prefix holds.
func Scan(ctx context.Context, s Store, prefix string, pageSize int64, fn func(KeyValue) error) error {
	if pageSize <= 0 {
		pageSize = DefaultPageSize
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	pages := make(chan []KeyValue, 1)
	fetched := make(chan error, 1)
	go func() {
		defer close(pages)
		fetched <- fetchPages(ctx, s, prefix, pageSize, pages)
	}()
	for page := range pages {
		for _, kv := range page {
			if err := fn(kv); err != nil {
				cancel()
				for range pages { // the fetcher ends at the cancel
				}
				return err
			}
		}
	}
	return <-fetched
}

// fetchPages sends every page under prefix to pages until the last one
// or ctx's end.
func fetchPages(ctx context.Context, s Store, prefix string, pageSize int64, pages chan<- []KeyValue) error {
	from, end := prefix, clientv3.GetPrefixRangeEnd(prefix)
	for {
		page, err := s.Range(ctx, from, end, pageSize)
		if err != nil {
			return err
		}
		select {
		case pages <- page:
		case <-ctx.Done():
			return ctx.Err()
		}
		if int64(len(page)) < pageSize {
			return nil
		}
		from = page[len(page)-1].Key + "\x00"
	}
}
