package plugin

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

func TestHealthServerLimits(t *testing.T) {
	srv := newHealthServer(http.NotFoundHandler())
	if srv.ReadTimeout <= 0 || srv.WriteTimeout <= 0 || srv.IdleTimeout <= 0 {
		t.Errorf("timeouts read %v, write %v, idle %v; want all set", srv.ReadTimeout, srv.WriteTimeout, srv.IdleTimeout)
	}
	if srv.MaxHeaderBytes <= 0 || srv.MaxHeaderBytes > 64<<10 {
		t.Errorf("MaxHeaderBytes %d, want a small limit (Go's default is 1 MiB)", srv.MaxHeaderBytes)
	}
}

// serveHealth runs serveHealth on a fresh loopback port until the test
// ends and returns its address.
func serveHealth(t *testing.T, s *Service) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.serveHealth(ctx, ln, prometheus.NewRegistry()) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("serveHealth: %v", err)
		}
	})
	return ln.Addr().String()
}

// TestConnCapEvicts: at the cap, the oldest connection not being answered
// is closed; one being answered, and the newcomer, never are.
func TestConnCapEvicts(t *testing.T) {
	type conn struct {
		state http.ConnState
		want  bool // closed
	}
	tests := []struct {
		name  string
		conns []conn // oldest first; the last is the newcomer, StateNew
	}{
		{"the oldest idle goes", []conn{{http.StateIdle, true}, {http.StateIdle, false}, {http.StateNew, false}}},
		{"a silent new one counts as idle", []conn{{http.StateNew, true}, {http.StateIdle, false}, {http.StateNew, false}}},
		{"one being answered stays", []conn{{http.StateActive, false}, {http.StateIdle, true}, {http.StateNew, false}}},
		{"all answered: nobody goes", []conn{{http.StateActive, false}, {http.StateActive, false}, {http.StateNew, false}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := &connCap{max: len(tt.conns), conns: map[net.Conn]connState{}}
			var ends []*closeRecorder
			for i, cn := range tt.conns {
				end := &closeRecorder{}
				ends = append(ends, end)
				if i < len(tt.conns)-1 {
					c.conns[end] = connState{state: cn.state, since: time.Unix(int64(i), 0)}
				} else {
					c.track(end, http.StateNew)
				}
			}
			for i, cn := range tt.conns {
				if ends[i].closed != cn.want {
					t.Errorf("conn %d (%v): closed %v, want %v", i, cn.state, ends[i].closed, cn.want)
				}
			}
			closed := 0
			for _, e := range ends {
				if e.closed {
					closed++
				}
			}
			if got, want := c.open(), len(tt.conns)-closed; got != want {
				t.Errorf("open() = %d, want %d", got, want)
			}
		})
	}
}

// closeRecorder is a net.Conn that records Close.
type closeRecorder struct {
	net.Conn
	closed bool
}

func (c *closeRecorder) Close() error { c.closed = true; return nil }

// TestHealthConnectionCap: idle connections beyond the cap are closed, so
// a fresh probe still gets its answer at once.
func TestHealthConnectionCap(t *testing.T) {
	addr := serveHealth(t, newService(t, &fakeProvider{keyID: "fake:k1"}, nil))
	const idle = 4 * maxHealthConns
	var idlers []net.Conn
	for range idle {
		c, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		if _, err := io.WriteString(c, "GET /livez HTTP/1.1\r\nHost: x\r\n\r\n"); err != nil {
			t.Fatal(err)
		}
		idlers = append(idlers, c)
	}

	probe := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := probe.Get("http://" + addr + "/healthz")
	if err != nil {
		t.Fatalf("/healthz behind %d idle connections: %v", idle, err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("/healthz = %d, want 200", resp.StatusCode)
	}

	// Every idle connection but those still holding a slot was closed by
	// the server, well before healthIdleTimeout.
	var closed atomic.Int64
	var wg sync.WaitGroup
	for _, c := range idlers {
		wg.Go(func() {
			_ = c.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
			_, err := io.ReadAll(c) // the response, then EOF once closed
			var ne net.Error
			if !errors.As(err, &ne) || !ne.Timeout() {
				closed.Add(1)
			}
		})
	}
	wg.Wait()
	if want := int64(idle - maxHealthConns); closed.Load() < want {
		t.Fatalf("the server closed %d of %d idle connections, want at least %d (cap %d)", closed.Load(), idle, want, maxHealthConns)
	}
	t.Logf("%d of %d idle connections closed to keep within %d", closed.Load(), idle, maxHealthConns)
}

// TestHealthBindRetry: with the health port taken, ServeHealth counts and
// logs the failure and keeps trying; once the port is free it serves.
func TestHealthBindRetry(t *testing.T) {
	var logs lockedBuffer
	s := newServiceTo(t, &fakeProvider{keyID: "fake:k1"}, &logs)
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := taken.Addr().String()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); s.ServeHealth(ctx, addr, prometheus.NewRegistry()) }()

	waitFor(t, 5*time.Second, "a bind error counted", func() bool { return testutil.ToFloat64(s.m.healthBindErrs) >= 1 })
	if !strings.Contains(logs.String(), "cannot bind the health address") || !strings.Contains(logs.String(), addr) {
		t.Errorf("the bind failure was not logged with the address:\n%s", logs.String())
	}
	taken.Close()

	get := &http.Client{Timeout: time.Second}
	waitFor(t, 2*healthBindRetryMax, "/healthz answering after the port was freed", func() bool {
		resp, err := get.Get("http://" + addr + "/healthz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
	cancel()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("ServeHealth did not return after its context ended")
	}
}

// waitFor polls cond until it holds or d passes.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("no %s within %v", what, d)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
