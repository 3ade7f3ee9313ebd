package main

import (
	"context"
	"fmt"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kms-v2/kms-plugin/e2e/harness"
)

// window is one measured period of the writers.
type window struct {
	name      string
	latencies []time.Duration
	errors    int
}

func (w *window) p(q float64) time.Duration {
	if len(w.latencies) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), w.latencies...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[min(len(s)-1, int(q*float64(len(s))))]
}

// load is the writers: each updates its own secret at a fixed pace, and
// every latency lands in the current window.
type load struct {
	mu  sync.Mutex
	cur *window
	// paused stops the writers writing (the saturated round runs alone).
	paused atomic.Bool
}

func (l *load) set(w *window) {
	l.mu.Lock()
	l.cur = w
	l.mu.Unlock()
}

func (l *load) record(d time.Duration, err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.cur == nil {
		return
	}
	if err != nil {
		l.cur.errors++
		return
	}
	l.cur.latencies = append(l.cur.latencies, d)
}

func (l *load) start(ctx context.Context, c *harness.Cluster, ns string, n int, rate float64) error {
	a := c.APIServers[0]
	for i := range n {
		if _, err := a.Client.CoreV1().Secrets(ns).Create(ctx, &corev1.Secret{
			ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("writer-%d", i)},
			Data:       map[string][]byte{"v": []byte("0")},
		}, metav1.CreateOptions{}); err != nil {
			return err
		}
	}
	interval := time.Duration(float64(time.Second) / rate)
	for i := range n {
		go func() {
			secrets := a.Client.CoreV1().Secrets(ns)
			t := time.NewTicker(interval)
			defer t.Stop()
			for seq := 0; ; seq++ {
				select {
				case <-ctx.Done():
					return
				case <-t.C:
				}
				if l.paused.Load() {
					continue
				}
				// A blind update (no resourceVersion) never conflicts, so the
				// latency is the apiserver's, not a retry loop's.
				start := time.Now()
				_, err := secrets.Update(ctx, &corev1.Secret{
					ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("writer-%d", i), Namespace: ns},
					Data:       map[string][]byte{"v": []byte(fmt.Sprint(seq))},
				}, metav1.UpdateOptions{})
				if ctx.Err() == nil {
					l.record(time.Since(start), err)
				}
			}
		}()
	}
	return nil
}
