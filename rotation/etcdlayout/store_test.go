package etcdlayout

import (
	"context"
	"errors"
	"net"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// silentListener accepts connections and never answers on them, like a
// hung etcd or a wrong port behind a firewall that accepts.
func silentListener(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	held := make(chan net.Conn, 64)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			held <- c // held open, never read
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		for len(held) > 0 {
			(<-held).Close()
		}
	})
	return "http://" + ln.Addr().String()
}

// refusedEndpoint is a loopback port nobody listens on.
func refusedEndpoint(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return "http://" + addr
}

func TestEtcdStoreDeadline(t *testing.T) {
	tests := []struct {
		name     string
		endpoint func(*testing.T) string
	}{
		{"refused port", refusedEndpoint},
		{"listener that never answers", silentListener},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ep := tt.endpoint(t)
			cli, err := clientv3.New(clientv3.Config{Endpoints: []string{ep}, DialTimeout: time.Second, Logger: zap.NewNop()})
			if err != nil {
				t.Fatal(err)
			}
			defer cli.Close()
			s := EtcdStore{KV: cli.KV, Endpoints: []string{ep}, Timeout: time.Second}
			start := time.Now()
			_, _, err = Get(context.Background(), s, Default().Key("namespaces", "", "kube-system"))
			took := time.Since(start)
			if err == nil {
				t.Fatal("Get succeeded against a dead etcd")
			}
			if took > 3*time.Second {
				t.Errorf("took %s, want about the 1s timeout", took)
			}
			if msg := err.Error(); !strings.Contains(msg, ep) || !strings.Contains(msg, "did not answer within 1s") || strings.Contains(msg, "\n") {
				t.Errorf("error %q: want one line naming %s and the deadline", msg, ep)
			}
		})
	}
}

// TestEtcdStoreDiagnose: when etcd does not answer, the store asks its
// Diagnose hook why and puts the answer, which names the fix, in the one
// error line; without an answer the generic hint stays.
func TestEtcdStoreDiagnose(t *testing.T) {
	ep := refusedEndpoint(t)
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{ep}, DialTimeout: time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	for _, tt := range []struct {
		name     string
		diagnose func(context.Context) error
		want     string
	}{
		{"answered", func(context.Context) error { return errors.New("it serves TLS; write https://") }, "did not answer within 1s: it serves TLS; write https://"},
		{"no answer", func(context.Context) error { return nil }, "are --etcd-endpoints and its TLS flags right?"},
		{"no hook", nil, "are --etcd-endpoints and its TLS flags right?"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			s := EtcdStore{KV: cli.KV, Endpoints: []string{ep}, Timeout: time.Second, Diagnose: tt.diagnose}
			_, _, err := Get(context.Background(), s, Default().Key("namespaces", "", "kube-system"))
			if err == nil || !strings.Contains(err.Error(), tt.want) || !strings.Contains(err.Error(), ep) {
				t.Errorf("got %v, want an error naming %s and saying %q", err, ep, tt.want)
			}
		})
	}
}
