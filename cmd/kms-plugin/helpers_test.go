package main

import (
	"bufio"
	"bytes"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/kms-v2/kms-plugin/internal/podrun"
)

// freeTCPAddr returns a loopback address nobody listens on now.
func freeTCPAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// syncBuffer is a bytes.Buffer a child process writes to while the test
// reads it.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func (b *syncBuffer) Len() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Len()
}

// manifestMemoryLimit is the memory limit of the kms-plugin container in
// the static pod manifest: the budget the plugin must live within.
func manifestMemoryLimit(t *testing.T) int64 {
	t.Helper()
	q, ok := staticPod(t).Container.Resources.Limits[corev1.ResourceMemory]
	if !ok {
		t.Fatal("static pod manifest: container kms-plugin has no memory limit")
	}
	return q.Value()
}

// staticPod is the plugin's container in the static pod manifest.
func staticPod(t *testing.T) podrun.Pod {
	t.Helper()
	p, err := podrun.FromPodFile(filepath.Join("..", "..", "manifests", "kms-plugin-static-pod.yaml"), "kms-plugin")
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// memory reads a process's resident set (VmRSS) and its peak (VmHWM) in
// bytes from /proc.
func memory(t *testing.T, pid int) (rss, peak int64) {
	t.Helper()
	rss, peak, err := readMemory(pid)
	if err != nil {
		t.Fatal(err)
	}
	return rss, peak
}

func readMemory(pid int) (rss, peak int64, err error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, 0, err
	}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok || (k != "VmRSS" && k != "VmHWM") {
			continue
		}
		kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		if err != nil {
			return 0, 0, fmt.Errorf("/proc/%d/status %s: %v", pid, k, err)
		}
		if k == "VmRSS" {
			rss = kb << 10
		} else {
			peak = kb << 10
		}
	}
	if rss == 0 || peak == 0 {
		return 0, 0, fmt.Errorf("/proc/%d/status: no VmRSS or VmHWM", pid)
	}
	return rss, peak, nil
}

// raiseNoFile lifts this process's soft open-file limit to at least n
// (the plugin started afterwards inherits it), or skips the test when the
// hard limit is lower.
func raiseNoFile(t *testing.T, n uint64) {
	t.Helper()
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	if lim.Max < n {
		t.Skipf("RLIMIT_NOFILE hard limit %d is under the %d this test needs", lim.Max, n)
	}
	if lim.Cur < n {
		lim.Cur = n
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
			t.Fatalf("raising RLIMIT_NOFILE to %d: %v", n, err)
		}
	}
}

// waitHTTP polls url until it answers 200 or 20 s pass.
func waitHTTP(t *testing.T, url string) {
	t.Helper()
	c := &http.Client{Timeout: time.Second}
	deadline := time.Now().Add(20 * time.Second)
	for {
		resp, err := c.Get(url)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not answer 200 within 20 s: %v", url, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
