package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	kmsapi "k8s.io/kms/apis/v2"
)

// socketConfig is a config serving e.socket with health on addr and a
// short check interval, plus extra lines.
func socketConfig(e env, health, interval, extra string) string {
	return fmt.Sprintf("socket: %s\nhealth: %s\ncheckInterval: %s\nmaxStaleness: 1m\nprovider:\n  file:\n    path: keyset.json\n%s", e.socket, health, interval, extra)
}

// healthz returns /healthz's status code and body.
func healthz(t *testing.T, addr string) (int, string) {
	t.Helper()
	resp, err := (&http.Client{Timeout: 2 * time.Second}).Get("http://" + addr + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, strings.TrimSpace(string(body))
}

// eventually polls cond every 20 ms until it holds or d passes.
func eventually(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v", what, d)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// statusOK reports whether a fresh connection to sock gets Status "ok".
func statusOK(sock string) bool {
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return false
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	st, err := kmsapi.NewKeyManagementServiceClient(conn).Status(ctx, &kmsapi.StatusRequest{})
	return err == nil && st.Healthz == "ok"
}

// TestServeRebindsDeletedSocket: a deleted socket is noticed at the next
// check, logged, counted, and bound again, so the apiserver reaches the
// plugin again without a restart.
func TestServeRebindsDeletedSocket(t *testing.T) {
	e := newEnv(t, true)
	health := freeTCPAddr(t)
	e.writeConfig(t, socketConfig(e, health, "200ms", ""))
	_, logs := startPluginLogs(t, e)
	waitHTTP(t, "http://"+health+"/healthz")
	if err := os.Remove(e.socket); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	eventually(t, 3*time.Second, "socket bound again and answering", func() bool { return statusOK(e.socket) })
	t.Logf("socket served again %v after it was deleted", time.Since(start).Round(time.Millisecond))
	if !strings.Contains(logs.String(), "socket lost") {
		t.Errorf("the loss is not in the log:\n%s", logs.String())
	}
	if n := metricValue(scrape(t, "http://"+health+"/metrics"), "kms_plugin_socket_lost_total"); n != 1 {
		t.Errorf("kms_plugin_socket_lost_total = %v, want 1", n)
	}
	if code, body := healthz(t, health); code != http.StatusOK {
		t.Errorf("/healthz after the re-bind = %d %q, want 200", code, body)
	}
}

// TestServeUnhealthyWhileSocketLost: while the socket cannot be bound
// again (here its folder became world-writable after it was deleted),
// /healthz says so; once the folder is fixed the socket comes back.
func TestServeUnhealthyWhileSocketLost(t *testing.T) {
	e := newEnv(t, true)
	health := freeTCPAddr(t)
	e.writeConfig(t, socketConfig(e, health, "200ms", ""))
	startPlugin(t, e)
	waitHTTP(t, "http://"+health+"/healthz")
	dir := filepath.Dir(e.socket)
	if err := os.Chmod(dir, 0o777); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(e.socket); err != nil {
		t.Fatal(err)
	}
	var body string
	eventually(t, 2*time.Second, "/healthz 503", func() bool {
		var code int
		code, body = healthz(t, health)
		return code == http.StatusServiceUnavailable
	})
	t.Logf("/healthz: %s", body)
	if !strings.Contains(body, "socket") || !strings.Contains(body, "chmod o-w") {
		t.Errorf("/healthz body %q, want the socket problem and its fix", body)
	}
	if err := os.Chmod(dir, 0o750); err != nil {
		t.Fatal(err)
	}
	eventually(t, 3*time.Second, "socket back after the folder was fixed", func() bool { return statusOK(e.socket) })
	if code, body := healthz(t, health); code != http.StatusOK {
		t.Errorf("/healthz after recovery = %d %q, want 200", code, body)
	}
}

// holdSocket binds a live socket at path, as another plugin instance
// would, until the test ends.
func holdSocket(t *testing.T, path string) {
	t.Helper()
	other, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	other.SetUnlinkOnClose(false)
	t.Cleanup(func() { other.Close() })
	go func() {
		for {
			c, err := other.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
}

// TestServeExitsWhenSocketTaken: when another process's live socket takes
// the path, the plugin says so and exits non-zero rather than compete, and
// leaves the other socket in place.
func TestServeExitsWhenSocketTaken(t *testing.T) {
	e := newEnv(t, true)
	e.writeConfig(t, socketConfig(e, freeTCPAddr(t), "200ms", ""))
	cmd, logs := startPluginLogs(t, e)
	if err := os.Remove(e.socket); err != nil {
		t.Fatal(err)
	}
	holdSocket(t, e.socket)
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	var err error
	select {
	case err = <-exited:
	case <-time.After(5 * time.Second):
		t.Fatal("the plugin still runs 5 s after another process took its socket path")
	}
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() == 0 {
		t.Fatalf("exit: %v, want a non-zero exit", err)
	}
	lines := nonLogLines(logs.String())
	if len(lines) != 1 || !strings.Contains(lines[0], "another process") {
		t.Fatalf("error lines %q, want one naming another process", lines)
	}
	t.Log(lines[0])
	if fi, err := os.Lstat(e.socket); err != nil || fi.Mode()&os.ModeSocket == 0 {
		t.Fatalf("the other process's socket is gone: %v", err)
	}
}

// TestServeSIGTERMKeepsAnotherSocket: on SIGTERM the plugin removes its
// socket path only while it holds its own socket, never another
// instance's that took the path in the meantime.
func TestServeSIGTERMKeepsAnotherSocket(t *testing.T) {
	e := newEnv(t, true)
	// A long interval: SIGTERM must come before the watch notices.
	e.writeConfig(t, socketConfig(e, freeTCPAddr(t), "1m", ""))
	cmd := startPlugin(t, e)
	if err := os.Remove(e.socket); err != nil {
		t.Fatal(err)
	}
	holdSocket(t, e.socket)
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("exit after SIGTERM: %v", err)
	}
	if fi, err := os.Lstat(e.socket); err != nil || fi.Mode()&os.ModeSocket == 0 {
		t.Fatalf("SIGTERM removed the other instance's socket: %v", err)
	}
}

// TestServeRefusesSocketMistakes: socket settings that would leave the
// socket open to others, or not work at all, stop the plugin at start
// with one line naming the problem and the fix, and leave nothing behind.
func TestServeRefusesSocketMistakes(t *testing.T) {
	tests := []struct {
		name   string
		config func(t *testing.T, e env) string
		want   string
	}{
		{"world-writable socket folder", func(t *testing.T, e env) string {
			open := filepath.Join(e.dir, "open")
			if err := os.Mkdir(open, 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(open, 0o777); err != nil {
				t.Fatal(err)
			}
			return "socket: " + filepath.Join(open, "kms.sock") + "\nprovider: {file: {path: keyset.json}}\n"
		}, "chmod o-w"},
		{"socket as a YAML number", func(*testing.T, env) string {
			return "socket: 123\nprovider: {file: {path: keyset.json}}\n"
		}, "socket: 123 is a YAML number"},
		{"socket path too long", func(_ *testing.T, e env) string {
			return "socket: " + filepath.Join(e.dir, "run", strings.Repeat("s", 108)) + "\nprovider: {file: {path: keyset.json}}\n"
		}, "107-byte limit"},
		{"socketGroup -1", func(_ *testing.T, e env) string {
			return "socket: " + e.socket + "\nsocketGroup: \"-1\"\nprovider: {file: {path: keyset.json}}\n"
		}, "gid from 0 to 4294967294"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, true)
			e.writeConfig(t, tt.config(t, e))
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			out, err := exec.CommandContext(ctx, filepath.Join(binDir, "kms-plugin"), "serve", "--config", e.config).CombinedOutput()
			if ctx.Err() != nil {
				t.Fatalf("kms-plugin serve still ran after 10 s; output:\n%s", out)
			}
			if err == nil {
				t.Fatal("kms-plugin serve succeeded")
			}
			if lines := nonLogLines(string(out)); len(lines) != 1 || !strings.Contains(lines[0], tt.want) {
				t.Fatalf("error lines %q, want one line containing %q", lines, tt.want)
			}
			if _, err := os.Lstat(filepath.Dir(e.socket)); !os.IsNotExist(err) {
				t.Fatalf("socket folder left behind: %v", err)
			}
		})
	}
}

// peerHelperEnv, when set to a socket path, makes the test binary a KMS
// client instead: TestMain calls peerHelper and exits with its code.
const peerHelperEnv = "KMS_PEER_HELPER_SOCKET"

// peerHelper calls Status on sock once: exit 0 when it answers, 3 when
// the connection is refused or dropped, 1 otherwise.
func peerHelper(sock string) int {
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		fmt.Println(err)
		return 1
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	if _, err := kmsapi.NewKeyManagementServiceClient(conn).Status(ctx, &kmsapi.StatusRequest{}); err != nil {
		fmt.Println(err)
		return 3
	}
	return 0
}

var copyHelper sync.Once

// statusAs calls Status on sock from a process running as uid:gid (this
// test binary, copied where that user can run it) and reports whether it
// answered.
func statusAs(t *testing.T, sock string, uid, gid uint32) bool {
	t.Helper()
	bin := filepath.Join(binDir, "peer-helper")
	copyHelper.Do(func() {
		self, err := os.ReadFile(os.Args[0])
		if err == nil {
			err = os.WriteFile(bin, self, 0o755)
		}
		if err != nil {
			t.Fatalf("copying the test binary: %v", err)
		}
	})
	cmd := exec.Command(bin, "-test.run=^$")
	cmd.Env = append(os.Environ(), peerHelperEnv+"="+sock)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: gid}}
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return true
	case errors.As(err, &ee) && ee.ExitCode() == 3:
		return false
	}
	t.Fatalf("peer helper as %d:%d: %v: %s", uid, gid, err, out)
	return false
}

