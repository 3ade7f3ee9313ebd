package plugin

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	kmsapi "k8s.io/kms/apis/v2"
)

// watched is a Service serving a real Socket through NewGRPCServer.
type watched struct {
	svc    *Service
	sock   *Socket
	path   string
	m      *Metrics
	logs   *lockedBuffer
	served chan error // gs.Serve's result
}

func serveWatched(t *testing.T, peers Peers) *watched {
	t.Helper()
	w := &watched{path: filepath.Join(shortDir(t), "run", "kms.sock"), m: NewMetrics(prometheus.NewRegistry()), logs: &lockedBuffer{}, served: make(chan error, 1)}
	log := hclog.New(&hclog.LoggerOptions{Level: hclog.Info, Output: w.logs})
	sock, err := NewSocket(SocketConfig{Path: w.path, Peers: peers, Logger: log, Metrics: w.m})
	if err != nil {
		t.Fatal(err)
	}
	w.sock = sock
	w.svc, err = New(Options{
		Provider: &fakeProvider{keyID: "fake:k1"}, Logger: log, Metrics: w.m, Socket: sock,
		CheckInterval: time.Hour, RefreshInterval: time.Hour, MaxStaleness: 2 * time.Hour,
	})
	if err != nil {
		t.Fatal(err)
	}
	w.svc.Check(context.Background())
	gs := NewGRPCServer(w.svc)
	go func() { w.served <- gs.Serve(sock) }()
	t.Cleanup(func() { gs.Stop(); sock.Close() })
	return w
}

// statusAt calls Status over a fresh connection to path.
func statusAt(path string) (*kmsapi.StatusResponse, error) {
	conn, err := grpc.NewClient("unix://"+path, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	return kmsapi.NewKeyManagementServiceClient(conn).Status(ctx, &kmsapi.StatusRequest{})
}

// TestSocketWatch: each way the socket path can change under the plugin,
// and what one check makes of it.
func TestSocketWatch(t *testing.T) {
	tests := []struct {
		name   string
		change func(t *testing.T, path string)
		// rebound: served again at the path; taken: Serve returns
		// ErrSocketTaken; else unhealthy with wantHealth in the reason.
		rebound, taken bool
		wantHealth     string
		lost           float64
	}{
		{name: "untouched", change: func(*testing.T, string) {}, rebound: true},
		{name: "deleted", change: remove, rebound: true, lost: 1},
		{name: "replaced by a stale socket", change: func(t *testing.T, p string) {
			remove(t, p)
			l, err := net.ListenUnix("unix", &net.UnixAddr{Name: p, Net: "unix"})
			if err != nil {
				t.Fatal(err)
			}
			l.SetUnlinkOnClose(false)
			l.Close()
		}, rebound: true, lost: 1},
		{name: "replaced by a live socket", change: func(t *testing.T, p string) {
			remove(t, p)
			l, err := net.Listen("unix", p)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { l.Close() })
		}, taken: true, lost: 1},
		{name: "replaced by a regular file", change: func(t *testing.T, p string) {
			remove(t, p)
			if err := os.WriteFile(p, []byte("keep"), 0o600); err != nil {
				t.Fatal(err)
			}
		}, taken: true, lost: 1},
		{name: "deleted, folder now world-writable", change: func(t *testing.T, p string) {
			remove(t, p)
			if err := os.Chmod(filepath.Dir(p), 0o777); err != nil {
				t.Fatal(err)
			}
		}, wantHealth: "chmod o-w", lost: 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			w := serveWatched(t, Peers{})
			before, _ := os.Lstat(w.path)
			tt.change(t, w.path)
			w.svc.Check(context.Background())
			ok, health := w.svc.Healthy()
			if got := testutil.ToFloat64(w.m.socketLost); got != tt.lost {
				t.Errorf("kms_plugin_socket_lost_total = %v, want %v", got, tt.lost)
			}
			switch {
			case tt.rebound:
				if !ok {
					t.Errorf("health %q, want ok", health)
				}
				if st, err := statusAt(w.path); err != nil || st.Healthz != "ok" {
					t.Errorf("Status at the path = %v, %v; want served", st, err)
				}
			case tt.taken:
				if ok {
					t.Error("health ok with the path taken")
				}
				select {
				case err := <-w.served:
					if !errors.Is(err, ErrSocketTaken) {
						t.Errorf("Serve returned %v, want ErrSocketTaken", err)
					}
				case <-time.After(2 * time.Second):
					t.Fatal("Serve still runs with the path taken")
				}
				w.sock.Close()
				if after, err := os.Lstat(w.path); err != nil || os.SameFile(before, after) {
					t.Errorf("what took the path is gone or unchanged: %v", err)
				}
			default:
				if ok || !strings.Contains(health, tt.wantHealth) || !strings.Contains(health, "socket") {
					t.Errorf("health %q, want unhealthy naming the socket and %q", health, tt.wantHealth)
				}
			}
			if tt.lost > 0 && !strings.Contains(w.logs.String(), "socket lost") {
				t.Errorf("the loss is not logged:\n%s", w.logs.String())
			}
		})
	}
}

