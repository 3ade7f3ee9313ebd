package main

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	kmsservice "k8s.io/kms/pkg/service"
)

// manifestUser is the uid and gid the static pod runs the plugin as.
func manifestUser(t *testing.T) (uid, gid uint32) {
	t.Helper()
	u, g, err := staticPod(t).RunAs()
	if err != nil {
		t.Fatalf("static pod manifest: %v", err)
	}
	return uint32(u), uint32(g)
}

// userEnv is an installation owned by the manifest's user, as a node's
// /etc/kms-plugin would be: folder root 0755, config and keyset the
// plugin's. kmsctl runs as root, the administrator.
func userEnv(t *testing.T) (env, uint32, uint32) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to run the plugin as the manifest's user (CI runs as root)")
	}
	uid, gid := manifestUser(t)
	e := newEnv(t, true)
	if err := os.Chmod(e.dir, 0o755); err != nil {
		t.Fatal(err)
	}
	run := filepath.Join(e.dir, "run")
	if err := os.Mkdir(run, 0o750); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{e.keyset, e.config, run} {
		if err := os.Chown(p, int(uid), int(gid)); err != nil {
			t.Fatal(err)
		}
	}
	return e, uid, gid
}

// startPluginAs starts `kms-plugin serve` as uid:gid and returns once it
// serves, or fails the test with its log.
func startPluginAs(t *testing.T, e env, uid, gid uint32) *syncBuffer {
	t.Helper()
	cmd := exec.Command(filepath.Join(binDir, "kms-plugin"), "serve", "--config", e.config)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: gid}}
	logs := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = logs, logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
		if t.Failed() {
			t.Logf("kms-plugin log:\n%s", logs.String())
		}
	})
	deadline := time.Now().Add(20 * time.Second)
	for {
		if fi, err := os.Stat(e.socket); err == nil && fi.Mode()&os.ModeSocket != 0 {
			return logs
		}
		select {
		case <-exited:
			t.Fatalf("kms-plugin as uid %d exited at start:\n%s", uid, logs.String())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("socket %s did not appear:\n%s", e.socket, logs.String())
		}
	}
}

func ownerMode(t *testing.T, path string) (uint32, uint32, os.FileMode) {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	st := fi.Sys().(*syscall.Stat_t)
	return st.Uid, st.Gid, fi.Mode().Perm()
}

// TestRootKeyChangeKeepsPluginsKeyset is the outage a routine rotation
// caused: root's `kmsctl keys create` rewrote the plugin user's keyset as
// root:root 0600, the plugin (uid 65532) went unhealthy and could not
// restart. Now the owner and mode survive and the plugin follows the
// change.
func TestRootKeyChangeKeepsPluginsKeyset(t *testing.T) {
	e, uid, gid := userEnv(t)
	if err := os.Chmod(e.keyset, 0o600); err != nil {
		t.Fatal(err)
	}
	startPluginAs(t, e, uid, gid)
	c := client(t, e)

	newID := createAndPromote(t, e)
	if u, g, m := ownerMode(t, e.keyset); u != uid || g != gid || m != 0o600 {
		t.Fatalf("after root's key change the keyset is %d:%d %04o; want %d:%d 0600", u, g, m, uid, gid)
	}
	waitForKeyID(t, c, newID)
}

// TestLeastPrivilegeKeyset: root:GROUP 0640 with the plugin in GROUP is
// served, and root's key changes keep that shape.
func TestLeastPrivilegeKeyset(t *testing.T) {
	e, uid, gid := userEnv(t)
	if err := os.Chown(e.keyset, 0, int(gid)); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(e.keyset, 0o640); err != nil {
		t.Fatal(err)
	}
	startPluginAs(t, e, uid, gid)
	c := client(t, e)
	newID := createAndPromote(t, e)
	if u, g, m := ownerMode(t, e.keyset); u != 0 || g != gid || m != 0o640 {
		t.Fatalf("after root's key change the keyset is %d:%d %04o; want 0:%d 0640", u, g, m, gid)
	}
	waitForKeyID(t, c, newID)
}

// TestPluginNamesItsUIDWhenKeysetUnreadable: a keyset root wrote for
// itself stops the plugin at start with a line naming its uid and the fix.
func TestPluginNamesItsUIDWhenKeysetUnreadable(t *testing.T) {
	e, uid, gid := userEnv(t)
	if err := os.Chown(e.keyset, 0, 0); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(filepath.Join(binDir, "kms-plugin"), "serve", "--config", e.config)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: gid}}
	out, err := cmd.CombinedOutput()
	if err == nil {
		t.Fatalf("kms-plugin served a keyset it cannot read:\n%s", out)
	}
	for _, want := range []string{"not readable by uid 65532", "chown 65532 " + e.keyset, "chmod 640"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("error does not contain %q:\n%s", want, out)
		}
	}
}

// TestSwappedKeysetIsRefused: a keyset another user owns, or one in a
// folder others can write, is refused, so an unprivileged user cannot make
// their key the primary. A plugin run as root read both before.
func TestSwappedKeysetIsRefused(t *testing.T) {
	e, uid, gid := userEnv(t)
	if err := os.Chown(e.keyset, 1000, 1000); err != nil {
		t.Fatal(err)
	}
	out := serveOutput(t, e, 0, 0)
	if !strings.Contains(out, "owned by uid 1000, who could replace it") {
		t.Fatalf("want a refusal naming the owner:\n%s", out)
	}

	if err := os.Chmod(e.dir, 0o777); err != nil {
		t.Fatal(err)
	}
	for _, who := range [][2]uint32{{0, 0}, {uid, gid}} {
		if err := os.Chown(e.keyset, int(who[0]), int(who[1])); err != nil {
			t.Fatal(err)
		}
		out = serveOutput(t, e, who[0], who[1])
		if !strings.Contains(out, "run chmod go-w "+e.dir) {
			t.Fatalf("uid %d: want a refusal naming the world-writable folder:\n%s", who[0], out)
		}
	}
}

// serveOutput runs `kms-plugin serve` as uid:gid, expecting it to refuse
// to start, and returns what it printed.
func serveOutput(t *testing.T, e env, uid, gid uint32) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(binDir, "kms-plugin"), "serve", "--config", e.config)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: gid}}
	out, err := cmd.CombinedOutput()
	if err == nil {
		t.Fatalf("kms-plugin started; want a refusal:\n%s", out)
	}
	return string(out)
}

// createAndPromote runs root's `kmsctl keys create` and promote and
// returns the new key_id.
func createAndPromote(t *testing.T, e env) string {
	t.Helper()
	id := strings.TrimSpace(run(t, "kmsctl", "keys", "create", "--config", e.config))
	run(t, "kmsctl", "keys", "promote", "--config", e.config, id)
	return id
}

// waitForKeyID waits until the plugin's Status is healthy and reports
// keyID: the plugin followed root's change.
func waitForKeyID(t *testing.T, c kmsservice.Service, keyID string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		st, err := c.Status(context.Background())
		if err == nil && st.Healthz == "ok" && st.KeyID == keyID {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("Status = %+v, %v 10 s after the key change; want healthy with %s", st, err, keyID)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
