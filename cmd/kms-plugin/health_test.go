package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestHealthPortUnderIdleConnections: 8,000 connections that each send one
// keep-alive request and then idle must neither push the plugin past the
// static pod's memory limit nor keep kubelet's probe from an answer.
func TestHealthPortUnderIdleConnections(t *testing.T) {
	const conns = 8000
	raiseNoFile(t, conns+1000)
	limit := manifestMemoryLimit(t)
	_, health, pid, _ := startWithHealth(t)
	rssBefore, _ := memory(t, pid)

	var (
		mu     sync.Mutex
		held   []net.Conn
		failed atomic.Int64
		wg     sync.WaitGroup
	)
	t.Cleanup(func() {
		for _, c := range held {
			c.Close()
		}
	})
	next := make(chan struct{})
	for range 32 {
		wg.Go(func() {
			d := net.Dialer{Timeout: 10 * time.Second}
			for range next {
				c, err := d.Dial("tcp", health)
				if err != nil {
					failed.Add(1)
					continue
				}
				_, _ = io.WriteString(c, "GET /livez HTTP/1.1\r\nHost: kms-plugin\r\nConnection: keep-alive\r\n\r\n")
				mu.Lock()
				held = append(held, c)
				mu.Unlock()
			}
		})
	}
	start := time.Now()
	for range conns {
		next <- struct{}{}
	}
	close(next)
	wg.Wait()
	t.Logf("%d connections opened in %v (%d dials failed)", len(held), time.Since(start).Round(time.Millisecond), failed.Load())
	if n := failed.Load(); n > 0 {
		t.Errorf("%d of %d dials failed; connections beyond the cap should wait in the kernel backlog", n, conns)
	}

	// kubelet's probe: a fresh connection, no keep-alive.
	probe := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	for i := range 3 {
		t0 := time.Now()
		resp, err := probe.Get("http://" + health + "/healthz")
		if err != nil {
			t.Fatalf("/healthz with %d idle connections held: %v", conns, err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("/healthz = %d %q", resp.StatusCode, body)
		}
		t.Logf("probe %d answered in %v", i, time.Since(t0).Round(time.Millisecond))
		time.Sleep(200 * time.Millisecond)
	}

	rss, peak := memory(t, pid)
	t.Logf("plugin RSS %.1f MiB before, %.1f MiB with %d connections held (peak %.1f MiB); limit %.0f MiB",
		mib(rssBefore), mib(rss), len(held), mib(peak), mib(limit))
	if peak >= limit {
		t.Fatalf("plugin peak RSS %.1f MiB reached the static pod's memory limit %.0f MiB", mib(peak), mib(limit))
	}
}

// TestHealthPortTakenAtStart: a health port another process holds does not
// stop the plugin serving its socket; the failure is logged and counted,
// and the endpoint comes up once the port is free.
func TestHealthPortTakenAtStart(t *testing.T) {
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	health := taken.Addr().String()
	e := newEnv(t, true)
	e.writeConfig(t, fmt.Sprintf("socket: %s\nhealth: %s\nprovider:\n  file:\n    path: keyset.json\n", e.socket, health))
	_, logs := startPluginLogs(t, e)

	if st, err := client(t, e).Status(context.Background()); err != nil || st.Healthz != "ok" {
		t.Fatalf("Status with the health port taken = %+v, %v; want the socket served", st, err)
	}
	if !strings.Contains(logs.String(), "cannot bind the health address") {
		t.Fatalf("the bind failure is not in the log:\n%s", logs.String())
	}
	taken.Close()

	start := time.Now()
	waitHTTP(t, "http://"+health+"/healthz")
	t.Logf("/healthz answered %v after the port was freed", time.Since(start).Round(time.Millisecond))
	if n := metricValue(scrape(t, "http://"+health+"/metrics"), "kms_plugin_health_bind_errors_total"); n < 1 {
		t.Fatalf("kms_plugin_health_bind_errors_total = %v, want >= 1", n)
	}
}