func remove(t *testing.T, p string) {
	t.Helper()
	if err := os.Remove(p); err != nil {
		t.Fatal(err)
	}
}

// TestSocketRefusesPeers: a connection whose uid and gid the rule does not
// list is closed before gRPC reads it, and counted; a listed one is
// served. This process is the peer, so no second user is needed.
func TestSocketRefusesPeers(t *testing.T) {
	me, mygid := uint32(os.Getuid()), uint32(os.Getgid())
	tests := []struct {
		name  string
		peers Peers
		want  bool
	}{
		{"no rule", Peers{}, true},
		{"uid listed", Peers{UIDs: []uint32{me + 1, me}}, true},
		{"gid listed", Peers{GIDs: []uint32{mygid}}, true},
		{"neither listed", Peers{UIDs: []uint32{me + 1}, GIDs: []uint32{mygid + 1}}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			w := serveWatched(t, tt.peers)
			for range 3 {
				_, err := statusAt(w.path)
				if got := err == nil; got != tt.want {
					t.Fatalf("served: %v (%v), want %v", got, err, tt.want)
				}
			}
			wantRefused := 0.0
			if !tt.want {
				wantRefused = 3 // grpc may retry a dropped connection; at least the 3 calls
			}
			if got := testutil.ToFloat64(w.m.peersRefused); got < wantRefused || (tt.want && got != 0) {
				t.Errorf("kms_plugin_peers_refused_total = %v, want %v", got, wantRefused)
			}
			if n := strings.Count(w.logs.String(), "peer refused"); n != min(1, int(wantRefused)) {
				t.Errorf("%d lines about refused peers, want %d:\n%s", n, min(1, int(wantRefused)), w.logs.String())
			}
		})
	}
}

// TestPeerLogBudget: refused peers are logged once per uid, and new uids
// at most peerLogBurst at once; the rest are counted as dropped.
func TestPeerLogBudget(t *testing.T) {
	var logs lockedBuffer
	m := NewMetrics(prometheus.NewRegistry())
	s := &Socket{path: "/run/kms.sock", log: hclog.New(&hclog.LoggerOptions{Output: &logs}), m: m}
	l := newPeerLog(m)
	for range 5 {
		l.note(s, 1000, 1000, nil)
	}
	if n := strings.Count(logs.String(), "peer refused"); n != 1 {
		t.Fatalf("5 refusals of one uid wrote %d lines, want 1", n)
	}
	for uid := range uint32(100) {
		l.note(s, 2000+uid, 0, nil)
	}
	if n := strings.Count(logs.String(), "peer refused"); n > peerLogBurst+2 {
		t.Errorf("100 new uids at once wrote %d lines, want about %d", n, peerLogBurst)
	}
	if got := testutil.ToFloat64(m.logsDropped.WithLabelValues(reasonRateLimited)); got < 100-peerLogBurst-2 {
		t.Errorf("kms_plugin_log_lines_dropped_total = %v, want the lines over the budget", got)
	}
}
