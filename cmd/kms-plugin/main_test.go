package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2"
	kmsservice "k8s.io/kms/pkg/service"
)

// binDir holds kms-plugin and kmsctl built once for this test binary: the
// tests run the real commands, as an operator would.
var binDir string

func TestMain(m *testing.M) {
	if sock := os.Getenv(peerHelperEnv); sock != "" {
		os.Exit(peerHelper(sock))
	}
	dir, err := os.MkdirTemp("", "kmsbin")
	if err != nil {
		panic(err)
	}
	// Other users run these binaries too (the not-writable-folder test).
	if err := os.Chmod(dir, 0o755); err != nil {
		panic(err)
	}
	build := exec.Command("go", "build", "-o", dir, "github.com/kms-v2/kms-plugin/cmd/kms-plugin", "github.com/kms-v2/kms-plugin/cmd/kmsctl")
	build.Stderr = os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "building binaries:", err)
		os.Exit(1)
	}
	binDir = dir
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// env is one plugin installation: a config file, a keyset, a socket path.
type env struct {
	dir, config, keyset, socket string
}

func newEnv(t *testing.T, initKeys bool) env {
	t.Helper()
	dir, err := os.MkdirTemp("", "kmse")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	e := env{dir: dir, config: filepath.Join(dir, "config.yaml"), keyset: filepath.Join(dir, "keyset.json"), socket: filepath.Join(dir, "run", "kms.sock")}
	e.writeConfig(t, fmt.Sprintf("socket: %s\nrefreshInterval: 200ms\ncheckInterval: 200ms\nprovider:\n  file:\n    path: keyset.json\n", e.socket))
	if initKeys {
		run(t, "kmsctl", "keys", "init", "--config", e.config)
	}
	return e
}

func (e env) writeConfig(t *testing.T, body string) {
	t.Helper()
	if err := os.WriteFile(e.config, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
}

// run runs a binary and fails the test on a non-zero exit.
func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, errOut, code := runCode(name, args...)
	if code != 0 {
		t.Fatalf("%s %s: exit %d: %s", name, strings.Join(args, " "), code, errOut)
	}
	return out
}

func runCode(name string, args ...string) (stdout, stderr string, code int) {
	cmd := exec.Command(filepath.Join(binDir, name), args...)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return o.String(), e.String(), ee.ExitCode()
	}
	if err != nil {
		return o.String(), err.Error(), -1
	}
	return o.String(), e.String(), 0
}

// startPlugin starts `kms-plugin serve` and waits for its socket.
func startPlugin(t *testing.T, e env) *exec.Cmd {
	t.Helper()
	cmd, _ := startPluginLogs(t, e)
	return cmd
}