// TestServeAllowedPeers: with allowedPeers set, a connection from a uid
// and gid not listed is closed before gRPC sees it, counted, and logged
// once per uid; a listed uid or gid is served. The socket and its folder
// are open to the other user by group (socketGroup), so what refuses it is
// the peer check, not the file mode.
func TestServeAllowedPeers(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root to connect as another user (nobody, 65534)")
	}
	const nobody = 65534
	tests := []struct {
		name        string
		peers       string
		root, other bool // served
	}{
		{"uid list without nobody", "{uids: [0]}", true, false},
		{"uid list with nobody", "{uids: [0, 65534]}", true, true},
		{"gid list", "{gids: [65534]}", false, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, true)
			if err := os.Chmod(e.dir, 0o755); err != nil { // let nobody walk to the socket folder
				t.Fatal(err)
			}
			health := freeTCPAddr(t)
			e.writeConfig(t, socketConfig(e, health, "1s", "socketGroup: \"65534\"\nallowedPeers: "+tt.peers+"\n"))
			_, logs := startPluginLogs(t, e)
			waitHTTP(t, "http://"+health+"/livez")
			if got := statusOK(e.socket); got != tt.root {
				t.Errorf("root served: %v, want %v", got, tt.root)
			}
			refused := 0
			if !tt.root {
				refused++
			}
			for range 3 {
				if got := statusAs(t, e.socket, nobody, nobody); got != tt.other {
					t.Fatalf("nobody served: %v, want %v", got, tt.other)
				}
				if !tt.other {
					refused++
				}
			}
			metrics := scrape(t, "http://"+health+"/metrics")
			if n := metricValue(metrics, "kms_plugin_peers_refused_total"); n < float64(refused) {
				t.Errorf("kms_plugin_peers_refused_total = %v, want at least %d", n, refused)
			}
			if !tt.other {
				if n := strings.Count(logs.String(), "peer refused"); n != 1 {
					t.Errorf("%d lines about refused peers, want 1 (once per uid):\n%s", n, logs.String())
				}
				if !strings.Contains(logs.String(), "uid=65534") {
					t.Errorf("the refusal does not name uid 65534:\n%s", logs.String())
				}
			}
		})
	}
}
