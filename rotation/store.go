package rotation

import (
	"context"
	"fmt"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// KeyValue is one etcd entry as the census sees it. ModRevision is the
// object's resourceVersion, which is what lets a later pass patch a stale
// object straight from the scan without listing it again.
type KeyValue struct {
	Key         string
	Value       []byte
	ModRevision int64
}

// Store is the read-only view of etcd the census needs: one page of a key
// range at a time, so memory stays bounded by the page size. It is an
// interface so the layer above can be tested with an in-memory fake.
type Store interface {
	// Range returns at most limit entries with from <= key < end, in key
	// order.
	Range(ctx context.Context, from, end string, limit int64) ([]KeyValue, error)
}

// EtcdStore reads through an etcd v3 client. It never writes.
type EtcdStore struct {
	KV clientv3.KV
}

// Range implements Store with one serializable-free (linearizable) Get.
func (s EtcdStore) Range(ctx context.Context, from, end string, limit int64) ([]KeyValue, error) {
	resp, err := s.KV.Get(ctx, from, clientv3.WithRange(end), clientv3.WithLimit(limit))
	if err != nil {
		return nil, fmt.Errorf("etcd range %s: %w", from, err)
	}
	out := make([]KeyValue, len(resp.Kvs))
	for i, kv := range resp.Kvs {
		out[i] = KeyValue{Key: string(kv.Key), Value: kv.Value, ModRevision: kv.ModRevision}
	}
	return out, nil
}

// prefixEnd is the first key after every key starting with prefix.
func prefixEnd(prefix string) string {
	return clientv3.GetPrefixRangeEnd(prefix)
}

// scan calls fn for every entry under prefix, page by page.
func scan(ctx context.Context, s Store, prefix string, pageSize int64, fn func(KeyValue) error) error {
	if pageSize <= 0 {
		pageSize = 500
	}
	from, end := prefix, prefixEnd(prefix)
	for {
		page, err := s.Range(ctx, from, end, pageSize)
		if err != nil {
			return err
		}
		for _, kv := range page {
			if err := fn(kv); err != nil {
				return err
			}
		}
		if int64(len(page)) < pageSize {
			return nil
		}
		from = page[len(page)-1].Key + "\x00"
	}
}