// startPluginLogs is startPlugin that also returns the plugin's output
// (stdout and stderr), readable while it runs.
func startPluginLogs(t *testing.T, e env) (*exec.Cmd, *syncBuffer) {
	t.Helper()
	cmd := exec.Command(filepath.Join(binDir, "kms-plugin"), "serve", "--config", e.config)
	logs := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = logs, logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_, _ = cmd.Process.Wait()
		if t.Failed() {
			out := logs.String()
			if len(out) > 64<<10 {
				out = fmt.Sprintf("(%d bytes; the last 64 KiB)\n%s", len(out), out[len(out)-64<<10:])
			}
			t.Logf("kms-plugin log:\n%s", out)
		}
	})
	deadline := time.Now().Add(20 * time.Second)
	for {
		if fi, err := os.Stat(e.socket); err == nil && fi.Mode()&os.ModeSocket != 0 {
			return cmd, logs
		}
		if time.Now().After(deadline) {
			t.Fatalf("socket %s did not appear; log:\n%s", e.socket, logs.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func client(t *testing.T, e env) kmsservice.Service {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	svc, err := kmsv2.NewGRPCService(ctx, "unix://"+e.socket, "cmdtest", 3*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	return svc
}

// TestKeyLifecycleThroughTheSocket is the acceptance path with the
// real binaries: init, serve, create + promote moves Status within 10 s,
// old ciphertexts still decrypt, disable makes them fail, SIGTERM removes
// the socket.
func TestKeyLifecycleThroughTheSocket(t *testing.T) {
	e := newEnv(t, true)
	plugin := startPlugin(t, e)
	svc := client(t, e)
	ctx := context.Background()

	st, err := svc.Status(ctx)
	if err != nil || st.Healthz != "ok" || st.Version != "v2" {
		t.Fatalf("Status = %+v, %v", st, err)
	}
	oldKey := st.KeyID
	seed := make([]byte, 32)
	_, _ = rand.Read(seed)
	enc, err := svc.Encrypt(ctx, "uid-1", seed)
	if err != nil || enc.KeyID != oldKey {
		t.Fatalf("Encrypt = %+v, %v; want key_id %s", enc, err, oldKey)
	}

	newKey := strings.TrimSpace(run(t, "kmsctl", "keys", "create", "--config", e.config))
	if strings.Contains(newKey, "\n") || !strings.HasPrefix(newKey, "file:") {
		t.Fatalf("keys create printed %q, want one key_id", newKey)
	}
	if st, _ := svc.Status(ctx); st.KeyID != oldKey {
		t.Fatalf("create alone changed Status to %s", st.KeyID)
	}
	run(t, "kmsctl", "keys", "promote", "--config", e.config, newKey)
	start := time.Now()
	for {
		st, err := svc.Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if st.KeyID == newKey {
			t.Logf("Status switched %v after promote", time.Since(start).Round(time.Millisecond))
			break
		}
		if time.Since(start) > 10*time.Second {
			t.Fatalf("Status still %s 10 s after promote", st.KeyID)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if got, err := svc.Decrypt(ctx, "uid-2", &kmsservice.DecryptRequest{KeyID: enc.KeyID, Ciphertext: enc.Ciphertext}); err != nil || !bytes.Equal(got, seed) {
		t.Fatalf("old ciphertext after promote: %v", err)
	}
	if _, stderr, code := runCode("kmsctl", "keys", "disable", "--config", e.config, newKey); code == 0 || !strings.Contains(stderr, "primary") {
		t.Fatalf("disable of the primary: exit %d, %q; want refusal naming the primary", code, stderr)
	}
	run(t, "kmsctl", "keys", "disable", "--config", e.config, oldKey)
	if _, err := svc.Decrypt(ctx, "uid-3", &kmsservice.DecryptRequest{KeyID: enc.KeyID, Ciphertext: enc.Ciphertext}); err == nil {
		deadline := time.Now().Add(10 * time.Second)
		for err == nil && time.Now().Before(deadline) {
			time.Sleep(100 * time.Millisecond)
			_, err = svc.Decrypt(ctx, "uid-3", &kmsservice.DecryptRequest{KeyID: enc.KeyID, Ciphertext: enc.Ciphertext})
		}
		if err == nil {
			t.Fatal("old ciphertext still decrypts 10 s after its key was disabled")
		}
	}
	list := run(t, "kmsctl", "keys", "list", "--config", e.config, "-o", "json")
	for _, want := range []string{`"state": "primary"`, `"state": "disabled"`, newKey, oldKey} {
		if !strings.Contains(list, want) {
			t.Fatalf("keys list -o json lacks %q:\n%s", want, list)
		}
	}

	if err := plugin.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := plugin.Wait(); err != nil {
		t.Fatalf("kms-plugin exit after SIGTERM: %v", err)
	}
	if _, err := os.Lstat(e.socket); !os.IsNotExist(err) {
		t.Fatalf("socket left behind after SIGTERM: %v", err)
	}
}

// TestServeBadInput: each mistake gets one clear line on stderr, a non-zero
// exit, and leaves no socket or folder behind.
func TestServeBadInput(t *testing.T) {
	tests := []struct {
		name  string
		setup func(t *testing.T, e env) // may rewrite the config or keyset
		want  string
	}{
		{"malformed yaml", func(t *testing.T, e env) { e.writeConfig(t, "socket: [\n") }, "yaml"},
		{"unknown field", func(t *testing.T, e env) {
			e.writeConfig(t, "socket: "+e.socket+"\nsocketMode: 0777\nprovider: {file: {path: keyset.json}}\n")
		}, `unknown field "socketMode"`},
		{"missing keyset", func(t *testing.T, e env) { os.Remove(e.keyset) }, "kmsctl keys init"},
		{"world-readable keyset", func(t *testing.T, e env) { os.Chmod(e.keyset, 0o644) }, "chmod 600"},
		{"socket folder cannot be created", func(t *testing.T, e env) {
			e.writeConfig(t, "socket: "+filepath.Join(e.keyset, "sub", "kms.sock")+"\nprovider: {file: {path: keyset.json}}\n")
		}, "socket folder"},
		{"relative socket outside", func(t *testing.T, e env) {
			e.writeConfig(t, "socket: '@abstract'\nprovider: {file: {path: keyset.json}}\n")
		}, "abstract"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, true)
			tt.setup(t, e)
			_, stderr, code := runCode("kms-plugin", "serve", "--config", e.config)
			if code == 0 {
				t.Fatal("kms-plugin serve succeeded")
			}
			lines := nonLogLines(stderr)
			if len(lines) != 1 || !strings.Contains(lines[0], tt.want) {
				t.Fatalf("stderr error lines %q, want one line containing %q", lines, tt.want)
			}
			if _, err := os.Lstat(filepath.Dir(e.socket)); !os.IsNotExist(err) {
				t.Fatalf("socket folder left behind: %v", err)
			}
		})
	}
}

// TestServeRefusesLiveSocket: a second plugin on the same socket fails and
// leaves the first one serving.
func TestServeRefusesLiveSocket(t *testing.T) {
	e := newEnv(t, true)
	startPlugin(t, e)
	_, stderr, code := runCode("kms-plugin", "serve", "--config", e.config)
	if code == 0 || !strings.Contains(stderr, "already served by another process") {
		t.Fatalf("second serve: exit %d, stderr %q", code, stderr)
	}
	if _, err := client(t, e).Status(context.Background()); err != nil {
		t.Fatalf("first plugin stopped answering: %v", err)
	}
}

// TestServeSocketFolderNotWritable runs the plugin as an unprivileged user
// (root ignores folder permissions) against a folder it cannot write.
func TestServeSocketFolderNotWritable(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root to run the plugin as another user")
	}
	nobody, err := user.Lookup("nobody")
	if err != nil {
		t.Fatalf("user nobody: %v", err)
	}
	uid, _ := strconv.Atoi(nobody.Uid)
	gid, _ := strconv.Atoi(nobody.Gid)
	e := newEnv(t, true)
	if err := os.MkdirAll(filepath.Dir(e.socket), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{e.dir, e.config, e.keyset} {
		if err := os.Chown(p, uid, gid); err != nil {
			t.Fatal(err)
		}
	}
	cmd := exec.Command(filepath.Join(binDir, "kms-plugin"), "serve", "--config", e.config)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	err = cmd.Run()
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		t.Fatalf("kms-plugin as nobody: %v (want a non-zero exit); stderr %q", err, stderr.String())
	}
	if lines := nonLogLines(stderr.String()); len(lines) != 1 || !strings.Contains(lines[0], "not writable") {
		t.Fatalf("stderr %q, want one line saying the folder is not writable", lines)
	}
}

func TestKmsctlBadInput(t *testing.T) {
	e := newEnv(t, true)
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"init twice", []string{"keys", "init", "--config", e.config}, "already exists"},
		{"no config flag", []string{"keys", "list"}, "--config is required"},
		{"promote unknown", []string{"keys", "promote", "--config", e.config, "file:nope/1"}, "not in keyset"},
		{"promote without key", []string{"keys", "promote", "--config", e.config}, "exactly one KEYID"},
		{"bad output", []string{"keys", "list", "--config", e.config, "-o", "yaml"}, "want table or json"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before, _ := os.ReadFile(e.keyset)
			_, stderr, code := runCode("kmsctl", tt.args...)
			if code == 0 {
				t.Fatal("kmsctl succeeded")
			}
			if lines := nonLogLines(stderr); len(lines) != 1 || !strings.Contains(lines[0], tt.want) {
				t.Fatalf("stderr %q, want one line containing %q", lines, tt.want)
			}
			if after, _ := os.ReadFile(e.keyset); !bytes.Equal(before, after) {
				t.Fatal("a failed command changed the keyset")
			}
		})
	}
}

// nonLogLines returns stderr lines that are not structured log lines.
func nonLogLines(stderr string) []string {
	var out []string
	for _, l := range strings.Split(strings.TrimSpace(stderr), "\n") {
		if l == "" || strings.Contains(l, " [INFO] ") || strings.Contains(l, " [WARN] ") || strings.Contains(l, " [DEBUG] ") || strings.Contains(l, " [ERROR] ") {
			continue
		}
		out = append(out, l)
	}
	return out
}
